"""Pure RL math for PPO-max: functions of tensors and masks, nothing else.

Conventions (paper: Zheng et al. 2023, arXiv 2307.04964, "Secrets of RLHF ... Part I: PPO"):

- ``mask`` is ``(B, T)``, 1.0 on response tokens and 0.0 elsewhere. Responses are right-padded,
  so the response tokens of row ``b`` are positions ``0 .. mask[b].sum() - 1``.
- ``logprobs`` are ``log π(a_t | s_t)`` of the sampled tokens, ``(B, T)``.
- Token losses are reduced by :func:`masked_mean` with an optional ``num_tokens`` normaliser:
  this is the one place that decides the reduction. Passing the token count of the whole
  mini-batch makes split-and-accumulate over micro-batches equal to the full mini-batch loss.

Nothing here knows about models, data or accelerate; every function is unit-tested against
hand-derived values in ``tests/test_functional.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1 (over ``dim``, or everything)."""
    if dim is None:
        return (x * mask).sum()
    return (x * mask).sum(dim)


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    ``num_tokens`` overrides the denominator (only with ``dim=None``): the PPO update passes the
    token count of the whole mini-batch so that micro-batch losses add up to the mini-batch loss
    under gradient accumulation (the "one function owns the reduction" rule).
    """
    if dim is not None:
        return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)
    denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=x.dtype)
    return masked_sum(x, mask) / torch.clamp(denom, min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over the mask.

    Used for advantage normalisation (paper Sec. 5.3.1, Fig. 5 detail 6). Positions outside the
    mask are set to 0 so padded tokens never leak into a loss.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[tokens]`` without materialising the full (B, T, V) log-softmax.

    logits (B, T, V), tokens (B, T) -> (B, T). Computed in float32 for stability under bf16.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of each labelled next token: logits (B, L, V) at position t predict labels[:, t + 1].

    Returns (nll (B, L-1), mask (B, L-1)) with mask 0 where the label is -100 (prompt, padding);
    reduce with :func:`masked_mean` (SFT loss, PPO-ptx, the RM's LM term) or sum (eval).
    """
    labels = labels[:, 1:]
    mask = (labels != -100).float()
    nll = -logprobs_from_logits(logits[:, :-1], labels.clamp(min=0))
    return nll, mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H(π(·|s_t)) per position: logsumexp(z) − Σ softmax(z)·z.  (B, T, V) -> (B, T)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# ---------------------------------------------------------------------------------------------
# KL to the reference (paper Sec. 5.3.1, Fig. 5 detail 1)
# ---------------------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from sampled tokens (a ~ π).

    - ``k1`` = log π − log π_ref: unbiased, can be negative per token.
    - ``k2`` = ½ (log π − log π_ref)²: biased, low variance, ≥ 0.
    - ``k3`` = (ρ − 1) − log ρ with ρ = π_ref/π: unbiased and ≥ 0
      (http://joschu.net/blog/kl-approx.html).
    """
    log_ratio = logprobs - ref_logprobs
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
# Advantages (paper Eq. 12-13)
# ---------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    δ_t = r_t + γ V_{t+1} − V_t with V after the last response token = 0,
    Â_t = Σ_l (γλ)^l δ_{t+l}, R_t = Â_t + V_t.  All (B, T); zero outside the mask.
    """
    rewards = rewards * mask
    values = values * mask
    T = rewards.shape[-1]
    advantages_reversed = []
    last_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        # values/mask at t+1 are 0 past the end: the episode ends after the last response token.
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_adv)
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last_adv)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last_adv = (delta + gamma * lam * last_adv * next_mask) * mask[:, t]
        advantages_reversed.append(last_adv)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + values) * mask
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


class PolicyLossStats(NamedTuple):
    clipfrac: torch.Tensor  # share of tokens where the clipped term was active
    approx_kl: torch.Tensor  # k3 estimate of KL(π_old ‖ π_θ) on the sampled tokens
    ratio_mean: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped surrogate (paper Eq. 14): token mean of max(−Â·ρ, −Â·clip(ρ, 1−ε, 1+ε)).

    ρ_t = exp(log π_θ − log π_old). ``num_tokens``: see :func:`masked_mean`.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(pg1, pg2), mask, num_tokens=num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return loss, PolicyLossStats(clipfrac, approx_kl, ratio_mean)


class ValueLossStats(NamedTuple):
    clipfrac: torch.Tensor  # share of tokens where the clipped value error was the larger one
    value_mean: torch.Tensor


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, ValueLossStats]:
    """Clipped value loss (Fig. 5 detail 7): ½ · token mean of max((V−R)², (V_clip−R)²).

    V_clip = V_old + clip(V − V_old, −ε, ε). ``clip_eps=None`` gives the plain ½(V−R)².
    """
    err = (values - returns) ** 2
    if clip_eps is None:
        loss_tok = err
        clipfrac = torch.zeros((), device=values.device)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2
        loss_tok = torch.maximum(err, err_clip)
        with torch.no_grad():
            clipfrac = masked_mean((err_clip > err).float(), mask)
    loss = 0.5 * masked_mean(loss_tok, mask, num_tokens=num_tokens)
    with torch.no_grad():
        value_mean = masked_mean(values, mask)
    return loss, ValueLossStats(clipfrac, value_mean)


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss (paper Eq. 2): mean of −log σ(r_w − r_l) = softplus(r_l − r_w).

    softplus keeps it finite for large margins, where log(sigmoid(·)) underflows to −inf.
    """
    return F.softplus(rejected_rewards - chosen_rewards).mean()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the mask: 1 is a perfect critic, ≤ 0 is no better than a constant."""
    var_r = masked_var(returns, mask)
    if var_r <= 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(returns - values, mask) / var_r


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
