"""Sampling one token per row, and the decode loop's per-step bookkeeping.

Shared by the eager decode loop (``ppomax.ppo.rollout.generate``) and the CUDA-graph decoder
(``ppomax.engines.graph_decode``), so both sample the same way: the same random draws in the same
order, the same EOS handling, the same log π(a_t|s_t). Every operation here is free of host
synchronisation (no ``.item()``, no data-dependent shapes: ``torch.isin`` on CUDA sorts and calls
``unique`` for larger inputs, so EOS membership is a broadcast compare), so a CUDA graph can
capture it; the step column is a tensor for the same reason.

Shapes: B = rows, V = vocabulary, N = max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sample_from_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sample one token per row from logits (B, V) / temperature, with optional top-k / top-p."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop tokens once the mass *before* them already exceeds top_p (keeps at least one)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return sample_categorical(torch.softmax(logits, dim=-1))


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``probs`` (B, V) by inverting the CDF with one uniform number per row.

    The same distribution as ``torch.multinomial(probs, 1)``, which on CPU draws V exponential
    variates per row (a third of a small model's generation time). The CDF is accumulated in
    float64; ``u`` lies in (0, total] and the first index with cdf >= u is taken, so a token of
    probability 0 (cut by top-k / top-p) can never be drawn.
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    u = (1.0 - torch.rand((probs.shape[0], 1), dtype=cdf.dtype, device=probs.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def is_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """``tokens`` (...,) long is any of the ids ``eos`` (E,): ``torch.isin`` without its host syncs."""
    return (tokens[..., None] == eos).any(-1)


@dataclass
class DecodeBuffers:
    """The decode loop's outputs, preallocated and written one column per step."""

    tokens: torch.Tensor  # (B, N) long, pad-filled: the sampled ids
    mask: torch.Tensor  # (B, N) float, 1 up to and including a row's first EOS (with stop_at_eos)
    logps: torch.Tensor | None  # (B, N) float32 log π(a_t|s_t) at the temperature, or None
    finished: torch.Tensor  # (B,) bool, the row has sampled an EOS (with stop_at_eos)
    ended_with_eos: torch.Tensor  # (B,) bool

    @classmethod
    def new(cls, B: int, N: int, pad_token_id: int, device, with_logps: bool) -> DecodeBuffers:
        return cls(torch.full((B, N), pad_token_id, dtype=torch.long, device=device),
                   torch.zeros((B, N), dtype=torch.float32, device=device),
                   torch.zeros((B, N), dtype=torch.float32, device=device) if with_logps else None,
                   torch.zeros(B, dtype=torch.bool, device=device), torch.zeros(B, dtype=torch.bool, device=device))

    def reset(self, pad_token_id: int) -> None:
        """Back to the state ``new`` makes, in place (a captured graph keeps reading these tensors)."""
        self.tokens.fill_(pad_token_id)
        self.mask.zero_()
        if self.logps is not None:
            self.logps.zero_()
        self.finished.zero_()
        self.ended_with_eos.zero_()


def sample_step(buf: DecodeBuffers, next_logits: torch.Tensor, col: torch.Tensor, temperature: float, top_k: int,
                top_p: float, pad_token_id: int, eos: torch.Tensor | None, check_eos: bool) -> torch.Tensor:
    """Sample token t from ``next_logits`` (B, V) and write column ``col`` ((1,) long, = t) of ``buf``.

    With ``check_eos``, rows that already ended get ``pad_token_id`` and mask 0, and a row ends at
    its first id in ``eos``. Returns the sampled tokens (B,), the input of the next step.
    """
    tok = sample_from_logits(next_logits, temperature, top_k, top_p)
    if check_eos:
        tok = torch.where(buf.finished, torch.full_like(tok, pad_token_id), tok)
        buf.mask.index_copy_(1, col, (~buf.finished).float()[:, None])
        new_eos = is_eos(tok, eos) & ~buf.finished
        buf.ended_with_eos |= new_eos
        buf.finished |= new_eos
    buf.tokens.index_copy_(1, col, tok[:, None])
    if buf.logps is not None:
        z = next_logits.float() / temperature
        buf.logps.index_copy_(1, col, z.gather(-1, tok[:, None]) - torch.logsumexp(z, dim=-1, keepdim=True))
    return tok


def finish(buf: DecodeBuffers, T: int, check_eos: bool, eos: torch.Tensor | None, copy: bool = False) -> tuple:
    """(response_ids (B, T), mask (B, T), truncated (B,)[, logps (B, T)]) from the first T columns.

    Without ``check_eos`` every response runs to the cap; truncated still means "no EOS in it".
    ``copy``: return fresh tensors (the buffers are reused by the next call).
    """
    tokens, mask = buf.tokens[:, :T], buf.mask[:, :T]
    logps = buf.logps[:, :T] if buf.logps is not None else None
    if copy:
        tokens, mask = tokens.clone(), mask.clone()
        logps = logps.clone() if logps is not None else None
    ended = buf.ended_with_eos
    if not check_eos:
        mask.fill_(1.0)
        if eos is not None:
            ended = is_eos(tokens, eos).any(dim=1)
    truncated = ~ended
    return (tokens, mask, truncated, logps) if logps is not None else (tokens, mask, truncated)
