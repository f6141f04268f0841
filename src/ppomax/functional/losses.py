"""Losses: the clipped surrogate (paper Eq. 14), the clipped value loss, the Bradley-Terry loss (Eq. 2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ppomax.functional.reductions import masked_mean, masked_var

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
        return torch.tensor(float("nan"), device=values.device)
    return 1.0 - masked_var(returns - values, mask) / var_r
