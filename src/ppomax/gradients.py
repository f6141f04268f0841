"""Gradients after the backward pass: summed over ranks (data parallel), clipped to a global norm.

Apart from :mod:`ppomax.training` because it needs the process group (:mod:`ppomax.distributed`),
which itself asks training.py for the device: one direction of import each."""

from __future__ import annotations

import torch

from ppomax import distributed as dist_lib
from ppomax import sharding


def reduce_and_clip(model: torch.nn.Module, d, sharded: bool, max_norm: float | None) -> float:
    """Sum ``model``'s gradients over ranks (under FSDP the reduce-scatter already has), clip them
    to the global L2 norm ``max_norm`` when set, and return that norm (before clipping)."""

    if sharded:
        return sharding.clip_grad_norm([p for p in model.parameters() if p.grad is not None], max_norm)
    dist_lib.sum_gradients(model.parameters(), d)
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return grad_norm(params)


def grad_norm(parameters) -> float:
    """Global L2 norm of the gradients (what clip_grad_norm_ would clip)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    if not norms:
        return 0.0
    return torch.linalg.vector_norm(torch.stack(norms)).item()
