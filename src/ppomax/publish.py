"""The final model of a stage: written to ``output_dir`` as a plain Hugging Face model in ``--torch_dtype``,
with its tokenizer, and uploaded with ``--push_to_hub``.

The periodic checkpoints (``checkpoint-N/``) keep the training dtype (fp32 master weights) and LoRA
adapters as they are, for exact resume; the final model is what another tool loads:
``AutoModelForCausalLM.from_pretrained(output_dir)`` (the policy, SFT) or a ppomax reward model. With
LoRA it is merged (W + α/r·BA, computed in fp32 from the live weights, so the trained model is not
changed) or, with ``--save_merged false``, the peft adapter.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("ppomax")


def save_dtype(torch_dtype: str, source: str | os.PathLike | None) -> torch.dtype | None:
    """The dtype the final model is written in: ``torch_dtype``, or for 'auto' the source checkpoint's own
    (its config.json ``dtype`` / ``torch_dtype``); None keeps the weights' dtype."""
    if torch_dtype != "auto":
        return getattr(torch, torch_dtype)
    from ppomax import hub

    if source is not None and hub.looks_like_hub_id(os.fspath(source)):
        source = hub.snapshot(os.fspath(source))
    if source is None or not os.path.isfile(os.path.join(os.fspath(source), "config.json")):
        return None
    with open(os.path.join(os.fspath(source), "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) else None


def merged_lora_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every LoRA layer merged, W + ΔW (peft's get_delta_weight, added in
    fp32), keyed as the model without adapters; the peft model itself is not modified."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    deltas = {f"{name}.base_layer.weight": m.get_delta_weight(adapter) for name, m in base.named_modules()
              if isinstance(m, LoraLayer) and adapter in m.lora_A}
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:  # lora_A / lora_B / lora_dropout / lora_magnitude_vector
            continue
        if key in deltas:
            value = (value.float() + deltas[key].float()).to(value.dtype)
        state[key.replace(".base_layer.", ".")] = value
    return state


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype`` (detached; integer buffers untouched); None keeps them."""
    return {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
            for k, v in state.items()}


def _set_config_dtype(directory: Path, dtype: torch.dtype | None) -> None:
    """save_pretrained records the model's dtype, not the written tensors'; record what was written."""
    path = directory / "config.json"
    if dtype is None or not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_final(model: Any, output_dir: str | os.PathLike, tokenizer: Any, dtype: torch.dtype | None,
               merged: bool = True, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (a causal LM, a peft causal LM or a ScalarHeadModel) as the final model of a run.

    ``state``: its full state dict when it is sharded (gathered on rank 0, sharding.GatheredModel)."""
    from ppomax.models import ScalarHeadModel, is_peft_model, quiet_transformers

    quiet_transformers()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model) and not merged:  # the adapter (fp32) and its config, for peft's from_pretrained
        model.save_pretrained(out)
    elif is_peft_model(model):
        base = model.get_base_model()
        base.save_pretrained(out, state_dict=cast_state_dict(merged_lora_state_dict(model), dtype))
    elif isinstance(model, ScalarHeadModel):
        model.save_pretrained(out, state_dict=cast_state_dict(state or model.state_dict(), dtype))
    else:
        model.save_pretrained(out, state_dict=cast_state_dict(state or model.state_dict(), dtype))
    if not (is_peft_model(model) and not merged):
        _set_config_dtype(out, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    logger.info("final model written to %s (%s)", out, "peft adapter" if is_peft_model(model) and not merged
                else str(dtype or "training dtype").removeprefix("torch."))
    return out


def unwrap_gathered(model: Any) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """(model, its gathered full state dict) for a sharding.GatheredModel, (model, None) otherwise."""
    from ppomax.sharding import GatheredModel

    return (model.model, model.state) if isinstance(model, GatheredModel) else (model, None)


def push(cfg: Any, output_dir: str | os.PathLike, what: str) -> None:
    """--push_to_hub: upload the final model in ``output_dir`` to ``cfg.hub_model_id``."""
    if not cfg.push_to_hub:
        return
    from ppomax.hub import push_model

    push_model(output_dir, cfg.hub_model_id, cfg.hub_private_repo, f"ppomax {what}: final model")
