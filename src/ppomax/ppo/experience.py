"""Rollout → Experience: the first arrow of an iteration (DESIGN.md; PPO_MAX.md "One PPO iteration").

The prompts of a rollout batch are sampled by the rollout engine (``ppomax.engines``: hf or vllm), each
response is scored, and the models' per-token log-probabilities and values are computed once, here, and
kept fixed through the update: log π_old, log π_ref, V_old (Sec. 3.2 of the paper; the "old" policy is
the one that sampled).

Shapes as in ppo/rollout.py: B responses (the k samples of a prompt are contiguous rows), P the prompt
length (left-padded), T the response length (right-padded). ``parts`` is the tuple
(prompt_ids (B, P), prompt_mask (B, P), response_ids (B, T), mask (B, T)) every forward here takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ppomax.config import PPOConfig
from ppomax.engines import Sampling
from ppomax.ppo.rollout import (
    Experience,
    cat_padded,
    maybe_compile,
    response_logprobs,
    response_values,
    reward_model_scores,
)
from ppomax.training import autocast

Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Forwards:
    """The trainer's models as functions of ``parts``: log π (B, T), V (B, T) and the score r(x, y) (B,).

    ``logprobs_fn`` / ``values_fn`` / ``scores_fn`` are ppo/rollout.py's ``response_logprobs`` /
    ``response_values`` / ``reward_model_scores``, through ``torch.compile`` when ``cfg.torch_compile``
    (issue #5; compiled on first call); the update's training forwards use the same functions.
    ``reward_fn`` (a ppo/reward_fn.RewardFunction) replaces the reward model when given.
    """

    def __init__(self, cfg: PPOConfig, policy, ref_policy, critic, reward_model, reward_fn, tokenizer,
                 device: torch.device) -> None:
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.policy, self.ref_policy, self.critic, self.reward_model = policy, ref_policy, critic, reward_model
        self.reward_fn = reward_fn
        self.logprobs_fn, self.values_fn, self.scores_fn = (
            maybe_compile(f, cfg.torch_compile) for f in (response_logprobs, response_values, reward_model_scores))

    def in_chunks(self, fn: Callable[..., torch.Tensor], parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``fn(*parts)`` over row chunks of per_device_train_batch_size, concatenated: a rollout
        forward over a few thousand tokens keeps its activations in cache (~25 % faster on CPU
        than one forward over the whole generation batch), and memory stays that of a micro-batch."""
        n, B = self.cfg.per_device_train_batch_size, parts[0].shape[0]
        if B <= n:
            return fn(*parts)
        return torch.cat([fn(*(x[s : s + n] for x in parts)) for s in range(0, B, n)], dim=0)

    def ref_logprobs(self, parts: Parts) -> torch.Tensor:
        """log π_ref (B, T): the reference model, or with LoRA the policy with its adapters disabled."""
        if self.ref_policy is not None:
            return self.logprobs_fn(self.ref_policy, parts, self.cfg.temperature)
        with self.policy.disable_adapter():
            return self.logprobs_fn(self.policy, parts, self.cfg.temperature)

    def score(self, p_ids, p_mask, resp, mask, rows=None, truncated=None) -> torch.Tensor:
        """r(x, y) (B,): the reward model at the last response token, or the reward_fn (ppo/reward_fn.py)."""
        if self.reward_fn is None:
            with autocast(self.device, self.cfg.bf16, self.cfg.fp16):
                return self.in_chunks(lambda *x: self.scores_fn(self.reward_model, *x),
                                      (p_ids, p_mask, resp, mask)).float()
        return self.reward_fn(self.tokenizer, p_ids, p_mask, resp, mask, rows, truncated)

    def decode(self, p_ids, p_mask, resp, mask) -> tuple[list[str], list[str]]:
        """(prompts, responses) as text, special tokens dropped."""
        tok = self.tokenizer
        prompts = [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(p_ids, p_mask)]
        responses = [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(resp, mask)]
        return prompts, responses


def old_logprobs_from_sampling(cfg: PPOConfig, engine_name: str) -> bool:
    """Take log π_old from the sampling logits (no policy forward) or recompute it with a forward.

    In fp32 the sampling logits give log π_old to ~1e-6, under autocast to ~1e-2, so 'auto' recomputes
    there (then the first ratio is exactly 1). vLLM's kernels differ numerically from the trainer's:
    'auto' means a forward there unless --vllm_logprobs_as_old (issue #12)."""
    if cfg.rollout_logprobs == "generate":
        return True
    if engine_name == "vllm":
        return cfg.vllm_logprobs_as_old
    return cfg.rollout_logprobs == "auto" and not (cfg.bf16 or cfg.fp16)


@torch.no_grad()
def make_experience(cfg: PPOConfig, engine, sampling: Sampling, forwards: Forwards, prompt_ids: list[list[int]],
                    rows: list[dict], pad_id: int) -> tuple[Experience, dict[str, float]]:
    """Roll out one response per entry of ``prompt_ids`` (a prompt repeated k times gets k samples) in
    generation batches of ``generation_batch_size``: generate, score, forward π_old / π_ref / V_old.
    ``rows``: the prompt rows, one per entry, for a reward_fn that asks for columns.

    Returns the Experience (tensors on ``forwards.device``; log-probs and values 0 off the response mask)
    and the seconds spent generating, scoring and forwarding (``time/*``); with the vLLM engine and a
    recomputed log π_old also ``rollout/logprob_gap_*``, |vLLM − trainer| on response tokens (docs/metrics.md).
    """
    from ppomax.data import collate_prompts

    device, policy, critic = forwards.device, forwards.policy, forwards.critic
    batch = collate_prompts(prompt_ids, pad_id)
    all_ids, all_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    timings = {"time/generate": 0.0, "time/score": 0.0, "time/forward": 0.0}
    chunks, gaps = [], []
    policy.eval()
    vllm = engine.name == "vllm"
    gen_logp = old_logprobs_from_sampling(cfg, engine.name)
    for s in range(0, len(prompt_ids), cfg.generation_batch_size):
        p_ids, p_mask = all_ids[s : s + cfg.generation_batch_size], all_mask[s : s + cfg.generation_batch_size]
        t = time.perf_counter()
        gen = engine.generate(p_ids, p_mask, sampling, return_logprobs=gen_logp or vllm)
        resp, mask, truncated = gen.response_ids, gen.mask, gen.truncated
        timings["time/generate"] += time.perf_counter() - t
        t = time.perf_counter()
        scores = forwards.score(p_ids, p_mask, resp, mask, rows[s : s + len(p_ids)], truncated)  # r(x, y) (B,)
        timings["time/score"] += time.perf_counter() - t
        t = time.perf_counter()
        parts = (p_ids, p_mask, resp, mask)
        with autocast(device, cfg.bf16, cfg.fp16):
            if gen_logp:
                logp = gen.logprobs
            else:
                logp = forwards.in_chunks(lambda *x: forwards.logprobs_fn(policy, x, cfg.temperature), parts)
            ref_logp = forwards.in_chunks(lambda *x: forwards.ref_logprobs(x), parts)
            values = (forwards.in_chunks(lambda *x: forwards.values_fn(critic.eval(), *x), parts)
                      if critic is not None else torch.zeros_like(mask))  # critic-free: no baseline
        timings["time/forward"] += time.perf_counter() - t
        if vllm and not gen_logp:
            gaps.append((gen.logprobs - logp.float()).abs()[mask.bool()])
        chunks.append((p_ids, p_mask, resp, mask, truncated, logp * mask, ref_logp * mask, values.float() * mask, scores))
    exp = Experience(*cat_padded(chunks, pad_id))
    if gaps and (g := torch.cat(gaps)).numel():
        timings.update({"rollout/logprob_gap_mean": g.mean().item(), "rollout/logprob_gap_max": g.max().item()})
    return exp, timings
