"""Advantage estimators: GAE (paper Eq. 12-13) and the critic-free GRPO, RLOO and REINFORCE++ (issue #14)."""

from __future__ import annotations

import torch

from ppomax.functional.reductions import whiten

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
