"""Fields every training stage shares with transformers / TRL: how models load (dtype, attention), what
is saved at the end and where it is pushed, where metrics go. Their checks run in ``__post_init__``, so a
missing package or a bad combination fails before any model is loaded.

dtype policy (docs/migrating_from_trl.md "Dtypes"): ``--torch_dtype`` is the dtype of every *frozen*
weight (π_ref, the reward model, the frozen base under LoRA) and of the final saved model. Weights the
optimizer updates in full (the policy and critic without LoRA, SFT, the reward model being trained) keep
fp32 master weights unless ``--fp32_master_weights false``: an AdamW step of lr·|update| ~ 1e-6 relative
to a weight is below bf16's resolution (2^-8 ≈ 4e-3) and would be rounded away. LoRA adapters and the
value head are fp32 always (peft's and ScalarHeadModel's choice). TRL loads everything in the given dtype
and trains it there (``--fp32_master_weights false``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from ppomax.fields import check, opt

DTYPES = ("auto", "bfloat16", "float16", "float32")
# The plain names transformers 5 accepts (modeling_utils.AttentionInterface); a Hub kernel
# ("kernels-community/flash-attn2") is passed through to transformers, which checks it.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                        "flash_attention_4")
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface",
                   "flash_attention_4": "flash_attn"}
# --report_to integrations and the module each needs (TrainingArguments' names; "all" = those installed).
INTEGRATIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
# Other spellings of a field that the CLI and YAML accept: TRL >= 0.22 and transformers 5 call it `dtype`.
FIELD_ALIASES = {"dtype": "torch_dtype"}


@dataclass
class HFArgs:
    """Loading, saving, pushing and logging, named as in transformers / TRL."""

    torch_dtype: str = opt(
        "float32", "dtype of the frozen weights (reference, reward model, LoRA base) and of the saved final model; "
        "'auto': the checkpoint's own. Fully trained weights keep fp32 master weights (see fp32_master_weights). "
        "Alias --dtype.", choices=DTYPES)
    fp32_master_weights: bool = opt(
        True, "Fully trained weights (no LoRA) are loaded and updated in fp32 whatever torch_dtype says: AdamW steps "
        "below bf16's resolution are not rounded away. false: train them in torch_dtype, as TRL does (half the "
        "weight and optimizer memory).")
    attn_implementation: str | None = opt(
        None, f"Attention kernel passed to from_pretrained: {', '.join(ATTN_IMPLEMENTATIONS)}, or a Hub kernel "
        "'org/name' (None: transformers' default, sdpa).")
    run_name: str | None = opt(None, "Run name for wandb / trackio (default: the output_dir's name).")
    save_merged: bool = opt(
        True, "With --use_peft: save the final model with the LoRA adapters merged into plain weights; false: save "
        "the peft adapter (adapter_config.json + adapter_model.safetensors) instead.")
    push_to_hub: bool = opt(False, "Upload the final model and tokenizer to the Hub repo --hub_model_id at the end.")
    hub_model_id: str | None = opt(None, "Hub repo for --push_to_hub, 'user/name' or 'org/name' (created if missing).")
    hub_private_repo: bool | None = opt(None, "Create the Hub repo private (None: the account's default).")

    def _check_hf(self) -> None:
        n = type(self).__name__
        attn = self.attn_implementation
        check(attn is None or attn in ATTN_IMPLEMENTATIONS or "/" in attn,
              f"{n}.attn_implementation = {attn!r} is invalid: allowed one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
              "or a Hub kernel 'org/name'")
        if attn in _FLASH_PACKAGES:
            check(_installed(_FLASH_PACKAGES[attn]) or _installed("kernels"),
                  f"{n}.attn_implementation = {attn!r} needs the {_FLASH_PACKAGES[attn]} package (or `kernels`): "
                  "pip install flash-attn --no-build-isolation")
        if self.push_to_hub:
            check(bool(self.hub_model_id), f"{n}.push_to_hub needs --hub_model_id user/name (the repo to push to)")
        if self.hub_model_id is not None:
            check(self.hub_model_id.count("/") <= 1 and bool(self.hub_model_id.strip("/")),
                  f"{n}.hub_model_id = {self.hub_model_id!r} is not a Hub repo id ('name' or 'namespace/name')")
        if isinstance(self.report_to, list | tuple):  # a list in Python or YAML, as TrainingArguments takes it
            self.report_to = ",".join(self.report_to)
        report_integrations(self.report_to, n)  # unknown or not installed: an error now, not after loading


def load_dtype(cfg: Any, trained: bool, lora: bool = False) -> str:
    """The dtype a model loads in (module docstring): frozen weights, and the frozen base under LoRA, in
    torch_dtype; fully trained weights in float32 while fp32_master_weights is on."""
    return "float32" if trained and not lora and cfg.fp32_master_weights else cfg.torch_dtype


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def report_integrations(report_to: Any, owner: str = "config") -> list[str]:
    """The integrations ``report_to`` names: a comma-separated string or a list, as in TrainingArguments;
    "none" is none and "all" every installed one. A named one that is not installed is an error here,
    before any model loads."""
    names = [s.strip() for s in (report_to.split(",") if isinstance(report_to, str) else report_to or []) if s.strip()]
    allowed = ("none", "all", *INTEGRATIONS)
    bad = [s for s in names if s not in allowed]
    check(not bad, f"{owner}.report_to = {report_to!r}: unknown {', '.join(map(repr, bad))}; allowed a list of "
                   f"{', '.join(allowed)}")
    if "none" in names:
        check(names == ["none"], f"{owner}.report_to = {report_to!r}: 'none' cannot be combined with others")
        return []
    if "all" in names:
        return [k for k, mod in INTEGRATIONS.items() if _installed(mod)]
    missing = [s for s in names if not _installed(INTEGRATIONS[s])]
    check(not missing, f"{owner}.report_to names {', '.join(missing)}, which is not installed: "
                       f"pip install {' '.join(missing)} (or drop it from --report_to)")
    return list(dict.fromkeys(names))
