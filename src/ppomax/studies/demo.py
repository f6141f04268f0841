"""`ppomax demo`: the whole pipeline on the embedded `reviews` task, PPO-max vs vanilla PPO.

Stages (each cached in ``<output_dir>/assets`` or ``<output_dir>/runs`` and skipped when done):
  task data → tiny Llama pre-init → SFT → preference pairs from SFT samples labelled by the
  gold judge (Bradley-Terry noise) → reward model → PPO per method (same seed and budget) →
  evaluation on held-out prompts (SFT as baseline) → report with plots, summary.json and
  table.txt (the printed summary table, :func:`summary_table`).

The reward model only ever sees well-formed, single-domain reviews, so it can be fooled by
off-distribution text (e.g. cross-domain clauses); vanilla PPO finds that hole, PPO-max's KL
penalty and reward normalisation keep the policy near the SFT distribution (paper Sec. 5.2).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppomax.config import PPOConfig, RewardConfig, SFTConfig
from ppomax.studies.config import DemoConfig
from ppomax.studies.runs import (  # noqa: F401  (run_method: re-exported, the demo's as before)
    best_policy,
    final_policy,
    gold_peak,
    is_done,
    mark_done,
    run_method,
    run_methods,
    stage_samples,
)

logger = logging.getLogger("ppomax")


@dataclass(frozen=True)
class Budget:
    """Sizes and learning rates of one demo mode (see docs/demo.md for how they were chosen)."""

    n_sft: int = 20000  # SFT corpus rows
    sft_steps: int = 800
    sft_batch: int = 64
    sft_lr: float = 1e-3
    n_pair_prompts: int = 4500  # two SFT samples per prompt -> one preference pair
    pair_beta: float = 5.0  # Bradley-Terry temperature of the simulated labellers
    rm_epochs: float = 5.0
    rm_lr: float = 1e-3
    rm_batch: int = 64
    ppo_steps: int = 200
    rollout_batch_size: int = 64
    num_mini_batches: int = 2
    num_ppo_epochs: int = 4
    response_length: int = 28
    learning_rate: float = 2e-4  # vanilla's collapse shows within 200 iterations (docs/demo.md)
    critic_learning_rate: float = 5e-5
    critic_pretrain_steps: int = 20
    n_eval_prompts: int = 512
    n_during_eval: int = 128  # held-out prompts of the evaluations during PPO (best/ checkpoint)
    layers: int = 3
    hidden: int = 128
    heads: int = 4
    ffn: int = 384


FULL = Budget()
QUICK = Budget(n_sft=4000, sft_steps=200, n_pair_prompts=1200, rm_epochs=3.0, ppo_steps=20,
               rollout_batch_size=32, critic_pretrain_steps=4, n_eval_prompts=128)


def budget_for(cfg: DemoConfig) -> Budget:
    b = QUICK if cfg.quick else FULL
    if cfg.ppo_steps > 0:
        b = dataclasses.replace(b, ppo_steps=cfg.ppo_steps)
    return b


# ---------------------------------------------------------------------------------------------
# Task assets (cached)
# ---------------------------------------------------------------------------------------------


def build_base_model(path: Path, b: Budget, seed: int) -> None:
    """A randomly initialised Llama sized for the task, with the task's word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppomax.models import save_causal_lm
    from ppomax.studies.tasks import reviews

    tok = reviews.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=b.hidden, intermediate_size=b.ffn, num_hidden_layers=b.layers,
        num_attention_heads=b.heads, num_key_value_heads=b.heads, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    save_causal_lm(LlamaForCausalLM(config), tok, path)


