"""The scalar-head model: a base transformer with a linear head giving one score per token.

It is used twice in PPO-max (arXiv 2307.04964): as the reward model (the score at the last token is
the reward) and as the critic (one value per token, initialised from the reward model, the paper's
"pretrained initialization" of the critic). On disk it is a plain ``AutoModel`` directory plus
``value_head.safetensors`` and a marker ``ppomax_scalar_head.json``; a transformers
``AutoModelForSequenceClassification`` directory with one label (TRL / OpenRLHF reward models) loads
as one too (:func:`to_scalar_head`; writing one: :mod:`ppomax.seqcls`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import nn

from ppomax import compat
from ppomax.models.loading import (
    ModelFormatError,
    auto_load,
    position_ids_from_mask,
    quiet_transformers,
    resolve_model_dir,
)

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_MARKER = "ppomax_scalar_head.json"
HEAD_FORMAT = "ppomax-scalar-head"
HEAD_FORMAT_VERSION = 1


class ScalarHeadModel(nn.Module):
    """A base transformer (``AutoModel``, no LM head) with a linear head giving one score per token.

    Used as the reward model (read with ``gather_last``) and as the critic (values per token).
    """

    def __init__(self, backbone: nn.Module, v_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if v_head is None:
            v_head = nn.Linear(hidden, 1, dtype=torch.float32)
            # Small random scores at start; std 1/sqrt(hidden+1) as in OpenAI's lm-human-preferences.
            nn.init.normal_(v_head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(v_head.bias)
        self.v_head = v_head
        self.metadata: dict[str, Any] = {}  # saved in the marker json (e.g. reward normalisation)

    @property
    def config(self) -> Any:
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (B, T) → scores (B, T) float32.

        Position ids default to ``position_ids_from_mask`` so left padding is handled.
        """
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        return self._head(hidden)  # (B, T); not score_hidden: under --sharding that is a hooked entry point

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last hidden states (B, T, H) of the backbone (the RM stage's LM term needs them)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        return self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def score_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The scalar head on hidden states (B, T, H) -> (B, T), in float32."""
        return self._head(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        # Float32 even for a bf16 backbone and inside --bf16's autocast (which would run this linear
        # in bf16, ~3 significant digits): scores and values feed the RM loss, GAE and the value loss.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight, bias = self.v_head.weight.float(), self.v_head.bias.float()
            return nn.functional.linear(hidden.float(), weight, bias).squeeze(-1)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The causal LM head (``lm_head_for_training``, the RM stage's LM term) on hidden states."""
        return self.lm_head_for_training(hidden)

    def activation_checkpointing_enable(self) -> None:  # what compat.enable_activation_checkpointing calls
        compat.enable_activation_checkpointing(self.backbone)

    @classmethod
    def from_causal_lm_model(cls, causal: nn.Module) -> ScalarHeadModel:
        """Share the backbone of an already loaded causal LM (its LM head stays usable)."""
        return cls(getattr(causal, causal.base_model_prefix))

    @classmethod
    def from_causal_lm(
        cls, path: str | os.PathLike, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ) -> ScalarHeadModel:
        """Backbone from a causal LM directory (``AutoModel`` drops the LM head), fresh head.

        The head is drawn from the global torch RNG, so seed it for reproducibility.
        """
        from transformers import AutoModel

        return cls(auto_load(AutoModel, path, dtype, trust_remote_code, attn_implementation))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ) -> ScalarHeadModel:
        """Load a directory written by ``save_pretrained`` (backbone + head + marker), or an
        ``AutoModelForSequenceClassification`` directory with one label (TRL / OpenRLHF reward models;
        ppomax.seqcls): its score head becomes the value head."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForSequenceClassification

        local = resolve_model_dir(path, "config.json", "scalar-head model", trust_remote_code)
        marker = os.path.join(local, HEAD_MARKER)
        head_file = os.path.join(local, HEAD_WEIGHTS)
        if not os.path.isfile(marker) and is_seq_cls_dir(local):
            return to_scalar_head(auto_load(AutoModelForSequenceClassification, local, dtype,
                                                    trust_remote_code, attn_implementation))
        if not os.path.isfile(marker) or not os.path.isfile(head_file):
            missing = HEAD_MARKER if not os.path.isfile(marker) else HEAD_WEIGHTS
            raise ModelFormatError(
                f"{os.fspath(path)}: neither a ppomax scalar-head model (no {missing}) nor an "
                "AutoModelForSequenceClassification checkpoint (config.json architectures *ForSequenceClassification); "
                "a causal LM has no trained head: train one with `ppomax rm`"
            )
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("format") != HEAD_FORMAT:
            raise ModelFormatError(f"{marker}: unknown format {info.get('format')!r}")
        backbone = auto_load(AutoModel, local, dtype, trust_remote_code, attn_implementation)
        state = load_file(head_file)
        v_head = nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32)
        v_head.load_state_dict({k: v.float() for k, v in state.items()})
        model = cls(backbone, v_head)
        model.metadata = dict(info.get("metadata", {}))
        return model

    def save_pretrained(self, output_dir: str | os.PathLike, tokenizer: Any | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Backbone (safetensors) + ``value_head.safetensors`` + marker json (+ tokenizer).

        ``state_dict``: this model's full state dict to write instead of its parameters (a sharded
        model's, gathered on rank 0: sharding.GatheredModel)."""
        from safetensors.torch import save_file

        quiet_transformers()
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None:
            self.backbone.save_pretrained(output_dir)
            head_state = self.v_head.state_dict()
        else:
            self.backbone.save_pretrained(output_dir, state_dict=_sub_state(state_dict, "backbone."))
            head_state = _sub_state(state_dict, "v_head.")
        head = {k: v.detach().float().cpu().contiguous() for k, v in head_state.items()}
        save_file(head, os.path.join(output_dir, HEAD_WEIGHTS))
        info = {
            "format": HEAD_FORMAT,
            "version": HEAD_FORMAT_VERSION,
            "hidden_size": self.config.hidden_size,
            "metadata": self.metadata,
        }
        with open(os.path.join(output_dir, HEAD_MARKER), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Reading transformers' sequence-classification reward models (the other direction: ppomax.seqcls)
# ---------------------------------------------------------------------------------------------

SEQ_CLS_SUFFIX = "ForSequenceClassification"


def is_seq_cls_dir(local: str) -> bool:
    """A model directory whose config names a ``*ForSequenceClassification`` architecture."""
    try:
        with open(os.path.join(local, "config.json"), encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(SEQ_CLS_SUFFIX) for a in archs)


def score_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of a seq-cls model's head: its one top-level nn.Linear outside the base model."""

    prefix = model.base_model_prefix
    heads = [(n, m) for n, m in model.named_children() if n != prefix and isinstance(m, nn.Linear)]
    if len(heads) != 1:
        raise ModelFormatError(f"{type(model).__name__}: expected one linear score head next to '{prefix}', found "
                               f"{[n for n, _ in heads] or 'none'} (heads with a hidden layer are not supported)")
    return heads[0]


def to_scalar_head(model: nn.Module) -> Any:
    """A ScalarHeadModel computing what the seq-cls ``model`` computes per token: its base model (shared, not
    copied) and its score head (copied to fp32, bias 0 when it has none). Needs ``num_labels == 1``."""

    if isinstance(model, ScalarHeadModel):
        return model
    labels = getattr(model.config, "num_labels", None)
    if labels != 1:
        raise ModelFormatError(f"{type(model).__name__} has num_labels = {labels}; a reward model or critic needs "
                               "one score per sequence (num_labels=1)")
    name, head = score_head(model)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone.config.hidden_size
    if head.in_features != hidden:
        raise ModelFormatError(f"{type(model).__name__}.{name} takes {head.in_features} features, the base model "
                               f"gives {hidden}")
    v_head = nn.Linear(hidden, 1, dtype=torch.float32, device=head.weight.device)
    with torch.no_grad():
        v_head.weight.copy_(head.weight.float())
        v_head.bias.copy_(head.bias.float() if head.bias is not None else torch.zeros_like(v_head.bias))
    out = ScalarHeadModel(backbone, v_head)
    out.metadata = {"source": "seq-cls", "architecture": type(model).__name__, "head": name}
    return out
