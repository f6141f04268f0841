"""Masked reductions: the one place that decides how token losses are reduced (see :func:`masked_mean`)."""

from __future__ import annotations

import torch

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
    denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=x.dtype, device=x.device)
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
