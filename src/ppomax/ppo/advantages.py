"""The advantage estimator, picked by name in this one place (PPOConfig.advantage_estimator).

Input: the processed scores r̃ (B,) (:func:`process_scores`: normalisation and clipping of Eq. 18,
then the missing-EOS penalty), the per-token KL estimate to π_ref (B, T), the response mask (B, T) and, for GAE, the
critic's values (B, T). The k samples of a prompt are contiguous rows (PPOConfig.num_samples_per_prompt).

- ``gae`` (PPO-max): token rewards −η·KL_t with r̃ at the last token (Sec. 5.3.1), then GAE
  (Eq. 12–13) against the critic.
- ``reinforce_pp`` (REINFORCE++, Hu 2025): the same token rewards, returns with γ, whitened over
  the batch.
- ``grpo`` (Shao et al. 2024) / Dr. GRPO (Liu et al. 2025) and ``rloo`` (Ahmadian et al. 2024): one
  sequence reward r̃ − η·Σ_t KL_t per response, a baseline from the other samples of its prompt,
  the same advantage on every token.

With ``kl_in_reward`` off, η enters none of these (the trainer adds η·k3 to the policy loss instead).
"""

from __future__ import annotations

import torch

from ppomax import distributed as dist_lib
from ppomax import functional as F
from ppomax.config import PPOConfig


def process_scores(cfg: PPOConfig, scores: torch.Tensor, truncated: torch.Tensor,
                   moments: F.RunningMoments) -> torch.Tensor:
    """r̃ (B,) from the raw scores (B,): Eq. 18 normalisation with the running moments of every raw score so
    far and clipping to [−δ, δ] (PPO-max), or scaling by the running std, or clipping alone, as the config
    says; then ``missing_eos_penalty`` off the responses without EOS, in r̃'s units (docs/options.md: after
    the clip, so that it holds at every score level; the moments never see it)."""
    if cfg.reward_normalize:
        r = F.normalize_and_clip(scores, moments.mean, moments.std, cfg.reward_clip)
    else:
        r = F.scale_rewards(scores, moments.std) if cfg.reward_scaling else scores
        r = r.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip is not None else r
    return F.penalise_missing_eos(r, truncated, cfg.missing_eos_penalty)


def estimate(cfg: PPOConfig, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
             values: torch.Tensor | None, kl_coef: float,
             d: dist_lib.Dist | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token rewards (B, T), advantages Â (B, T), returns (B, T)); critic-free estimators return Â as
    the returns (there is no value target). Batch whitening (``whiten_rewards``, REINFORCE++) takes its
    moments over every rank's tokens (``d``), so N processes compute the one-process batch's values."""
    d = d if d is not None else dist_lib.Dist()  # one process
    eta = kl_coef if cfg.kl_in_reward else 0.0
    rewards = F.shape_rewards(scores, kl, mask, eta)
    if cfg.whiten_rewards:  # unit variance, mean kept (F.whiten's shift_mean=False), over all ranks
        s = dist_lib.all_reduce_sum(torch.stack([(rewards * mask).sum(), mask.sum()]).double(), d)
        rewards = dist_lib.whiten(rewards, mask, d) + (s[0] / s[1].clamp(min=1.0)).to(rewards.dtype) * mask
    est = cfg.advantage_estimator
    if est == "gae":
        advantages, returns = F.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        return rewards, advantages, returns
    if est == "reinforce_pp":
        advantages = dist_lib.whiten(F.reinforce_pp_advantages(rewards, mask, cfg.gamma, whiten_returns=False), mask, d)
        return rewards, advantages, advantages
    seq_reward = F.masked_sum(rewards, mask, dim=-1)  # r̃ − η·Σ_t KL_t (rewards are 0 off the mask)
    k = cfg.num_samples_per_prompt
    if est == "grpo":
        per_response = F.grpo_advantages(seq_reward, k, scale=cfg.grpo_scale_rewards)
    elif est == "rloo":
        per_response = F.rloo_advantages(seq_reward, k)
    else:
        raise ValueError(f"unknown advantage_estimator {est!r}")
    advantages = per_response[:, None] * mask
    return rewards, advantages, advantages