def make_preference_pairs(sft_dir: Path, out_dir: Path, b: Budget, seed: int, disable_tqdm: bool) -> dict:
    """Two SFT samples per prompt, labelled by the gold judge with Bradley-Terry noise."""
    from ppomax import data as D
    from ppomax import models as M
    from ppomax.evaluate import sample_responses
    from ppomax.studies.tasks import reviews

    tok = M.load_tokenizer(sft_dir)
    policy = M.load_causal_lm(sft_dir)
    prompts = reviews.prompts(b.n_pair_prompts, seed=seed + 1)
    ids = [D.encode_prompt(tok, p) for p in prompts]
    a = sample_responses(policy, tok, ids, b.response_length, batch_size=256, seed=seed + 2, disable_tqdm=disable_tqdm)
    c = sample_responses(policy, tok, ids, b.response_length, batch_size=256, seed=seed + 3, disable_tqdm=disable_tqdm)
    ga = reviews.gold_scores(a["prompts"], a["responses"], a["truncated"])
    gc = reviews.gold_scores(c["prompts"], c["responses"], c["truncated"])
    rows, n_dropped = reviews.label_pairs(a["prompts"], a["responses"], c["responses"], ga, gc, b.pair_beta, seed + 4)
    D.write_jsonl(out_dir / "pairs.jsonl", rows)
    agree = sum(
        reviews.gold_score(r["prompt"], r["chosen"]) >= reviews.gold_score(r["prompt"], r["rejected"]) for r in rows
    ) / max(len(rows), 1)
    return {"pairs": len(rows), "dropped_identical_or_empty": n_dropped, "label_agreement_with_gold": agree,
            "sft_sample_gold": sum(ga) / len(ga),
            "sft_well_formed": reviews.well_formed_fraction(a["prompts"], a["responses"], a["truncated"])}


def build_assets(cfg: DemoConfig, b: Budget) -> dict[str, Any]:
    """SFT model and reward model for the task, cached by their settings."""
    from ppomax import data as D
    from ppomax.reward import train_reward_model
    from ppomax.sft import train_sft
    from ppomax.studies.tasks import reviews

    root = Path(cfg.cache_dir or Path(cfg.output_dir) / "assets")
    root.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    asset_fields = ("n_sft", "sft_steps", "sft_batch", "sft_lr", "n_pair_prompts", "pair_beta", "rm_epochs",
                    "rm_lr", "rm_batch", "response_length", "layers", "hidden", "heads", "ffn")
    # version 2: SFT / RM losses are batch-level token (pair) means (issue #11), so older assets differ
    key = {"seed": cfg.seed, "version": 2, **{f: getattr(b, f) for f in asset_fields}}
    base, sft, rm = root / "base", root / "sft", root / "rm"
    quiet = dict(disable_tqdm=cfg.disable_tqdm, report_to="none", overwrite_output_dir=True)

    if not is_done(sft, key):
        t = time.perf_counter()
        build_base_model(base, b, cfg.seed)
        D.write_jsonl(root / "sft.jsonl", reviews.sft_corpus(b.n_sft, seed=cfg.seed))
        print(f"[demo] SFT: {b.sft_steps} steps on {b.n_sft} reviews", flush=True)
        res = train_sft(SFTConfig(
            model_name_or_path=str(base), dataset=str(root / "sft.jsonl"), output_dir=str(sft), seed=cfg.seed,
            learning_rate=b.sft_lr, max_steps=b.sft_steps, per_device_train_batch_size=b.sft_batch,
            warmup_ratio=0.05, eval_steps=b.sft_steps, logging_steps=50, save_steps=b.sft_steps,
            max_length=64, max_prompt_length=16, eval_split=0.02, save_total_limit=1, **quiet,
        ))
        mark_done(sft, key)
        (sft / "demo_info.json").write_text(json.dumps({"eval": res["final"], "seconds": time.perf_counter() - t}))
    info["sft"] = json.loads((sft / "demo_info.json").read_text())

    if not is_done(rm, key):
        t = time.perf_counter()
        print(f"[demo] preference pairs: 2 SFT samples × {b.n_pair_prompts} prompts, gold judge labels", flush=True)
        pair_info = make_preference_pairs(sft, root, b, cfg.seed, cfg.disable_tqdm)
        print(f"[demo] reward model: {b.rm_epochs:g} epochs on {pair_info['pairs']} pairs", flush=True)
        res = train_reward_model(RewardConfig(
            model_name_or_path=str(sft), dataset=str(root / "pairs.jsonl"), output_dir=str(rm), seed=cfg.seed,
            learning_rate=b.rm_lr, num_train_epochs=b.rm_epochs, per_device_train_batch_size=b.rm_batch,
            warmup_ratio=0.05, eval_steps=100000, logging_steps=50, save_steps=100000, max_length=64,
            max_prompt_length=16, eval_split=0.1, save_total_limit=1, **quiet,
        ))
        mark_done(rm, key)
        (rm / "demo_info.json").write_text(json.dumps({"eval": res["final"], "pairs": pair_info,
                                                       "seconds": time.perf_counter() - t}))
    info["rm"] = json.loads((rm / "demo_info.json").read_text())
    # Prompts for evaluation during PPO (the best checkpoint): held out from training and from the final
    # evaluation (EvalContext), so picking best/ does not select on the prompts that report it.
    D.write_jsonl(root / "eval_prompts.jsonl", [{"prompt": p} for p in reviews.prompts(b.n_during_eval, seed=cfg.seed + 555)])
    info["paths"] = {"sft": str(sft), "rm": str(rm), "eval_prompts": str(root / "eval_prompts.jsonl")}
    return info


