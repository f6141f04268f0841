"""Rollout engines: the one interface through which PPO and ``ppomax eval`` sample responses.

An engine takes left-padded prompt ids and :class:`Sampling` settings and returns a
:class:`Generation`: right-padded response ids, their mask, truncation flags and, optionally, the
engine's own log-probs of the sampled tokens. After every policy update the trainer calls
``engine.sync(policy)`` so the next rollout samples from the updated weights.

Two engines (PPOConfig / EvalConfig ``rollout_engine``):
- ``hf``   (:mod:`ppomax.engines.hf`): ppomax's own KV-cache decode loop on the training model
  itself (optionally replayed from CUDA graphs, :mod:`ppomax.engines.graph_decode`); ``sync`` has
  nothing to do unless it samples from a bf16 copy of the policy. The default.
- ``vllm`` (:mod:`ppomax.engines.vllm`): a colocated vLLM engine in the training process, its
  weights pushed in memory after each update. Imported only when asked for.
"""

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


def make_engine(cfg, policy: torch.nn.Module, tokenizer) -> RolloutEngine:
    """The engine ``cfg.rollout_engine`` names (a PPOConfig or an EvalConfig), sampling ``policy``."""
    if cfg.rollout_engine == "vllm":
        from ppomax.engines.vllm import VLLMEngine  # vLLM is an optional extra: imported only here

        return VLLMEngine(cfg, policy, tokenizer)
    from ppomax.engines.hf import HFEngine

    return HFEngine(policy, bf16=getattr(cfg, "bf16", False), fp16=getattr(cfg, "fp16", False),
                    compile=getattr(cfg, "torch_compile", False), cuda_graph=getattr(cfg, "rollout_cuda_graph", False),
                    bf16_weights=getattr(cfg, "rollout_bf16_weights", False))
