"""Loading causal LMs and tokenizers: a local directory or a Hub id (downloaded into the Hugging Face
cache through :mod:`ppomax.hub`, safetensors only), a LoRA adapter directory merged into its base,
and the helpers every forward over a (left-)padded batch needs."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from typing import Any

import torch
from torch import nn

from ppomax import compat
from ppomax.errors import UserError

logger = logging.getLogger("ppomax")

EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML, as SmolLM2-Instruct uses it (without its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model or tokenizer path is neither a local directory nor a cached hub id."""


class ModelFormatError(UserError, ValueError):
    """A directory exists but does not hold what was asked for (config, tokenizer, head)."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """Silence transformers' per-load "Loading weights" / "Writing model shards" bars.

    In transformers 5 every from_pretrained/save_pretrained draws a tqdm bar; in a training
    log they are noise. (This also turns off huggingface_hub bars, which ppomax never needs.)
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_model_dir(path: str | os.PathLike, required_file: str | None, what: str,
                      trust_remote_code: bool = False) -> str:
    """A local directory for ``path``: the directory itself, or a Hub id's snapshot in the HF cache
    (downloaded through huggingface_hub when online; ppomax.hub).

    Raises FileNotFoundError naming the path when neither exists, and ValueError when the
    directory lacks ``required_file``.
    """
    from ppomax import hub

    path = os.fspath(path)
    if hub.looks_like_hub_id(path):
        path = hub.snapshot(path, what, trust_remote_code)
    if os.path.isdir(path):
        if required_file and not os.path.isfile(os.path.join(path, required_file)):
            raise ModelFormatError(f"{path}: not a {what} directory (no {required_file})")
        return path
    if os.path.exists(path):
        raise ModelFormatError(f"{path}: expected a {what} directory, found a file")
    raise ModelNotFoundError(f"{path}: no such {what} directory (nor a Hub id 'org/name')")


