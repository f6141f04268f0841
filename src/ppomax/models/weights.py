"""Loading saved weights into a model that already exists (resume and rollback keep the model objects,
which the optimizers hold): a full model, a LoRA model (adapters only), a scalar-head model (+ its head),
sharded or not."""

from __future__ import annotations

import os

import torch
from torch import nn

from ppomax.models.loading import ModelFormatError
from ppomax.models.lora import is_peft_model, load_adapter_weights, load_sharded_adapter_weights
from ppomax.models.scalar_head import HEAD_WEIGHTS, ScalarHeadModel


def load_weights_into(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load safetensors weights saved by ``save_pretrained`` into an existing model, in place.

    Used by resume, which must keep the model object (optimizers hold its parameters).
    Only safetensors are read; a tied LM head may be absent from the file.
    """
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    target = model.backbone if isinstance(model, ScalarHeadModel) else model
    from ppomax import sharding

    if is_peft_model(target) and sharding.is_sharded(model):  # LoRA, sharded: scatter the adapters
        load_sharded_adapter_weights(model, target, directory)
        return
    if is_peft_model(target):  # LoRA: the checkpoint holds only the adapters
        load_adapter_weights(target, directory)
        if isinstance(model, ScalarHeadModel):
            head = load_file(os.path.join(directory, HEAD_WEIGHTS))
            model.v_head.load_state_dict({k: v.float() for k, v in head.items()})
        return
    files = sorted(
        f for f in os.listdir(directory) if f.endswith(".safetensors") and f != HEAD_WEIGHTS
    ) if os.path.isdir(directory) else []
    if not files:
        raise ModelFormatError(f"{directory}: no safetensors weights to load")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(directory, f)))
    sharded = sharding.is_sharded(model)
    if sharded:  # scatter the full weights (head included) into this rank's shards
        head = load_file(os.path.join(directory, HEAD_WEIGHTS)) if isinstance(model, ScalarHeadModel) else {}
        full = ({**{f"backbone.{k}": v for k, v in state.items()}, **{f"v_head.{k}": v.float() for k, v in head.items()}}
                if isinstance(model, ScalarHeadModel) else state)
        missing, unexpected = sharding.load_full_state_dict(model, full)
        missing = [k for k in missing if not k.startswith("lm_head_for_training.")]  # the RM's tied LM term
    else:
        try:
            missing, unexpected = target.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch: a checkpoint of a different model size
            raise ModelFormatError(f"{directory}: weights do not match the model "
                                   f"({str(e).splitlines()[-1].strip()})") from None
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(target.config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise ModelFormatError(
            f"{directory}: weights do not match the model (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    if isinstance(model, ScalarHeadModel) and not sharded:
        head = load_file(os.path.join(directory, HEAD_WEIGHTS))
        model.v_head.load_state_dict({k: v.float() for k, v in head.items()})
