"""LoRA (Hu et al. 2021) through peft, the optional extra ``ppomax[peft]``, imported only when LoRA is used:
adapters on a causal LM or on a scalar-head model's backbone, loading saved adapters in place (resume),
and merging an adapter checkpoint into a plain model (``ppomax export``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ppomax import compat
from ppomax.models.loading import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ModelFormatError,
    adapter_base_dir,
    is_adapter_dir,
    load_merged_lora,
    load_tokenizer,
    require_peft,
    save_causal_lm,
)
from ppomax.models.scalar_head import HEAD_WEIGHTS, ScalarHeadModel


def is_peft_model(model: Any) -> bool:
    """True for a peft ``PeftModel`` (without importing peft: if it is not imported, nothing is one)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@compat.quiet_peft_checkpointing_probe()
def apply_lora(
    model: Any, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
    target_modules: str | Sequence[str] = "q_proj,k_proj,v_proj,o_proj",
) -> Any:
    """Add fresh LoRA adapters; the base weights are frozen (``requires_grad=False``).

    A causal LM becomes a ``PeftModelForCausalLM`` (returned). A :class:`ScalarHeadModel` gets
    its backbone wrapped in place and is returned; its value head stays fully trainable.
    LoRA's B matrices start at zero, so the wrapped model computes exactly what the base did.
    """
    peft = require_peft()
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    # peft takes its shorthand "all-linear" (every linear layer but the output head) as a string, not a list
    targets = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    if isinstance(model, ScalarHeadModel):
        if not is_peft_model(model.backbone):
            model.backbone = peft.get_peft_model(model.backbone, peft.LoraConfig(**kwargs))
        return model
    if is_peft_model(model):
        return model
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))


def load_adapter_weights(peft_model: Any, directory: str) -> None:
    """Load ``adapter_model.safetensors`` into a PeftModel in place (resume keeps the objects)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{directory}: no LoRA adapter weights ({ADAPTER_WEIGHTS}); was it saved without --use_peft?")
    state = load_file(path)
    result = require_peft().set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing or not state:
        raise ModelFormatError(f"{directory}: adapter weights do not match the model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_sharded_adapter_weights(model: nn.Module, peft_model: Any, directory: str) -> None:
    """``adapter_model.safetensors`` into a sharded model: saved names lack the adapter name
    (``…q_proj.lora_A.weight`` for the model's ``…q_proj.lora_A.default.weight``)."""
    from safetensors.torch import load_file

    from ppomax import sharding

    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{directory}: no LoRA adapter weights ({ADAPTER_WEIGHTS}); was it saved without --use_peft?")
    saved = load_file(path)
    adapter = peft_model.active_adapter
    prefix = "backbone." if isinstance(model, ScalarHeadModel) else ""
    full, missing = {}, []
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or not p.requires_grad:
            continue
        key = name[len(prefix):].replace(f".{adapter}.", ".")
        if key in saved:
            full[name] = saved.pop(key)
        else:
            missing.append(name)
    if isinstance(model, ScalarHeadModel):
        full.update({f"v_head.{k}": v.float() for k, v in load_file(os.path.join(directory, HEAD_WEIGHTS)).items()})
    if missing or saved or not full:
        raise ModelFormatError(f"{directory}: adapter weights do not match the model "
                               f"(missing {missing[:5]}, unexpected {sorted(saved)[:5]})")
    sharding.load_full_state_dict(model, full)


def merge_lora(
    checkpoint_policy_dir: str | os.PathLike, base_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
    dtype: str | None = None,
) -> str:
    """Export a LoRA policy (e.g. ``run/checkpoint-N/policy``) as a plain model directory.

    The adapters are merged into the base weights (W + α/r · BA), so the result loads with any
    ``AutoModelForCausalLM.from_pretrained`` and gives the adapter model's logits. The tokenizer
    is taken from the checkpoint directory if it holds one, else from the base.
    """
    checkpoint_policy_dir = os.fspath(checkpoint_policy_dir)
    if not is_adapter_dir(checkpoint_policy_dir):
        raise ModelFormatError(f"{checkpoint_policy_dir}: not a LoRA adapter directory (no {ADAPTER_CONFIG}); "
                               "a full model needs no merge")
    merged = load_merged_lora(checkpoint_policy_dir, base_dir, dtype=dtype)
    tok_src = checkpoint_policy_dir
    if not os.path.isfile(os.path.join(tok_src, "tokenizer_config.json")):
        tok_src = adapter_base_dir(checkpoint_policy_dir, base_dir)
    save_causal_lm(merged, load_tokenizer(tok_src), out_dir)
    return os.fspath(out_dir)
