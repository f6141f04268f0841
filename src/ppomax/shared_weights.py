"""One copy in memory of the frozen weights that several PPO models hold bit for bit (issue #13).

Under LoRA most of what PPO keeps in memory is the same frozen base, several times over: the
policy's base (which is also π_ref: adapters off), the critic's backbone when the critic is LoRA
on the same SFT model, and the parts of the reward model its training left alone (a LoRA reward
model merged into its base changes only the adapted projections: with LoRA on q/k/v/o the MLPs,
the embeddings and the norms are still the base's, bit for bit).

:func:`share_frozen_weights` finds those tensors and points them all at one storage. Each model
keeps its own ``Parameter`` objects, so optimizers, gradient clipping, checkpoints and the
NaN-weight check see exactly what they saw before; only the memory behind frozen tensors is
shared. Nothing is shared that is not bit-equal (``torch.equal``), and nothing trainable, so the
run's numbers do not change (``tests/test_shared_weights.py``).

This is simpler than one peft model with an adapter per role (peft's ``set_adapter`` resets
``requires_grad`` of the inactive adapters, and gradient checkpointing would recompute under
whichever adapter is active), and it needs no adapter switch in any forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Name prefixes of the wrappers around one transformer body: peft's PeftModel / LoraModel
# ("base_model.model."), ScalarHeadModel ("backbone."), *ForCausalLM ("model."). peft renames a
# wrapped Linear's own weight "<module>.base_layer.weight".
_PREFIXES = ("base_model.model.", "backbone.", "model.")


def canonical_name(name: str) -> str:
    """The parameter's name inside the bare transformer body, whatever wraps it.

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` (a LoRA policy) and
    ``backbone.layers.0.self_attn.q_proj.weight`` (a reward model) both give
    ``layers.0.self_attn.q_proj.weight``."""
    name = name.replace(".base_layer.", ".")
    stripped = True
    while stripped:
        stripped = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p):], True
    return name


@dataclass
class Sharing:
    """What :func:`share_frozen_weights` did: tensors now pointing at another model's storage,
    and the bytes that no longer need their own copy."""

    tensors: int = 0
    bytes_saved: int = 0


class FrozenWeightIndex:
    """The frozen tensors of the models added so far, by name inside the transformer body.

    :meth:`add` compares each model once, against the models added before it: models loaded (or
    moved to a device) one after another are shared as each arrives, and no pair of tensors is
    compared twice. ``done`` counts what was shared."""

    def __init__(self) -> None:
        self.owners: dict[str, list[torch.Tensor]] = {}
        self.done = Sharing()

    def add(self, model: nn.Module | None, own_the_rest: bool = False) -> None:
        """Point every frozen parameter of ``model`` that is bit-equal to a frozen parameter of an
        earlier model (same name in the transformer body, shape, dtype and device) at that one's
        storage; its other frozen parameters become candidates for later models.

        ``own_the_rest`` (for a model just loaded on the host): if it gave up some tensors, it gets
        a copy of the others. transformers maps a safetensors file into memory and every tensor of
        the model is a view of that one mapping, which stays mapped, with each page ``torch.equal``
        read, while any of them lives; so without the copy the shared tensors would stay resident.
        """
        if model is None:
            return
        own, shared_here = [], 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                own.append(p)
                continue
            candidates = self.owners.setdefault(canonical_name(name), [])
            for o in candidates:
                if o.data_ptr() == p.data_ptr():
                    break
                if o.shape == p.shape and o.dtype == p.dtype and o.device == p.device and torch.equal(o, p):
                    p.data = o.data  # same storage; p stays this model's own (frozen) Parameter
                    shared_here += 1
                    self.done.bytes_saved += p.numel() * p.element_size()
                    break
            else:
                candidates.append(p)
                own.append(p)
        self.done.tensors += shared_here
        if own_the_rest and shared_here:
            with torch.no_grad():
                for p in own:  # before later models point at them: they then see the copy
                    p.data = p.data.clone()


def share_frozen_weights(models: list[nn.Module | None], own_the_rest: bool = False) -> Sharing:
    """Share the bit-equal frozen parameters of ``models`` (:meth:`FrozenWeightIndex.add`, in order).

    Call after the models are on their device (``Module.to`` would make per-model copies again) and
    not on sharded models (FSDP2 owns their storage). Frozen means ``requires_grad`` is False: a
    trained tensor changes in place at every step, so it is never shared."""
    index = FrozenWeightIndex()
    for m in models:
        index.add(m, own_the_rest)
    return index.done


def unique_parameter_bytes(models: list[nn.Module | None]) -> int:
    """Bytes of parameter storage the models hold together, each storage counted once."""
    seen: dict[int, int] = {}
    for m in models:
        if m is None:
            continue
        for p in m.parameters():
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())