def _dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """None → float32. transformers 5 defaults to "auto" (the checkpoint's dtype, e.g. bf16 for
    SmolLM2); ppomax trains in float32 unless asked, so CPU runs are exact and reproducible."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        return _DTYPES[dtype]
    return dtype


_SKELETON = contextvars.ContextVar("ppomax_skeleton", default=False)


@contextlib.contextmanager
def skeleton_loading(enabled: bool = True):
    """Inside, models loaded from a path are built on the meta device from their config, without
    reading the weights: a sharded run's ranks > 0 receive their shards from rank 0 instead
    (sharding.fill_from_rank0), so only one process per node holds a full copy in host RAM."""
    token = _SKELETON.set(enabled)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def auto_load(auto_cls: Any, path: str | os.PathLike, dtype: Any, trust_remote_code: bool,
              attn_implementation: str | None = None, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained`` on a local directory (or a Hub id's snapshot), errors naming the path."""
    quiet_transformers()
    local = resolve_model_dir(path, "config.json", "model", trust_remote_code)
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if _SKELETON.get():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(local, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs)
        with torch.device("meta"):
            return auto_cls.from_config(config, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, **attn)
    try:
        # use_safetensors: a directory holding only pickle weights (pytorch_model.bin) is refused,
        # never unpickled (docs/reliability.md); trust_remote_code stays False unless asked for.
        return auto_cls.from_pretrained(
            local, dtype=_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code,
            use_safetensors=True, **attn, **kwargs,
        )
    except OSError as e:  # e.g. config.json present but no (safetensors) weights
        pickled = sorted(f for f in os.listdir(local) if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")))
        hint = (f"; only safetensors weights are loaded, {pickled[0]} is a pickle file: convert it with "
                "model.save_pretrained(dir) in a trusted environment") if pickled else ""
        raise ModelFormatError(f"{os.fspath(path)}: could not load a model ({e}){hint}") from e


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer from a local directory, with a pad token guaranteed.

    A tokenizer without a pad token gets pad = eos (logged): padding is always masked by
    position in ppomax, so sharing the id is harmless. No eos either → ValueError.
    """
    from transformers import AutoTokenizer

    local = resolve_model_dir(path, None, "tokenizer", trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            local, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{os.fspath(path)}: could not load a tokenizer ({e})") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelFormatError(f"{os.fspath(path)}: tokenizer has neither a pad nor an eos token")
        logger.warning("tokenizer at %s has no pad token; using eos %r as pad", path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """AutoModelForCausalLM from a local directory or Hub id (float32 unless ``dtype`` says otherwise)."""
    from transformers import AutoModelForCausalLM

    if is_adapter_dir(path):  # a LoRA checkpoint (e.g. checkpoint-N/policy with --use_peft)
        return load_merged_lora(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return auto_load(AutoModelForCausalLM, path, dtype, trust_remote_code, attn_implementation)


def save_causal_lm(model: Any, tokenizer: Any | None, output_dir: str | os.PathLike) -> None:
    """Save a causal LM (always safetensors in transformers 5) and its tokenizer."""
    quiet_transformers()
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a (left-)padded batch: (B, T) mask → (B, T) long.

    The first real token of each row gets position 0, as in ``generate``
    (``_prepare_position_ids_for_generation``: cumsum - 1). Pads get 0 (they are masked out).
    RoPE models happen to be invariant to a constant shift of positions, but models with
    absolute position embeddings (GPT-2) are not, so training forwards always pass these.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def gather_last(scores: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """Per-sequence score at its last real token: scores (B, T), last_index (B,) → (B,)."""
    return scores.gather(1, last_index.long().unsqueeze(1)).squeeze(1)


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and those of ``model.generation_config``.

    Chat models (Llama-3, Qwen, SmolLM2-Instruct) list several there, e.g. end of turn and end of
    text; ``model.generate`` stops at any of them, and so do the rollout and ``ppomax eval``.
    """
    ids: list[int] = []
    gen = getattr(model, "generation_config", None) if model is not None else None
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        for i in [source] if isinstance(source, int) else (source or []):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


# Float attributes through which models apply dropout functionally (attention probabilities in the
# eager / SDPA kernels), next to their nn.Dropout modules.
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "hidden_dropout", "resid_dropout")


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0 (nn.Dropout modules, LoRA's included, and the
    float rates attention kernels read); return how many were non-zero.

    PPO needs it: rollouts run in eval mode and the update in train mode, so with dropout on, the
    first mini-batch's ratio π_θ / π_old is not 1 and the clip fires on noise (TRL and OpenRLHF
    disable dropout in PPO for the same reason). Train mode is kept for gradient checkpointing.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, n = 0.0, n + 1
        for attr in _DROPOUT_ATTRS:
            value = module.__dict__.get(attr)
            if isinstance(value, float) and value > 0:
                setattr(module, attr, 0.0)
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# LoRA adapter directories (peft: the optional extra ``ppomax[peft]``, imported only when used)
# ---------------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def require_peft() -> Any:
    """The peft module, or a UserError saying how to install it (LoRA is the optional extra ``ppomax[peft]``)."""
    try:
        import peft
    except ImportError:
        raise UserError("LoRA (--use_peft) needs peft: pip install 'ppomax[peft]'") from None
    return peft


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A directory holding LoRA adapters only (peft ``save_pretrained``), no full model."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def adapter_base_dir(adapter_dir: str, base_dir: str | os.PathLike | None) -> str:
    """The base model directory of a LoRA adapter: ``base_dir``, else the one its adapter_config.json names."""
    if base_dir is not None:
        return os.fspath(base_dir)
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ModelFormatError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model; pass the base model directory")
    return base


def load_merged_lora(
    adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
) -> Any:
    """Base causal LM + LoRA adapters from ``adapter_dir``, merged into plain weights.

    ``base_dir`` defaults to ``base_model_name_or_path`` in the adapter config (the directory
    the policy was loaded from when it was trained).
    """
    from transformers import AutoModelForCausalLM

    peft = require_peft()
    adapter_dir = os.fspath(adapter_dir)
    base = adapter_base_dir(adapter_dir, base_dir)
    if is_adapter_dir(base):
        raise ModelFormatError(f"{base}: the base of a LoRA adapter must be a full model directory")
    model = auto_load(AutoModelForCausalLM, base, dtype, trust_remote_code)
    with compat.quiet_peft_checkpointing_probe():
        model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return model.merge_and_unload()