# ---------------------------------------------------------------------------------------------
# PPO per method
# ---------------------------------------------------------------------------------------------


# What each `--methods` name trains (config.DEMO_METHODS). The critic-free estimators (issue #14) keep
# PPO-max's policy constraints (KL in the reward, reward normalisation and clipping, gradient clipping),
# so only the advantage estimate differs from ppo_max; grpo / rloo sample k = 4 responses per prompt.
GROUP_SIZE = 4
METHODS: dict[str, dict[str, Any]] = {
    "ppo_max": {"preset": "ppo_max"},
    "vanilla": {"preset": "vanilla"},
    "grpo": {"advantage_estimator": "grpo", "num_samples_per_prompt": GROUP_SIZE},
    "dr_grpo": {"advantage_estimator": "grpo", "num_samples_per_prompt": GROUP_SIZE, "grpo_scale_rewards": False,
                "loss_reduction": "token_sum"},
    "rloo": {"advantage_estimator": "rloo", "num_samples_per_prompt": GROUP_SIZE},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp"},
}


def ppo_config(method: str, out: Path, paths: dict, b: Budget, seed: int, disable_tqdm: bool, **overrides) -> PPOConfig:
    """The demo's PPO settings: the same budget for every method, counted in responses: an iteration
    samples b.rollout_batch_size responses (b.rollout_batch_size / k prompts × k samples each) in the
    same mini-batches. ``method`` is a preset; ``overrides`` any fields (METHODS, ablation variants)."""
    k = int(overrides.get("num_samples_per_prompt", 1))
    values = dict(
        model_name_or_path=paths["sft"], reward_model_path=paths["rm"], output_dir=str(out), seed=seed,
        max_steps=b.ppo_steps, rollout_batch_size=b.rollout_batch_size // k, num_mini_batches=b.num_mini_batches,
        per_device_train_batch_size=b.rollout_batch_size // b.num_mini_batches,
        generation_batch_size=b.rollout_batch_size, num_ppo_epochs=b.num_ppo_epochs,
        response_length=b.response_length, learning_rate=b.learning_rate, critic_learning_rate=b.critic_learning_rate,
        max_prompt_length=16, save_steps=max(10, b.ppo_steps // 4), save_total_limit=1, report_to="tensorboard",
        disable_tqdm=disable_tqdm, num_sample_generations=4,
    )
    if method == "ppo_max":
        values["critic_pretrain_steps"] = b.critic_pretrain_steps
    if overrides.get("advantage_estimator", "gae") != "gae":  # no critic: its settings do not apply
        values.pop("critic_learning_rate")
        values.pop("critic_pretrain_steps", None)
    values.update(overrides)
    return PPOConfig.from_preset(method, **values)


def method_config(name: str, out: Path, paths: dict, b: Budget, seed: int, disable_tqdm: bool) -> PPOConfig:
    """The PPOConfig of one `--methods` name (METHODS), evaluated on held-out prompts ten times during
    training with the best gold kept in best/ (issue #15: the demo shows each method's best and final)."""
    overrides = dict(METHODS[name])
    return ppo_config(overrides.pop("preset", "ppo_max"), out, paths, b, seed, disable_tqdm,
                      eval_steps=max(1, b.ppo_steps // 10), eval_dataset=paths["eval_prompts"],
                      metric_for_best_model="gold", **overrides)


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from ppomax import models as M
    from ppomax.studies.report import plot_curves, write_report
    from ppomax.studies.tasks import reviews
    from ppomax.training import set_seed

    if cfg.model == "smollm2":
        from ppomax.studies.smollm2_study import run_smollm2_study

        return run_smollm2_study(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    M.quiet_transformers()
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    b = budget_for(cfg)
    set_seed(cfg.seed)
    assets = build_assets(cfg, b)
    methods = [m.strip() for m in cfg.methods.split(",")]
    train_prompts = reviews.prompts(4096, seed=cfg.seed + 10)
    cfgs = {m: method_config(m, out / "runs" / m, assets["paths"], b, cfg.seed, cfg.disable_tqdm) for m in methods}
    print(f"[demo] PPO ({', '.join(methods)}): {b.ppo_steps} iterations of {b.rollout_batch_size} responses each",
          flush=True)
    runs = run_methods(cfgs, train_prompts, parallel=cfg.parallel)

    # ---- evaluation on held-out prompts: each final policy vs the SFT policy ----------------
    print(f"[demo] evaluation on {b.n_eval_prompts} held-out prompts", flush=True)
    ctx = EvalContext(assets["paths"], b, cfg.seed)
    summary: dict[str, Any] = {"methods": {"sft": ctx.baseline_metrics()}}
    for method in methods:
        m = ctx.evaluate(final_policy(out / "runs" / method))
        m["gold_peak"] = round(gold_peak(runs[method]), 4)
        best = best_policy(out / "runs" / method)
        if best is not None:  # the best checkpoint by eval/gold during training, on the same held-out prompts
            b_m = ctx.evaluate(best)
            m["gold_best"], m["best_step"] = b_m["gold"], int(best.parent.name.split("-")[-1])
            m["best"] = {k: b_m[k] for k in ("rm_reward", "gold", "kl", "length", "well_formed", "win_rate_vs_sft")}
        summary["methods"][method] = m
    summary["assets"] = {"sft_eval": assets["sft"].get("eval"), "rm_eval": assets["rm"].get("eval"),
                         "pairs": assets["rm"].get("pairs")}
    summary["budget"] = dataclasses.asdict(b)
    ok, notes = check_contrast(summary["methods"])
    summary["contrast_holds"] = ok
    summary["seconds"] = round(time.perf_counter() - t_start, 1)

    # ---- report ----------------------------------------------------------------------------
    plots = plot_curves(runs, out / "plots", baselines={"gold": summary["methods"]["sft"]["gold"]},
                        smooth=5 if b.ppo_steps >= 50 else 1)
    samples = {m: stage_samples(out / "runs" / m / "samples.jsonl") for m in methods}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out / "table.txt").write_text(summary_table(summary) + "\n", encoding="utf-8")
    report = write_report(out, "ppomax demo: PPO-max vs vanilla PPO on the embedded reviews task",
                          summary, plots, samples, notes + _asset_notes(assets))
    _print_summary(summary, report)
    return summary


class EvalContext:
    """Held-out prompts, the SFT baseline's samples and the judges, shared by every policy evaluated."""

    def __init__(self, paths: dict, b: Budget, seed: int) -> None:
        from ppomax import models as M
        from ppomax.data import encode_prompt
        from ppomax.evaluate import Baseline, sample_responses
        from ppomax.studies.tasks import reviews

        self.tok = M.load_tokenizer(paths["sft"])
        self.sft = M.load_causal_lm(paths["sft"])
        self.rm = M.ScalarHeadModel.from_pretrained(paths["rm"])
        prompts = reviews.prompts(b.n_eval_prompts, seed=seed + 777)
        self.ids = [encode_prompt(self.tok, p) for p in prompts]
        self.kw = dict(response_length=b.response_length, batch_size=256, reward_model=self.rm, seed=seed + 5,
                       disable_tqdm=True, judge=reviews.gold_scores)
        base = sample_responses(self.sft, self.tok, self.ids, ref_policy=self.sft, **self.kw)
        self.baseline = Baseline(base["gold"], "sft", base)  # every policy: the same prompts, seed and judge

    def baseline_metrics(self) -> dict[str, Any]:
        from ppomax.evaluate import summarize

        base = self.baseline.samples
        m = summarize(base, base["gold"])
        m.update(win_rate_vs_sft=0.5, well_formed=_well_formed(base))
        return _round(m)

    def evaluate(self, policy_dir: Path) -> dict[str, Any]:
        """rm_reward, gold, kl (vs SFT), perplexity, length, well_formed, win rate vs SFT + CI."""
        from ppomax import models as M
        from ppomax.evaluate import sample_responses

        s = sample_responses(M.load_causal_lm(policy_dir), self.tok, self.ids, ref_policy=self.sft, **self.kw)
        m = self.baseline.report(s, s["gold"])
        m.update(win_rate_ci=[round(x, 4) for x in m["win_rate_ci"]], well_formed=_well_formed(s))
        return _round(m)


def _well_formed(samples: dict) -> float:
    from ppomax.studies.tasks import reviews

    return reviews.well_formed_fraction(samples["prompts"], samples["responses"], samples["truncated"])


def check_contrast(methods: dict[str, dict]) -> tuple[bool, list[str]]:
    """The paper's contrast (Sec. 5.2, Fig. 4): vanilla over-optimises the RM, PPO-max does not.

    Vanilla: RM reward up, final gold clearly below its own peak or below SFT, KL ≥ 3× PPO-max's.
    PPO-max: final gold above SFT and win rate vs SFT > 0.5.
    """
    notes, ok = [], True
    sft, pm, va = methods.get("sft"), methods.get("ppo_max"), methods.get("vanilla")
    if not (sft and pm and va):
        return False, ["contrast not checked: it needs sft, ppo_max and vanilla"]
    checks = [
        ("vanilla's RM reward rose above SFT's", va["rm_reward"] > sft["rm_reward"] + 0.5),
        ("vanilla's final gold is clearly below its peak or below SFT",
         va["gold"] < va["gold_peak"] - 0.2 or va["gold"] < sft["gold"]),
        ("vanilla's KL is at least 3× PPO-max's", va["kl"] >= 3 * max(pm["kl"], 1e-6)),
        ("PPO-max's final gold is above SFT's", pm["gold"] > sft["gold"]),
        ("PPO-max wins against SFT more often than not", pm["win_rate_vs_sft"] > 0.5),
    ]
    for text, passed in checks:
        notes.append(f"{'✔' if passed else '✘'} {text}")
        ok &= bool(passed)
    return ok, notes


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def _asset_notes(assets: dict) -> list[str]:
    rm_eval = assets["rm"].get("eval", {})
    pairs = assets["rm"].get("pairs", {})
    return [
        f"SFT eval perplexity {assets['sft'].get('eval', {}).get('eval/perplexity', float('nan')):.2f}; "
        f"{pairs.get('sft_well_formed', float('nan')):.0%} of SFT samples well formed.",
        f"Reward model: eval accuracy {rm_eval.get('eval/accuracy', float('nan')):.0%} on {pairs.get('pairs', '?')} pairs "
        f"(labels agree with the gold order {pairs.get('label_agreement_with_gold', float('nan')):.0%}).",
    ]


# Column -> decimals of the demo's summary table. KL (nats, up to hundreds) and length (tokens)
# need one decimal; the others live in about [-3, 10] and need two to separate the methods.
SUMMARY_TABLE_COLUMNS = {"rm_reward": 2, "gold": 2, "gold_peak": 2, "gold_best": 2, "kl": 1, "perplexity": 2,
                         "length": 1, "well_formed": 2, "win_rate_vs_sft": 2}


def summary_table(summary: dict) -> str:
    """The summary table the demo prints and writes to ``table.txt``, from summary.json's content.

    One function, so the console, ``table.txt`` and the README's copy (checked by
    tests/test_readme.py and the slow demo test) cannot differ. A missing or non-finite value
    (e.g. SFT's gold_peak: SFT has no PPO curve) is "–". Columns are right-aligned, 3 spaces apart.
    """
    header = ["method", *SUMMARY_TABLE_COLUMNS]
    rows = [header]
    for name, m in summary["methods"].items():
        cells = [name]
        for col, decimals in SUMMARY_TABLE_COLUMNS.items():
            v = m.get(col)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            cells.append(f"{v:.{decimals}f}" if ok else "–")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "   ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]) for r in rows
    )


def _print_summary(summary: dict, report: Path) -> None:
    print("\n" + summary_table(summary))
    verdict = "holds" if summary["contrast_holds"] else "does NOT hold"
    print(f"\ncontrast (vanilla over-optimises, PPO-max stays aligned) {verdict}; {summary['seconds']:.0f} s")
    print(f"report: {report}")
