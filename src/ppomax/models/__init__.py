"""Models: loading causal LMs and tokenizers, the scalar-head model, LoRA, and a tiny model for tests.

A path is a local directory or a Hub id; a Hub id is first downloaded into the Hugging Face cache
(ppomax.hub: safetensors and configs only; HF_HUB_OFFLINE=1 reads the cache only), then everything
loads from the local directory with ``local_files_only=True``.

The scalar-head model is used twice in PPO-max (arXiv 2307.04964): as the reward model (the
score at the last token is the reward) and as the critic (one value per token, initialised
from the reward model, the paper's "pretrained initialization" of the critic). On disk it is a plain ``AutoModel`` directory
plus ``value_head.safetensors`` and a marker ``ppomax_scalar_head.json``.

Import the names from ``ppomax.models``; the code lives in :mod:`~ppomax.models.loading` (causal LMs,
tokenizers, adapter directories, padding helpers), :mod:`~ppomax.models.scalar_head`,
:mod:`~ppomax.models.lora`, :mod:`~ppomax.models.weights` (loading into an existing model) and
:mod:`~ppomax.models.tiny`.
"""

from __future__ import annotations

from ppomax.models.loading import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHAT_TOKENS,
    CHATML_TEMPLATE,
    EOS_TOKEN,
    ModelFormatError,
    ModelNotFoundError,
    disable_dropout,
    eos_token_ids,
    gather_last,
    is_adapter_dir,
    load_causal_lm,
    load_merged_lora,
    load_tokenizer,
    position_ids_from_mask,
    quiet_transformers,
    save_causal_lm,
    skeleton_loading,
)
from ppomax.models.lora import apply_lora, is_peft_model, merge_lora
from ppomax.models.scalar_head import (
    HEAD_FORMAT,
    HEAD_FORMAT_VERSION,
    HEAD_MARKER,
    HEAD_WEIGHTS,
    ScalarHeadModel,
)
from ppomax.models.tiny import build_tiny_model
from ppomax.models.weights import load_weights_into

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CHAT_TOKENS", "CHATML_TEMPLATE", "EOS_TOKEN", "HEAD_FORMAT",
    "HEAD_FORMAT_VERSION", "HEAD_MARKER", "HEAD_WEIGHTS", "ModelFormatError", "ModelNotFoundError",
    "ScalarHeadModel", "apply_lora", "build_tiny_model", "disable_dropout", "eos_token_ids", "gather_last",
    "is_adapter_dir", "is_peft_model", "load_causal_lm", "load_merged_lora", "load_tokenizer", "load_weights_into",
    "merge_lora", "position_ids_from_mask", "quiet_transformers", "save_causal_lm", "skeleton_loading",
]
