"""Reward models in transformers' sequence-classification format, both ways.

TRL's RewardTrainer, OpenRLHF and most published reward models are an
``AutoModelForSequenceClassification`` with one label: a base transformer plus a linear ``score`` head
(``LlamaForSequenceClassification``: ``model.*`` + ``score.weight``, no bias). ppomax's
:class:`~ppomax.models.ScalarHeadModel` is the same computation: the base transformer plus a linear head
on every token's last hidden state. So

* :func:`to_scalar_head` makes a seq-cls model a ScalarHeadModel that shares its base model and copies the
  head (fp32), with the same per-token scores; ``ScalarHeadModel.from_pretrained`` does this for a
  seq-cls directory, and ``--reward_model_path`` / ``--critic_init reward_model`` accept one;
* :func:`export_seq_cls` writes a ppomax reward model as such a directory (``ppomax export --to seq-cls``),
  which ``AutoModelForSequenceClassification.from_pretrained`` loads with the same scores.

Pooling: transformers' seq-cls forward returns the score at the rightmost token that is not the pad token;
ppomax reads it at the last response token (rollout.reward_model_scores). They agree whenever the sequence
does not end in the pad id. A tokenizer whose pad is its EOS (SmolLM2, GPT-2, Llama-3 base) makes HF skip a
final EOS and score the token before it: ppomax warns at export (give the tokenizer a distinct pad token).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ppomax.models.loading import ModelFormatError, load_tokenizer, quiet_transformers
from ppomax.models.scalar_head import (  # noqa: F401  (re-exported: read as before from ppomax.seqcls)
    SEQ_CLS_SUFFIX,
    ScalarHeadModel,
    is_seq_cls_dir,
    score_head,
    to_scalar_head,
)

logger = logging.getLogger("ppomax")

SUFFIX = SEQ_CLS_SUFFIX


def seq_cls_architecture(backbone: nn.Module) -> str:
    """``LlamaModel`` -> ``LlamaForSequenceClassification``: the seq-cls class of a base model."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(backbone.config.model_type)
    if name is None:
        raise ModelFormatError(f"model type {backbone.config.model_type!r} has no {SUFFIX} class in transformers; "
                               f"{AutoModelForSequenceClassification.__name__} cannot load it")
    return name


def export_seq_cls(source: Any, output_dir: str | os.PathLike, dtype: str = "auto", tokenizer: Any = None) -> str:
    """Write a ppomax reward model (a ScalarHeadModel or its directory) as a seq-cls directory with one label.

    ``dtype``: the saved weights' dtype ('auto': the backbone's). The head's bias (0 for every reward model
    ``ppomax rm`` trains: the pairwise loss does not move it) has no place in HF's bias-free score head; a
    non-zero one is dropped with a warning (scores then shift by that constant, preferences do not)."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    if not isinstance(source, ScalarHeadModel):
        path = os.fspath(source)
        if tokenizer is None and os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            tokenizer = load_tokenizer(path)
        source = ScalarHeadModel.from_pretrained(path, dtype="auto")
    backbone = source.backbone
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.architectures, config.num_labels = [seq_cls_architecture(backbone)], 1
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            logger.warning("%s: the pad token is the EOS token; transformers' seq-cls pooling skips trailing pad "
                           "ids, so a sequence ending in EOS is scored at the token before it (ppomax scores the "
                           "EOS). Give the tokenizer a distinct pad token for equal scores.", output_dir)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    name, head = score_head(model)
    target = backbone.dtype if dtype == "auto" else getattr(torch, dtype)
    state = {f"{model.base_model_prefix}.{k}": v.detach().to(target) for k, v in backbone.state_dict().items()}
    state[f"{name}.weight"] = source.v_head.weight.detach().to(target)
    bias = source.v_head.bias.detach().float()
    if head.bias is not None:
        state[f"{name}.bias"] = bias.to(target)
    elif bias.abs().max().item() > 0:
        logger.warning("the value head's bias %.4g is dropped: %s has no bias in its score head, so every score "
                       "shifts by %.4g (preferences and normalised rewards do not change)", bias.item(),
                       type(model).__name__, -bias.item())
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:

        raise ModelFormatError(f"export to {type(model).__name__}: missing {sorted(set(missing) - tied)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return os.fspath(output_dir)
