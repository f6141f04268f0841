"""Evaluation of a policy on held-out prompts: the one accumulator every evaluation in ppomax uses.

:func:`sample_and_score` is the loop: prompts in batches → the engine samples one response per
prompt → per-response statistics (:func:`accumulate`) → the judge over the whole set. It is the
one place where the RNG rule lives: everything runs inside ``training.forked_rng(seed)``, so an
evaluation draws the same samples for the same policy whenever it runs, and never moves the
caller's random streams (Python, NumPy, CPU, every CUDA device), the judge's draws included.
:func:`summarize` turns the statistics into metrics, the set-level collapse metrics
(:mod:`ppomax.diversity`) included, and :class:`Baseline` is the one base-vs-policy comparison.

Its users: :func:`sample_responses` (a policy and its tokenizer: ``ppomax eval`` and the studies'
evaluators), :func:`ppomax.ppo.evaluation.evaluate` (``eval/*`` during PPO, with the trainer's own
forward passes), and :func:`evaluate` (``ppomax eval``).

Metrics (same names as the training monitors where they coincide):
- ``rm_reward``: mean reward-model score of the sampled responses;
- ``gold``: mean gold-judge score (tasks with a judge, e.g. the embedded ``reviews``);
- ``kl``: mean over responses of Σ_t (log π − log π_ref) on the policy's own samples (nats);
- ``perplexity``: exp(mean response-token NLL of the policy on its own samples);
- ``length``: mean response tokens (EOS included); ``truncated``: share hitting the cap;
- ``distinct_1``, ``distinct_2``, ``self_similarity``, ``template_share``: pattern collapse across
  the responses (:mod:`ppomax.diversity`; compare them between sets of the same prompts);
- ``win_rate_vs_<baseline>``: share of prompts where the judge prefers the policy's response to
  the baseline's response for the same prompt (ties count half), with a 95 % Wilson interval.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("ppomax")

# Per-response lists of a sample set (what sample_responses returns), one entry per prompt.
SAMPLE_KEYS = ("prompts", "responses", "truncated", "length", "nll", "kl", "rm")


def decode(tokenizer, p_ids: torch.Tensor, p_mask: torch.Tensor, resp: torch.Tensor,
           mask: torch.Tensor) -> tuple[list[str], list[str]]:
    """The prompts and responses of a generated batch as text (special tokens skipped): prompts (B, P)
    left-padded with p_mask (B, P), responses (B, T) right-padded with mask (B, T)."""
    prompts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(p_ids, p_mask)]
    responses = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(resp, mask)]
    return prompts, responses


def accumulate(out: dict[str, list], mask: torch.Tensor, truncated: torch.Tensor, texts: tuple[list, list],
               logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
               rm: torch.Tensor | None = None) -> None:
    """Append one generated batch's per-response statistics to ``out`` (the lists of :data:`SAMPLE_KEYS`).

    mask (B, T) 1 on response tokens; truncated (B,) bool; texts (prompts, responses); logp, ref_logp
    (B, T) log π and log π_ref of the sampled tokens, 0 outside the mask; rm (B,) reward scores. ``nll``
    needs logp, ``kl`` logp and ref_logp; a statistic whose input is None stays empty."""
    if logp is not None:
        out["nll"] += (-(logp.sum(-1))).tolist()
    out["length"] += mask.sum(-1).tolist()
    out["truncated"] += truncated.tolist()
    if ref_logp is not None:
        out["kl"] += (logp - ref_logp).sum(-1).tolist()
    if rm is not None:
        out["rm"] += rm.float().tolist()
    out["prompts"] += texts[0]
    out["responses"] += texts[1]


def shard(n: int, d=None) -> list[int]:
    """This rank's prompt indices out of ``n``: every ``world_size``-th from its rank, padded with its first
    (prompt 0 when it has none) to ⌈n / world_size⌉, so that every rank runs the same number of batches
    (a sharded model's forwards are collectives). ``d``: the processes (``distributed.Dist``); one
    process: all of them. :func:`merge_shards` drops the padding."""
    if d is None or not d.enabled:
        return list(range(n))
    own = list(range(d.rank, n, d.world_size))
    return own + [own[0] if own else 0] * (-(-n // d.world_size) - len(own))


def merge_shards(parts: Sequence[dict[str, list]], n: int) -> dict[str, list]:
    """The ranks' per-response lists (rank order, each from :func:`shard`'s indices) back in prompt order."""
    world = len(parts)
    return {k: [parts[i % world][k][i // world] for i in range(n)] if parts[0][k] else [] for k in SAMPLE_KEYS}


@torch.no_grad()
def sample_and_score(engine, sampling, prompt_ids: list[list[int]], batch_size: int, pad_id: int,
                     device: torch.device, seed: int, score_batch: Callable, judge: Callable | None = None,
                     disable_tqdm: bool = True, d=None) -> tuple[dict[str, list], list[float] | None]:
    """Sample one response per prompt with ``engine`` and score them; return (samples, judge scores or None).

    ``score_batch(idx, parts, gen)`` gives a batch's keyword arguments of :func:`accumulate` besides
    the mask and truncation (``texts``, and ``logp`` / ``ref_logp`` / ``rm`` as the caller computes them):
    ``idx`` is the batch's prompt indices into ``prompt_ids``, ``parts`` = (prompt ids (B, P), prompt
    mask (B, P), response ids (B, T), response mask (B, T)), ``gen`` the engine's Generation.
    ``judge(prompts, responses, truncated)`` is called once with the whole set (a set-level term sees
    every response).

    ``d`` (``distributed.Dist``) with several processes: each rank samples and scores its share
    (:func:`shard`) on its own stream (``seed`` + a multiple of its rank), the shares are gathered,
    and every rank judges and returns the whole set in prompt order. One process: every prompt, ``seed``.

    The RNG rule: sampling and judging run on their own streams seeded with ``seed``, and every stream
    of the caller (Python, NumPy, CPU, each CUDA device) is restored afterwards (``training.forked_rng``)."""
    from ppomax.data import collate_prompts
    from ppomax.training import forked_rng, progress

    idx = shard(len(prompt_ids), d)
    several = d is not None and d.enabled
    out: dict[str, list] = {k: [] for k in SAMPLE_KEYS}
    with forked_rng(seed + (104729 * d.rank if several else 0)):
        for s in progress(range(0, len(idx), batch_size), desc="eval", disable=disable_tqdm):
            b = idx[s : s + batch_size]
            batch = collate_prompts([prompt_ids[i] for i in b], pad_id)
            p_ids, p_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            gen = engine.generate(p_ids, p_mask, sampling)
            accumulate(out, gen.mask, gen.truncated, **score_batch(b, (p_ids, p_mask, gen.response_ids, gen.mask), gen))
        if several:
            from ppomax.distributed import gather_json

            out = merge_shards(gather_json(out, d), len(prompt_ids))
        scores = judge(out["prompts"], out["responses"], out["truncated"]) if judge is not None else None
    return out, scores


@torch.no_grad()
def sample_responses(
    policy, tokenizer, prompt_ids: list[list[int]], response_length: int, temperature: float = 1.0,
    batch_size: int = 64, ref_policy=None, reward_model=None, seed: int = 0, disable_tqdm: bool = True,
    top_k: int = 0, top_p: float = 1.0, engine=None, logprobs: bool = True, judge: Callable | None = None,
) -> dict[str, Any]:
    """Sample one response per prompt; return texts and per-response statistics (lists, :data:`SAMPLE_KEYS`).

    Responses end at any EOS id of the tokenizer and the policy's generation_config. ``nll`` and
    ``kl`` are under the full temperature-scaled softmax (as in PPO), also when top-k / top-p
    truncate the sampling. ``engine``: a rollout engine (ppomax.engines) to sample with; default
    the ``hf`` engine on ``policy``. ``logprobs=False`` (and no ``ref_policy``) skips the policy's
    forward pass over its samples (about as many FLOPs as sampling them); ``nll`` then stays empty.
    ``judge(prompts, responses, truncated)``: its scores are added as ``gold`` (judged on the
    evaluation's own random streams, :func:`sample_and_score`)."""
    from ppomax.engines import Sampling
    from ppomax.engines.hf import HFEngine
    from ppomax.models import eos_token_ids
    from ppomax.ppo.rollout import response_logprobs, reward_model_scores

    device = next(policy.parameters()).device
    policy.eval()
    sampling = Sampling(response_length, tuple(eos_token_ids(tokenizer, policy)), tokenizer.pad_token_id,
                        temperature, top_k, top_p)

    def score_batch(idx: list[int], parts: tuple, gen) -> dict[str, Any]:
        mask = parts[3]
        logp = response_logprobs(policy, parts, temperature) * mask if logprobs or ref_policy is not None else None
        ref = response_logprobs(ref_policy, parts, temperature) * mask if ref_policy is not None else None
        rm = reward_model_scores(reward_model, *parts) if reward_model is not None else None
        return dict(texts=decode(tokenizer, *parts), logp=logp, ref_logp=ref, rm=rm)

    out, gold = sample_and_score(engine or HFEngine(policy), sampling, prompt_ids, batch_size, tokenizer.pad_token_id,
                                 device, seed, score_batch, judge=judge, disable_tqdm=disable_tqdm)
    if gold is not None:
        out["gold"] = gold
    return out


def summarize(samples: dict[str, Any], gold: Sequence[float] | None = None) -> dict[str, float]:
    """Mean metrics of one policy's samples (see the module docstring for the names)."""
    from ppomax.diversity import collapse_metrics

    n_tok = sum(samples["length"])
    m = {
        "perplexity": math.exp(min(sum(samples["nll"]) / max(n_tok, 1), 50.0)),
        "length": n_tok / max(len(samples["length"]), 1),
        "truncated": sum(samples["truncated"]) / max(len(samples["truncated"]), 1),
        "n": len(samples["responses"]),
        **collapse_metrics(samples["responses"]),
    }
    if samples["kl"]:
        m["kl"] = sum(samples["kl"]) / len(samples["kl"])
    if samples["rm"]:
        m["rm_reward"] = sum(samples["rm"]) / len(samples["rm"])
    if gold is not None:
        m["gold"] = sum(gold) / len(gold)
    return m


def win_rate_with_ci(scores: Sequence[float], baseline_scores: Sequence[float]) -> tuple[float, list[float]]:
    """Paired win rate (ties half) and its 95 % Wilson interval."""
    from ppomax.stats import wilson_interval, win_rate

    wr = win_rate(scores, baseline_scores)
    lo, hi = wilson_interval(wr * len(scores), len(scores))
    return wr, [lo, hi]


class Baseline:
    """The base-vs-policy comparison: a base policy's judge scores on a prompt set, one response per prompt.

    Every policy is compared on the same prompts (sampled with the same seed): :meth:`versus` gives the
    paired win rate over the base (ties half) with its 95 % Wilson interval as ``win_rate_vs_<name>``
    and ``win_rate_ci``; :meth:`report` adds them to :func:`summarize`'s metrics. ``samples``: the
    base's own samples (:func:`sample_responses`), kept for its metrics."""

    def __init__(self, scores: Sequence[float], name: str = "base", samples: dict[str, Any] | None = None) -> None:
        self.scores, self.name, self.samples = list(scores), name, samples

    def versus(self, scores: Sequence[float]) -> dict[str, Any]:
        wr, ci = win_rate_with_ci(scores, self.scores)
        return {f"win_rate_vs_{self.name}": wr, "win_rate_ci": ci}

    def report(self, samples: dict[str, Any], gold: Sequence[float] | None,
               scores: Sequence[float] | None = None) -> dict[str, Any]:
        """:func:`summarize` of ``samples`` (gold: their gold scores or None), then :meth:`versus` of
        ``scores`` (default: the gold scores): the judge of the comparison."""
        return {**summarize(samples, gold), **self.versus(gold if scores is None else scores)}


def evaluate(cfg, gold_fn: Callable | None = None, prompts: list | None = None) -> dict[str, Any]:
    """`ppomax eval`: load the models named in ``cfg`` (an EvalConfig), sample, score, write files.

    ``gold_fn(prompts, responses, truncated)``: the task's gold judge; ``prompts``: what to evaluate
    (default: the first ``num_prompts`` rows of ``cfg.dataset``). ``--task`` names a study's task
    (:mod:`ppomax.studies.tasks`): the CLI passes its judge and prompts here, as PPOTrainer takes them."""
    from ppomax import data as D
    from ppomax import models as M
    from ppomax.config import ConfigError
    from ppomax.engines import make_engine
    from ppomax.training import resolve_device, seed_run

    if cfg.task is not None and gold_fn is None:
        raise ConfigError(f"EvalConfig.task = {cfg.task!r}: the task's gold judge comes from ppomax.studies.tasks; "
                          f"`ppomax eval --task {cfg.task}` passes it, in Python pass gold_fn= (and prompts=)")
    if cfg.judge == "gold" and gold_fn is None and cfg.baseline_model_path:
        raise ConfigError("EvalConfig.judge = 'gold' needs --task with a gold judge; use --judge rm")
    device = resolve_device(cfg.device)
    if cfg.full_determinism:
        seed_run(cfg.seed, full_determinism=True)  # before any model reaches the GPU (cuBLAS workspace)
    rc = cfg.trust_remote_code
    tokenizer = M.load_tokenizer(cfg.model_name_or_path, trust_remote_code=rc)
    if prompts is None:
        rows, n_bad = D.load_rows(cfg.dataset, "prompt", skip_bad_rows=cfg.skip_bad_rows, vocab_size=len(tokenizer))
        prompts = rows[: cfg.num_prompts]  # canonical rows: text, messages or input_ids
    prompt_ids = [D.fit_prompt(D.row_prompt_ids(tokenizer, p) if isinstance(p, dict) else D.encode_prompt(tokenizer, p),
                               cfg.max_prompt_length, "left") for p in prompts]

    def load(path):
        return M.load_causal_lm(path, trust_remote_code=rc).to(device) if path else None

    policy = load(cfg.model_name_or_path)
    ref = load(cfg.ref_model_path or cfg.baseline_model_path)
    rm = M.ScalarHeadModel.from_pretrained(cfg.reward_model_path, trust_remote_code=rc).to(device) if cfg.reward_model_path else None
    for m in (policy, ref, rm):
        if m is not None:
            m.eval()
    kw = dict(response_length=cfg.response_length, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
              batch_size=cfg.batch_size, reward_model=rm, seed=cfg.seed, disable_tqdm=cfg.disable_tqdm, judge=gold_fn)
    engine = make_engine(cfg, policy, tokenizer)  # the policy's samples: hf, or vLLM with --rollout_engine vllm
    try:
        s_pol = sample_responses(policy, tokenizer, prompt_ids, ref_policy=ref, engine=engine, **kw)
    finally:
        engine.close()
    result: dict[str, Any] = {"policy": cfg.model_name_or_path}

    def judge(s):  # the win rate's judge: the task's gold judge, or the reward model (--judge)
        return s["gold"] if cfg.judge == "gold" and gold_fn is not None else s["rm"]

    gold = s_pol.get("gold")
    result["metrics"] = summarize(s_pol, gold)
    if cfg.baseline_model_path:
        s_base = sample_responses(load(cfg.baseline_model_path), tokenizer, prompt_ids, **kw)
        result["metrics"].update(Baseline(judge(s_base), "baseline", s_base).versus(judge(s_pol)))
        result["baseline"] = summarize(s_base, s_base.get("gold"))
    result["samples"] = [
        {"prompt": p, "response": r, "gold": (gold[i] if gold else None), "rm": (s_pol["rm"][i] if s_pol["rm"] else None)}
        for i, (p, r) in enumerate(zip(s_pol["prompts"][: cfg.num_samples], s_pol["responses"][: cfg.num_samples]))
    ]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")

    def cell(v):
        return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    base_m = result.get("baseline")  # its own metrics beside the policy's (win rates: the policy's only)
    head = ["metric", "value", *(["baseline"] if base_m else [])]
    lines = [f"# Evaluation of `{cfg.model_name_or_path}`", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for k, v in result["metrics"].items():
        lines.append("| " + " | ".join([k, cell(v), *([cell(base_m.get(k))] if base_m else [])]) + " |")
    lines += ["", "## Samples", ""] + [f"- **{s['prompt']}** {s['response']}" for s in result["samples"]]
    (out / "eval.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps(result["metrics"], indent=2))
    print(f"written: {out / 'eval.json'} and {out / 'eval.md'}")
    return result
