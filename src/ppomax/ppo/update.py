"""The update's pieces around the PPO loss (the loss itself: ``PPOTrainer._micro_step``).

The trainer's ``update`` runs num_ppo_epochs passes over the rollout batch in mini-batches (one
optimizer step each) split into micro-batches (gradients accumulate). Around the loss:

- :func:`minibatch_advantages`: Â whitened per mini-batch over every rank's tokens (Sec. 5.3.1,
  detail 6; GAE only, the critic-free estimators are normalised already) and clipped.
- :func:`loss_divisor`: what each token loss is divided by, so that the micro-batches of every rank
  add up to the one-process mini-batch mean (OpenRLHF's rule, STYLE.md; ppomax/distributed.py).
- :func:`ptx_loss`: PPO-ptx's language-model loss (Eq. 17).
- :func:`optimizer_step`: clip, and step only when every loss and gradient norm was finite on every
  rank (docs/reliability.md §2).
- :class:`UpdateStats`: the logged means of the update's statistics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from ppomax import distributed as dist_lib
from ppomax import functional as F
from ppomax.config import PPOConfig
from ppomax.gradients import reduce_and_clip
from ppomax.ppo.rollout import Experience
from ppomax.training import autocast

logger = logging.getLogger("ppomax")


def minibatch_advantages(cfg: PPOConfig, mb: Experience, d: dist_lib.Dist) -> torch.Tensor:
    """Â (B_mb, T) of a mini-batch as the policy loss takes it: whitened over the whole mini-batch (every rank's
    tokens) when ``whiten_advantages`` and the estimator has a critic, clipped to ±``advantage_clip``."""
    adv = mb.advantages
    if cfg.whiten_advantages and cfg.uses_critic:  # the critic-free estimators are normalised already,
        adv = dist_lib.whiten(adv, mb.mask, d)  # per group or over the batch
    if cfg.advantage_clip is not None:
        adv = adv.clamp(-cfg.advantage_clip, cfg.advantage_clip)
    return adv


def loss_divisor(cfg: PPOConfig, mb: Experience, d: dist_lib.Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_tok, norm): the mini-batch's response tokens over all ranks, and what token losses are divided by.

    Token losses divided by the global token count, with the gradients summed over ranks
    (dist_lib.sum_gradients), are exactly the one-process mini-batch mean. ``token_sum`` (Dr. GRPO) divides
    by a constant instead, responses × response_length, whatever the responses' lengths."""
    n_tok = dist_lib.all_reduce_sum(mb.mask.sum(), d)
    if cfg.loss_reduction == "token_mean":
        return n_tok, n_tok
    responses = dist_lib.all_reduce_sum(torch.tensor(float(mb.scores.numel()), device=mb.mask.device), d)
    return n_tok, responses * cfg.response_length


def ptx_loss(cfg: PPOConfig, policy, examples: Sequence, sampler, pad_id: int, device: torch.device) -> torch.Tensor:
    """PPO-ptx (Eq. 17): the policy's LM loss (token mean) on a micro-batch of SFT / pre-training rows drawn by
    ``sampler``; the caller scales it by λ_ptx."""
    from ppomax.data import collate_sft

    idx = sampler.take(min(cfg.per_device_train_batch_size, len(examples)))
    batch = collate_sft([examples[i] for i in idx], pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast(device, cfg.bf16, cfg.fp16):
        out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return F.masked_mean(*F.next_token_nll(out.logits, batch["labels"]))


def optimizer_step(trained: Sequence[tuple[str, torch.nn.Module, torch.optim.Optimizer]], d: dist_lib.Dist,
                   sharded: bool, max_grad_norm: float | None, nonfinite: Sequence[str],
                   iteration: int) -> dict[str, Any]:
    """Sum the gradients over ranks, clip, and step each (name, model, optimizer) of ``trained`` unless this
    step must be skipped: a non-finite loss was seen since the last step (``nonfinite``: its causes), or a
    gradient norm is NaN/inf, on this rank or another (the decision is the same on every rank). The
    gradients are cleared either way. Returns grad_norm/<name>, ``skipped`` (0.0 or 1.0) and, when skipped,
    ``skip_cause``."""
    stats: dict[str, Any] = {}
    norms = {}
    for name, model, _ in trained:
        norms[name] = reduce_and_clip(model, d, sharded, max_grad_norm)
        stats[f"grad_norm/{name}"] = norms[name]
    bad = [n for n, v in norms.items() if not math.isfinite(v)]
    causes = list(dict.fromkeys(nonfinite))
    if bad:
        causes.append(f"non-finite gradient norm ({', '.join(bad)})")
    if not dist_lib.all_true(not causes, d) and not causes:  # skip decisions agree on every rank
        causes.append("non-finite loss on another rank")
    if causes:  # this step only; the iteration counts as skipped when all its steps are (PPOTrainer.step)
        logger.warning("iteration %d: mini-batch update skipped: %s", iteration, "; ".join(causes))
    else:
        for _, _, opt in trained:
            opt.step()
    stats.update(skipped=float(bool(causes)), **({"skip_cause": "; ".join(causes)} if causes else {}))
    for _, _, opt in trained:
        opt.zero_grad(set_to_none=True)
    return stats


class UpdateStats:
    """The statistics of one update: a value per optimizer step (mini-batch) for each name, logged as their
    mean. ``skipped`` becomes the share of skipped steps (dropped when none was), ``skip_cause`` the distinct
    causes joined."""

    def __init__(self) -> None:
        self.values: dict[str, list] = {}

    def add(self, stats: dict[str, Any]) -> None:
        for k, v in stats.items():
            self.values.setdefault(k, []).append(v)

    def means(self) -> dict[str, Any]:
        values = dict(self.values)
        causes = values.pop("skip_cause", [])
        out: dict[str, Any] = {k: float(sum(v) / len(v)) for k, v in values.items()}
        if causes:
            out["skip_cause"] = "; ".join(dict.fromkeys(causes))
        elif "skipped" in out:
            del out["skipped"]
        return out
