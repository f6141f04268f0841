"""The rollout-engine interface: what an engine is asked (:class:`Sampling`), what it returns
(:class:`Generation`) and its methods (:class:`RolloutEngine`). Every engine module imports these
from here; :mod:`ppomax.engines` re-exports them and picks the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    """What a rollout samples. Both engines give these settings the same meaning."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]  # a response ends at the first of any of them (EOS included in it)
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off (PPO refuses other values; eval accepts them)
    top_p: float = 1.0  # 1.0: off
    stop_at_eos: bool = True  # False: every response is max_new_tokens long


@dataclass
class Generation:
    """Sampled responses of one batch of B prompts; T = the longest response (<= max_new_tokens)."""

    response_ids: torch.Tensor  # (B, T) long, right-padded with pad_token_id
    mask: torch.Tensor  # (B, T) float, 1 on response tokens up to and including the EOS
    truncated: torch.Tensor  # (B,) bool, no EOS id among the sampled tokens
    logprobs: torch.Tensor | None = None  # (B, T) the engine's log π(a_t|s_t) at the temperature, 0 on padding


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling,
                 return_logprobs: bool = False) -> Generation:
        """Sample one response per prompt; prompt_ids / prompt_mask are (B, P), left-padded."""
        ...

    def sync(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from ``policy``'s current weights (after an update, on resume)."""
        ...

    def close(self) -> None:
        """Free what the engine holds (a vLLM engine's KV cache and weights)."""
        ...
