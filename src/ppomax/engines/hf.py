"""The ``hf`` rollout engine: ppomax's KV-cache decode loop (``ppomax.ppo.rollout.generate``) run on
the training model itself, so there are no weights to sync and log-probs come from the same
kernels as the training forward."""

from __future__ import annotations

import torch

from ppomax import sharding
from ppomax.engines import Generation, Sampling
from ppomax.training import autocast


class HFEngine:
    """Samples with ``policy`` (a transformers causal LM, a peft model, or an FSDP2-sharded one).

    ``bf16`` / ``fp16``: autocast during sampling; ``compile``: torch.compile the decode step.
    """

    name = "hf"

    def __init__(self, policy: torch.nn.Module, bf16: bool = False, fp16: bool = False, compile: bool = False) -> None:
        self.policy, self.bf16, self.fp16, self.compile = policy, bf16, fp16, compile

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling,
                 return_logprobs: bool = False) -> Generation:
        from ppomax.ppo.rollout import generate

        s = sampling
        # a sharded policy is gathered once for the whole decode, not once per layer per token
        with autocast(prompt_ids.device, self.bf16, self.fp16), sharding.gathered(self.policy):
            resp, mask, truncated, *logp = generate(
                self.policy, prompt_ids, prompt_mask, s.max_new_tokens, list(s.eos_token_ids), s.pad_token_id,
                s.temperature, s.top_k, s.top_p, stop_at_eos=s.stop_at_eos, return_logprobs=return_logprobs,
                compile=self.compile,
            )
        return Generation(resp, mask, truncated, logp[0] * mask if logp else None)

    def sync(self, policy: torch.nn.Module) -> None:
        self.policy = policy  # the same module object: its weights are already the updated ones

    def close(self) -> None:
        pass
