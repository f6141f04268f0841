"""The ``hf`` rollout engine: ppomax's KV-cache decode loop (``ppomax.ppo.rollout.generate``) run on
the training model itself, so there are no weights to sync and log-probs come from the same
kernels as the training forward.

Two options make it faster on a GPU (issue 22; both off by default):
- ``cuda_graph`` (``--rollout_cuda_graph``): each decode step replayed from a captured CUDA graph
  over a static KV cache (``ppomax.engines.graph_decode``); the eager loop where that cannot run.
- ``bf16_weights`` (``--rollout_bf16_weights``, with ``--bf16``): sample from a copy of the policy
  whose ``nn.Linear`` weights are held in bf16, refreshed in place by ``sync`` after every update
  (vLLM also samples from its own bf16 copy). Autocast caches its bf16 casts only of weights that
  require grad, and only between the cache's clears, so a LoRA policy's frozen base is cast again
  at every decode step, and a captured graph (which runs with the cast cache off) casts every
  weight at every step. Under autocast the copy computes exactly what the policy does: autocast
  casts a linear's fp32 weight and bias to bf16 with the same rounding; embeddings, norms and
  buffers are the policy's own tensors, not copies.
"""

from __future__ import annotations

import copy

import torch

from ppomax import sharding
from ppomax.engines.base import Generation, Sampling
from ppomax.training import autocast


class Bf16RolloutCopy:
    """A sampling copy of ``policy``: every plain ``nn.Linear``'s weight and bias in bf16 (the LM head
    untied from the embedding), every other parameter and buffer shared with ``policy``.
    ``refresh()`` copies the policy's current linear weights in, in place (a captured CUDA graph
    keeps reading the same storage)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy
        shared = {id(t): t for t in (*policy.parameters(), *policy.buffers())}
        self.module = copy.deepcopy(policy, memo=shared).eval()  # new modules, the same tensors
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (bf16 copy, policy tensor)
        for m in self.module.modules():
            if type(m) is not torch.nn.Linear:
                continue
            for name in ("weight", "bias"):
                src = getattr(m, name)
                if src is None:
                    continue
                dst = torch.nn.Parameter(src.detach().to(torch.bfloat16), requires_grad=False)
                setattr(m, name, dst)
                self.pairs.append((dst, src))

    @torch.no_grad()
    def refresh(self) -> None:
        for dst, src in self.pairs:
            dst.copy_(src)


class HFEngine:
    """Samples with ``policy`` (a transformers causal LM, a peft model, or an FSDP2-sharded one).

    ``bf16`` / ``fp16``: autocast during sampling; ``compile``: torch.compile the decode step;
    ``cuda_graph``: replay each decode step from a captured CUDA graph; ``bf16_weights``: sample
    from a bf16 copy of the policy's linear weights (needs ``bf16``; module docstring).
    """

    name = "hf"

    def __init__(self, policy: torch.nn.Module, bf16: bool = False, fp16: bool = False, compile: bool = False,
                 cuda_graph: bool = False, bf16_weights: bool = False) -> None:
        self.policy, self.bf16, self.fp16, self.compile = policy, bf16, fp16, compile
        self.decoder = None
        if cuda_graph:
            from ppomax.engines.graph_decode import GraphDecoder

            self.decoder = GraphDecoder(compile_step=compile)
        self.bf16_copy = Bf16RolloutCopy(policy) if bf16_weights else None

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling,
                 return_logprobs: bool = False) -> Generation:
        from ppomax.ppo.rollout import generate

        s = sampling
        model = self.bf16_copy.module if self.bf16_copy is not None else self.policy
        # a sharded policy is gathered once for the whole decode, not once per layer per token
        with autocast(prompt_ids.device, self.bf16, self.fp16), sharding.gathered(self.policy):
            if self.decoder is not None:
                resp, mask, truncated, *logp = self.decoder.generate(model, prompt_ids, prompt_mask, s, return_logprobs)
            else:
                resp, mask, truncated, *logp = generate(
                    model, prompt_ids, prompt_mask, s.max_new_tokens, list(s.eos_token_ids), s.pad_token_id,
                    s.temperature, s.top_k, s.top_p, stop_at_eos=s.stop_at_eos, return_logprobs=return_logprobs,
                    compile=self.compile,
                )
        return Generation(resp, mask, truncated, logp[0] * mask if logp else None)

    def sync(self, policy: torch.nn.Module) -> None:
        """After an update, a resume or a rollback: the policy's weights are the ones to sample from."""
        if self.bf16_copy is not None:
            if policy is self.bf16_copy.policy:
                self.bf16_copy.refresh()
            else:  # a different module object: copy it afresh
                self.bf16_copy = Bf16RolloutCopy(policy)
        self.policy = policy

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
