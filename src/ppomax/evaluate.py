"""Evaluation of a policy on held-out prompts.

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


@torch.no_grad()
def sample_responses(
    policy, tokenizer, prompt_ids: list[list[int]], response_length: int, temperature: float = 1.0,
    batch_size: int = 64, ref_policy=None, reward_model=None, seed: int = 0, disable_tqdm: bool = True,
    top_k: int = 0, top_p: float = 1.0, engine=None, logprobs: bool = True,
) -> dict[str, Any]:
    """Sample one response per prompt; return texts and per-response statistics (lists).

    Responses end at any EOS id of the tokenizer and the policy's generation_config. ``nll`` and
    ``kl`` are under the full temperature-scaled softmax (as in PPO), also when top-k / top-p
    truncate the sampling. ``engine``: a rollout engine (ppomax.engines) to sample with; default
    the ``hf`` engine on ``policy``. ``logprobs=False`` (and no ``ref_policy``) skips the policy's
    forward pass over its samples (about as many FLOPs as sampling them); ``nll`` then stays empty."""
    from ppomax.data import collate_prompts
    from ppomax.engines import Sampling
    from ppomax.engines.hf import HFEngine
    from ppomax.models import eos_token_ids
    from ppomax.ppo.rollout import response_logprobs, reward_model_scores
    from ppomax.training import forked_rng, progress

    device = next(policy.parameters()).device
    policy.eval()
    sampling = Sampling(response_length, tuple(eos_token_ids(tokenizer, policy)), tokenizer.pad_token_id,
                        temperature, top_k, top_p)
    engine = engine or HFEngine(policy)
    out: dict[str, list] = {k: [] for k in ("prompts", "responses", "truncated", "length", "nll", "kl", "rm")}
    # evaluation sampling must not depend on (or disturb) the caller's RNG streams, on any device
    with forked_rng(seed):
        for s in progress(range(0, len(prompt_ids), batch_size), desc="eval", disable=disable_tqdm):
            batch = collate_prompts(prompt_ids[s : s + batch_size], tokenizer.pad_token_id)
            p_ids, p_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            gen = engine.generate(p_ids, p_mask, sampling)
            resp, mask, trunc = gen.response_ids, gen.mask, gen.truncated
            parts = (p_ids, p_mask, resp, mask)
            if logprobs or ref_policy is not None:
                logp = response_logprobs(policy, parts, temperature) * mask
                out["nll"] += (-(logp.sum(-1))).tolist()
            out["length"] += mask.sum(-1).tolist()
            out["truncated"] += trunc.tolist()
            if ref_policy is not None:
                ref_logp = response_logprobs(ref_policy, parts, temperature) * mask
                out["kl"] += (logp - ref_logp).sum(-1).tolist()
            if reward_model is not None:
                out["rm"] += reward_model_scores(reward_model, *parts).float().tolist()
            for ids, m in zip(p_ids, p_mask):
                out["prompts"].append(tokenizer.decode(ids[m.bool()], skip_special_tokens=True))
            for ids, m in zip(resp, mask):
                out["responses"].append(tokenizer.decode(ids[m.bool()], skip_special_tokens=True))
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


def evaluate(cfg) -> dict[str, Any]:
    """`ppomax eval`: load the models named in ``cfg`` (an EvalConfig), sample, score, write files."""
    from ppomax import data as D
    from ppomax import models as M
    from ppomax.training import resolve_device, seed_run

    device = resolve_device(cfg.device)
    if cfg.full_determinism:
        seed_run(cfg.seed, full_determinism=True)  # before any model reaches the GPU (cuBLAS workspace)
    rc = cfg.trust_remote_code
    tokenizer = M.load_tokenizer(cfg.model_name_or_path, trust_remote_code=rc)
    gold_fn: Callable | None = None
    if cfg.task == "reviews":
        from ppomax.tasks import reviews

        gold_fn = reviews.gold_scores
        prompts = reviews.prompts(cfg.num_prompts, seed=cfg.seed + 99) if cfg.dataset is None else None
    else:
        prompts = None
    if prompts is None:
        rows, n_bad = D.load_rows(cfg.dataset, "prompt", skip_bad_rows=cfg.skip_bad_rows, vocab_size=len(tokenizer))
        prompts = rows[: cfg.num_prompts]  # canonical rows: text, messages or input_ids
    if cfg.judge == "gold" and gold_fn is None and cfg.baseline_model_path:
        from ppomax.config import ConfigError

        raise ConfigError("EvalConfig.judge = 'gold' needs --task with a gold judge; use --judge rm")
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
              batch_size=cfg.batch_size,
              reward_model=rm, seed=cfg.seed, disable_tqdm=cfg.disable_tqdm)
    from ppomax.engines import make_engine

    engine = make_engine(cfg, policy, tokenizer)  # the policy's samples: hf, or vLLM with --rollout_engine vllm
    try:
        s_pol = sample_responses(policy, tokenizer, prompt_ids, ref_policy=ref, engine=engine, **kw)
    finally:
        engine.close()
    result: dict[str, Any] = {"policy": cfg.model_name_or_path}

    def judge(s):
        if cfg.judge == "gold" and gold_fn is not None:
            return gold_fn(s["prompts"], s["responses"], s["truncated"])
        return s["rm"]

    gold = gold_fn(s_pol["prompts"], s_pol["responses"], s_pol["truncated"]) if gold_fn else None
    result["metrics"] = summarize(s_pol, gold)
    if cfg.baseline_model_path:
        base = load(cfg.baseline_model_path)
        s_base = sample_responses(base, tokenizer, prompt_ids, **kw)
        wr, ci = win_rate_with_ci(judge(s_pol), judge(s_base))
        result["metrics"]["win_rate_vs_baseline"] = wr
        result["metrics"]["win_rate_ci"] = ci
        result["baseline"] = summarize(s_base, gold_fn(s_base["prompts"], s_base["responses"], s_base["truncated"]) if gold_fn else None)
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

