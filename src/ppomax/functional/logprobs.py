"""Log-probabilities and entropy: from logits, and from hidden states chunked over rows (issue #13)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
# Log-probs and entropy from the hidden states, chunked over rows (issue #13 item 4): the LM
# head's (rows, V) logits exist one chunk at a time and are recomputed in the backward pass
# instead of being kept for it. At V = 49 152 (SmolLM2) that takes ~80 % off the peak of a no-grad
# rollout forward and ~30 % off a training step's (16 × 64 response tokens; benchmarks/README.md).
# ---------------------------------------------------------------------------------------------

CHUNK_LOGITS = 1 << 23  # default chunk: rows · V ≈ 8 M logits (32 MiB in fp32), ~170 rows at V = 49 152


def _head_dtypes(hidden: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, softmax dtype): the matmul runs in what autocast would pick for the LM head's
    ``linear`` (the hidden states' own dtype without autocast; autocast leaves float64 alone), the
    logsumexp in float32 at least, as :func:`logprobs_from_logits` casts the logits."""
    dev = hidden.device.type
    mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and hidden.dtype != torch.float64 else hidden.dtype
    return mm, torch.promote_types(mm, torch.float32)


def _chunk_logits(h, w, b, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """z = (h Wᵀ + b) / τ for one chunk of rows (n, H) -> (n, V) in ``acc``; w, b already in the matmul dtype."""
    with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen by _head_dtypes
        z = F.linear(h.to(w.dtype), w, b)
    return z.to(acc).div_(temperature)


class _ChunkedLogprobs(torch.autograd.Function):
    """Rows (N, H) -> log π(tokens) (N,) [and H(π) (N,)]. Saves hidden, weight, bias, tokens and the
    per-row logsumexp (and entropy): O(N·H + V·H), never O(N·V)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk, with_entropy):
        mm, acc = _head_dtypes(hidden)
        w, b = weight.to(mm), (None if bias is None else bias.to(mm))  # one cast per call, not per chunk
        N = hidden.shape[0]
        logp, lse = hidden.new_empty(N, dtype=acc), hidden.new_empty(N, dtype=acc)
        ent = hidden.new_empty(N if with_entropy else 0, dtype=acc)
        for s in range(0, N, chunk):
            z = _chunk_logits(hidden[s : s + chunk], w, b, temperature, acc)  # (n, V)
            lse_c = torch.logsumexp(z, dim=-1)
            logp[s : s + chunk] = z.gather(-1, tokens[s : s + chunk, None]).squeeze(-1) - lse_c
            lse[s : s + chunk] = lse_c
            if with_entropy:  # H = logsumexp(z) − Σ softmax(z)·z, as entropy_from_logits
                ent[s : s + chunk] = lse_c - (z.sub(lse_c[:, None]).exp_() * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, ent)
        ctx.temperature, ctx.chunk, ctx.mm = temperature, chunk, mm
        ctx.set_materialize_grads(False)  # an unused entropy output gets no gradient term at all
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_ent is None) or not (need_h or need_w or need_b):
            return (None,) * 7
        mm, acc, chunk = ctx.mm, lse.dtype, ctx.chunk
        w, b = weight.to(mm), (None if bias is None else bias.to(mm))
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # (V, H) in acc, allocated by the first chunk's product
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logq = _chunk_logits(h, w, b, ctx.temperature, acc).sub_(lse[s : s + chunk, None])  # log softmax
            p = logq.exp()
            # in place throughout: two (n, V) buffers per chunk
            if grad_ent is not None:  # H = −Σ p log p  =>  ∂H/∂z_j = −p_j (log p_j + H)
                ent_term = logq.add_(ent[s : s + chunk, None]).mul_(p).mul_(grad_ent[s : s + chunk, None])
            del logq
            if grad_logp is not None:  # ∂ log p_a / ∂z_j = 1[j = a] − p_j
                g = p.mul_(-grad_logp[s : s + chunk, None])
                g.scatter_add_(-1, tokens[s : s + chunk, None], grad_logp[s : s + chunk, None])
                if grad_ent is not None:
                    g.sub_(ent_term)
            else:
                g = ent_term.neg_()
            g = g.div_(ctx.temperature).to(mm)  # z = logits / τ
            if need_h:
                grad_h[s : s + chunk] = g @ w
            if need_w:  # in place when the dtypes allow: a (V, H) temporary per chunk would double the peak
                if grad_w is None or mm != acc:
                    part = g.t() @ h.to(mm)
                    grad_w = part.to(acc) if grad_w is None else grad_w.add_(part)
                else:
                    grad_w.addmm_(g.t(), h.to(mm))
            if need_b:
                grad_b += g.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax((hidden Wᵀ + b) / τ)[tokens] (and the entropy), without the full-vocabulary logits.

    hidden (..., H), weight (V, H), bias (V,) or None, tokens (...) long -> logp (...) float32
    [, entropy (...)]. Equal to ``logprobs_from_logits(F.linear(hidden, weight, bias) / τ, tokens)``
    (and ``entropy_from_logits``) up to float rounding, with gradients w.r.t. hidden, weight and bias,
    the entropy's included. ``chunk_size`` rows at a time (default: ~``CHUNK_LOGITS`` logits per
    chunk); the backward recomputes each chunk's logits (one extra head matmul) instead of keeping
    (rows, V) of them. Under autocast the matmul runs in the autocast dtype, the softmax in float32.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}")
    if tokens.shape != hidden.shape[:-1]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must be hidden's shape without H: {tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be (V,) = ({weight.shape[0]},)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk = chunk_size if chunk_size is not None else max(1, CHUNK_LOGITS // weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = tokens.shape
    out = _ChunkedLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.reshape(-1),
                                 float(temperature), int(chunk), bool(with_entropy))
    if with_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)
