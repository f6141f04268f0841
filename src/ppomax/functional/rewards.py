"""Rewards: the KL estimators, token-level reward shaping, and score processing (paper Eq. 18)."""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------
# KL to the reference (paper Sec. 5.3.1, Fig. 5 detail 1)
# ---------------------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from sampled tokens (a ~ π).

    - ``k1`` = log π − log π_ref: unbiased, can be negative per token.
    - ``k2`` = ½ (log π − log π_ref)²: biased, low variance, ≥ 0.
    - ``k3`` = (ρ − 1) − log ρ with ρ = π_ref/π: unbiased and ≥ 0
      (http://joschu.net/blog/kl-approx.html).

    ``mask`` (B, T): the log-ratio is 0 outside it *before* the exponential (as in :func:`policy_loss`),
    so a padding position's arbitrary log π cannot overflow k3 to inf (inf · 0 = NaN in a masked mean).
    """
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        log_ratio = torch.where(mask > 0, log_ratio, 0.0)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # log ρ = ref − logp = −log_ratio
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"kl_estimator must be one of 'k1', 'k2', 'k3', got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last response token per row of a right-padded mask (B, T) -> (B,).

    Rows with an empty response get index 0 (their score is masked out anyway).
    """
    return (mask.sum(-1).long() - 1).clamp(min=0)


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Token-level rewards: r_t = −η·KL_t, plus the sequence score on the last response token.

    scores (B,), kl (B, T), mask (B, T) -> rewards (B, T), zero outside the mask.
    (Paper Sec. 3.2 / 5.3.1: the KL penalty is per token, the RM score arrives at EOS.)
    """
    rewards = -kl_coef * kl * mask
    idx = last_token_index(mask)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), idx] += scores.to(rewards.dtype)
    return rewards * mask


# ---------------------------------------------------------------------------------------------
# Running statistics and score processing (paper Eq. 18, Fig. 5 details 4-5)
# ---------------------------------------------------------------------------------------------


class RunningMoments:
    """Mean and standard deviation over every value seen so far (Chan et al. parallel update).

    PPO-max normalises rewards with the moments of the whole reward history (Eq. 18), not of
    the current batch, so a batch of uniformly good answers still gets positive rewards.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.var = 1.0  # population variance; 1.0 until data arrives so std starts at 1

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 else 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean = x.mean().item()
        b_var = x.var(unbiased=False).item()
        if self.count == 0:
            self.mean, self.var, self.count = b_mean, b_var, n
            return
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])


def normalize_and_clip(scores: torch.Tensor, mean: float, std: float, clip: float | None) -> torch.Tensor:
    """Eq. 18: r̃ = clip((r − μ)/σ, −δ, δ). ``clip=None`` only normalises."""
    out = (scores - mean) / max(std, 1e-8)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


def penalise_missing_eos(processed: torch.Tensor, truncated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """r̃ − penalty on responses without EOS (TRL's missing_eos_penalty), applied to the *processed* score:
    after Eq. 18's normalisation and clip, in its units (σ of the score history under PPO-max). Applied to the
    raw score instead, the clip to [−δ, δ] would give a truncated response above μ + δσ + penalty (or below
    μ − δσ) the same r̃ as one that stopped. processed, truncated (B,) -> (B,); ``penalty=None``: off."""
    if penalty is None:
        return processed
    return processed - penalty * truncated.to(processed.dtype)


def scale_rewards(scores: torch.Tensor, std: float) -> torch.Tensor:
    """Reward scaling (Fig. 5 detail 4): r / σ_running, no shift."""
    return scores / max(std, 1e-8)


class AdaptiveKLController:
    """Adaptive η (Ziegler et al. 2019): move η so that the observed KL tracks ``target``.

    η ← η · (1 + clip(KL/target − 1, −0.2, 0.2) · n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
