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

import torch

from ppomax.engines.base import Generation, RolloutEngine, Sampling

__all__ = ["Generation", "RolloutEngine", "Sampling", "make_engine"]


def make_engine(cfg, policy: torch.nn.Module, tokenizer) -> RolloutEngine:
    """The engine ``cfg.rollout_engine`` names (a PPOConfig or an EvalConfig), sampling ``policy``."""
    if cfg.rollout_engine == "vllm":
        from ppomax.engines.vllm import VLLMEngine  # vLLM is an optional extra: imported only here

        return VLLMEngine(cfg, policy, tokenizer)
    from ppomax.engines.hf import HFEngine

    return HFEngine(policy, bf16=getattr(cfg, "bf16", False), fp16=getattr(cfg, "fp16", False),
                    compile=getattr(cfg, "torch_compile", False), cuda_graph=getattr(cfg, "rollout_cuda_graph", False),
                    bf16_weights=getattr(cfg, "rollout_bf16_weights", False))
