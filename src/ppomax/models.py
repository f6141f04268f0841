"""Models: loading causal LMs and tokenizers, the scalar-head model, and a tiny model for tests.

A path is a local directory or a Hub id; a Hub id is first downloaded into the Hugging Face cache
(ppomax.hub: safetensors and configs only; HF_HUB_OFFLINE=1 reads the cache only), then everything
loads from the local directory with ``local_files_only=True``.

The scalar-head model is used twice in PPO-max (arXiv 2307.04964): as the reward model (the
score at the last token is the reward) and as the critic (one value per token, initialised
from the reward model, the paper's "pretrained initialization" of the critic). On disk it is a plain ``AutoModel`` directory
plus ``value_head.safetensors`` and a marker ``ppomax_scalar_head.json``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ppomax import compat
from ppomax.errors import UserError

logger = logging.getLogger("ppomax")

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_MARKER = "ppomax_scalar_head.json"
HEAD_FORMAT = "ppomax-scalar-head"
HEAD_FORMAT_VERSION = 1

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


def _resolve(path: str | os.PathLike, required_file: str | None, what: str, trust_remote_code: bool = False) -> str:
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


def _auto_load(auto_cls: Any, path: str | os.PathLike, dtype: Any, trust_remote_code: bool,
               attn_implementation: str | None = None, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained`` on a local directory (or a Hub id's snapshot), errors naming the path."""
    quiet_transformers()
    local = _resolve(path, "config.json", "model", trust_remote_code)
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

    local = _resolve(path, None, "tokenizer", trust_remote_code)
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
    return _auto_load(AutoModelForCausalLM, path, dtype, trust_remote_code, attn_implementation)


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
        # The head runs in float32 even for a bf16 backbone: scores feed losses and advantages.
        weight, bias = self.v_head.weight.float(), self.v_head.bias.float()
        return nn.functional.linear(hidden.float(), weight, bias).squeeze(-1)  # (B, T)

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

        return cls(_auto_load(AutoModel, path, dtype, trust_remote_code, attn_implementation))

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

        from ppomax import seqcls

        local = _resolve(path, "config.json", "scalar-head model", trust_remote_code)
        marker = os.path.join(local, HEAD_MARKER)
        head_file = os.path.join(local, HEAD_WEIGHTS)
        if not os.path.isfile(marker) and seqcls.is_seq_cls_dir(local):
            return seqcls.to_scalar_head(_auto_load(AutoModelForSequenceClassification, local, dtype,
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
        backbone = _auto_load(AutoModel, local, dtype, trust_remote_code, attn_implementation)
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
        _load_sharded_adapter_weights(model, target, directory)
        return
    if is_peft_model(target):  # LoRA: the checkpoint holds only the adapters
        _load_adapter_weights(target, directory)
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


# ---------------------------------------------------------------------------------------------
# LoRA (peft: the optional extra ``ppomax[peft]``, imported only when LoRA is used)
# ---------------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UserError("LoRA (--use_peft) needs peft: pip install 'ppomax[peft]'") from None
    return peft


def is_peft_model(model: Any) -> bool:
    """True for a peft ``PeftModel`` (without importing peft: if it is not imported, nothing is one)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A directory holding LoRA adapters only (peft ``save_pretrained``), no full model."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


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
    peft = _peft()
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


def _load_adapter_weights(peft_model: Any, directory: str) -> None:
    """Load ``adapter_model.safetensors`` into a PeftModel in place (resume keeps the objects)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{directory}: no LoRA adapter weights ({ADAPTER_WEIGHTS}); was it saved without --use_peft?")
    state = load_file(path)
    result = _peft().set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing or not state:
        raise ModelFormatError(f"{directory}: adapter weights do not match the model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _load_sharded_adapter_weights(model: nn.Module, peft_model: Any, directory: str) -> None:
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


def _adapter_base(adapter_dir: str, base_dir: str | os.PathLike | None) -> str:
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

    peft = _peft()
    adapter_dir = os.fspath(adapter_dir)
    base = _adapter_base(adapter_dir, base_dir)
    if is_adapter_dir(base):
        raise ModelFormatError(f"{base}: the base of a LoRA adapter must be a full model directory")
    model = _auto_load(AutoModelForCausalLM, base, dtype, trust_remote_code)
    with compat.quiet_peft_checkpointing_probe():
        model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return model.merge_and_unload()


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
        tok_src = _adapter_base(checkpoint_policy_dir, base_dir)
    save_causal_lm(merged, load_tokenizer(tok_src), out_dir)
    return os.fspath(out_dir)


# The tiny test / demo model lives in ppomax.tiny; importable from here as before.
from ppomax.tiny import build_tiny_model  # noqa: E402, F401
