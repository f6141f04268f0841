"""What every stage config shares: the run fields (names from ``transformers.TrainingArguments``),
the LoRA fields, and the checks of a device and a rollout engine before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ppomax.fields import check, opt, validate_fields


def check_engine(cfg: Any) -> None:
    """--rollout_engine vllm without a working vLLM fails here, before any model is loaded."""
    if cfg.rollout_engine == "vllm":
        from ppomax.engines.vllm import check_available  # imports vLLM only when it is asked for

        check_available()


def check_device_field(cfg: Any) -> None:
    """--device: a device this machine has (cuda without CUDA, cuda:N past the GPUs fail here)."""
    from ppomax.training import check_device

    check_device(cfg.device, f"{type(cfg).__name__}.device")


# ---------------------------------------------------------------------------------------------
# Fields shared by every training stage (names from transformers.TrainingArguments)
# ---------------------------------------------------------------------------------------------


@dataclass
class RunArgs:
    """Fields every stage has: where to read and write, seed, logging, checkpoints, precision."""

    model_name_or_path: str | None = opt(
        None, "Model to start from: a local directory or a Hub id (downloaded through huggingface_hub, safetensors "
        "only; HF_HUB_OFFLINE=1 uses the local cache only).")
    dataset: str | None = opt(
        None, "Training data: a JSONL file, a directory saved by `datasets`, or a Hub dataset id 'org/name' "
        "(optionally 'org/name:split'; default split train) loaded with datasets.load_dataset.")
    output_dir: str | None = opt(None, "Run directory: config, metrics.jsonl, TensorBoard events, checkpoints.")
    seed: int = opt(42, "Random seed for model init, data order and sampling.", ge=0)
    learning_rate: float = opt(1e-5, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = opt(0.95, "AdamW beta2.", ge=0, lt=1)
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.0, "Fraction of the steps spent in linear warm-up.", ge=0, le=1)
    max_grad_norm: float | None = opt(1.0, "Global gradient clipping max norm (None: off).", gt=0)
    max_steps: int = opt(-1, "Total optimizer steps; -1 derives it from num_train_epochs.", ge=-1)
    logging_steps: int = opt(10, "Log every N steps to metrics.jsonl / TensorBoard.", ge=1)
    save_steps: int = opt(500, "Checkpoint every N steps (and always at the end).", ge=1)
    save_total_limit: int = opt(2, "Keep at most this many step checkpoints (the newest).", ge=1)
    report_to: str = opt(
        "tensorboard", "Where metrics go besides metrics.jsonl: a comma-separated list (or a YAML list) of tensorboard, "
        "wandb, trackio; 'all' (those installed) or 'none'. wandb / trackio read WANDB_PROJECT / TRACKIO_PROJECT.")
    device: str = opt(
        "auto", "Where the models train and sample: 'auto' (a CUDA GPU when there is one, else the CPU; with several "
        "processes, cuda:LOCAL_RANK), 'cpu', 'cuda' or 'cuda:N' (one process). Models passed in Python are moved "
        "there.")
    full_determinism: bool = opt(
        False, "Deterministic kernels everywhere (transformers' name and meaning): torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG, TF32 off, cuDNN deterministic, SDPA's math attention. On a GPU this is what makes "
        "resume bit-exact (docs/reliability.md); slower.")
    bf16: bool = opt(False, "bfloat16 autocast for forward passes (master weights stay fp32).")
    fp16: bool = opt(False, "float16 autocast (GPU only; prefer bf16).")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory in the transformer blocks.")
    sharding: str = opt(
        "none", "Multi-process memory sharding with PyTorch FSDP2: 'zero2' shards the trained models' weights, "
        "gradients and optimizer state (whole during forward/backward), 'zero3' also re-shards after each forward "
        "and shards the frozen models. 'none': a full copy per process. Set from accelerate's FSDP config too.",
        choices=("none", "zero2", "zero3"),
    )
    trust_remote_code: bool = opt(False, "Allow model code from the checkpoint directory (off: safer).")
    skip_bad_rows: bool = opt(False, "Skip and count malformed data rows instead of stopping with an error.")
    max_prompt_length: int = opt(512, "Prompts longer than this (tokens) are truncated or dropped.", ge=1)
    truncation_mode: str = opt("left", "Over-long prompts: 'left' keeps the last tokens, 'drop' skips the row.", choices=("left", "drop"))
    resume_from: str | None = opt(
        None, "Checkpoint directory to resume from ('latest': the newest in output_dir, or a fresh start when there "
        "is none yet, so one command line serves every restart).",
    )
    overwrite_output_dir: bool = opt(False, "Allow writing into an output_dir that holds a different run.")
    disable_tqdm: bool = opt(False, "Hide progress bars.")

    def _check_common(self) -> None:
        validate_fields(self)
        self._check_hf()  # HFArgs: dtype, attention, push_to_hub, report_to
        check(not (self.bf16 and self.fp16), f"{type(self).__name__}: set at most one of bf16 and fp16")
        check_device_field(self)


@dataclass
class LoraArgs:
    """LoRA (Hu et al. 2021) through peft, the optional extra ``ppomax[peft]``, imported only when on."""

    use_peft: bool = opt(
        False, "Train LoRA adapters instead of all weights. In PPO, π_ref is then the same model with its adapters "
        "disabled: no second copy of the policy in memory (PPO_MAX.md, the four models).",
    )
    lora_r: int = opt(8, "LoRA rank r.", ge=1)
    lora_alpha: float = opt(16.0, "LoRA scaling α (the update is scaled by α / r).", gt=0)
    lora_dropout: float = opt(
        0.0, "Dropout on the LoRA input. 0 keeps the PPO ratio exactly 1 on the first mini-batch (TRL uses 0.05).",
        ge=0, lt=1,
    )
    lora_target_modules: str = opt(
        "q_proj,k_proj,v_proj,o_proj", "Comma-separated module-name suffixes that get adapters (Llama/Qwen/Mistral "
        "attention; add gate_proj,up_proj,down_proj for the MLP; GPT-2: c_attn,c_proj), or 'all-linear' (peft: "
        "every linear layer but the output head).",
    )

    def _check_lora(self) -> None:
        n = type(self).__name__
        if isinstance(self.lora_target_modules, list | tuple):  # a YAML / Python list, as peft takes it
            self.lora_target_modules = ",".join(self.lora_target_modules)
        targets = [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]
        check(bool(targets), f"{n}.lora_target_modules = {self.lora_target_modules!r} names no module")
        check("all-linear" not in targets or targets == ["all-linear"],
              f"{n}.lora_target_modules = {self.lora_target_modules!r}: 'all-linear' stands alone (peft's shorthand "
              "for every linear layer but the output head)")
