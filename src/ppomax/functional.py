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
# Critic-free advantage estimators (issue #14). ``scores`` (B,) hold k samples of each prompt
# next to each other: rows [g·k, (g+1)·k) are the group of prompt g.
# ---------------------------------------------------------------------------------------------


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) with B divisible by group_size = {group_size}")
    return scores.view(-1, group_size)  # (B / k, k)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3 outcome supervision): Â_i = (r_i − mean_g) / (std_g + ε),
    the same for every token of response i. std_g is the sample (unbiased) std of the group, as in the
    reference implementations. ``scale=False`` is Dr. GRPO (Liu et al. 2025): Â_i = r_i − mean_g, since
    dividing by std_g up-weights prompts whose answers barely differ. (B,) -> (B,)."""
    g = _groups(scores.float(), group_size)
    if group_size < 2:
        raise ValueError("grpo_advantages needs group_size >= 2 (one sample has no group baseline)")
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.flatten()


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): Â_i = r_i − mean of the other k − 1 rewards of its group, an unbiased
    leave-one-out baseline. Equal to k/(k−1) · (r_i − mean_g). (B,) -> (B,)."""
    if group_size < 2:
        raise ValueError("rloo_advantages needs group_size >= 2 (the baseline is the mean of the others)")
    g = _groups(scores.float(), group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).flatten()


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            whiten_returns: bool = True) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): token-level returns G_t = Σ_{s ≥ t} γ^{s−t} r_s of the (KL-shaped) token
    rewards, whitened over every response token of the batch (global, not per group, which is what
    separates it from GRPO). rewards, mask (B, T) -> (B, T), zero outside the mask.
    ``whiten_returns=False`` returns G_t itself, for a caller that whitens over several processes."""
    rewards = rewards * mask  # right-padded: past a response's end the rewards are 0, so G stays 0 there
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return whiten(returns * mask, mask) if whiten_returns else returns * mask


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
