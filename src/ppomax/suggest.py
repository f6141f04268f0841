"""Errors that teach: an unknown flag or YAML key gets the closest ppomax field (difflib) and, when it is a
TRL or OpenRLHF name, what it is called here (docs/migrating_from_trl.md has the full mapping)."""

from __future__ import annotations

import dataclasses
import difflib

# TRL (PPOConfig / TrainingArguments / ModelConfig / ScriptArguments) and OpenRLHF names that ppomax spells
# differently: name -> (ppomax field or None, how). Shown for a stage when the field exists there.
ALIASES: dict[str, tuple[str | None, str]] = {
    "total_episodes": ("max_steps", "PPO iterations: max_steps = ceil(total_episodes / rollout_batch_size)"),
    "num_episodes": ("max_steps", "OpenRLHF: passes over the prompts; ppomax counts iterations"),
    "num_train_epochs": ("max_steps", "PPO counts iterations of rollout_batch_size prompts"),
    "gradient_accumulation_steps": (
        "per_device_train_batch_size", "implied in PPO: each mini-batch (rollout_batch_size / num_mini_batches) "
        "is accumulated from micro-batches of per_device_train_batch_size"),
    "local_rollout_forward_batch_size": ("generation_batch_size", "prompts per generate() call"),
    "sft_model_path": ("model_name_or_path", "the policy and π_ref start from it"),
    "pretrain": ("model_name_or_path", "OpenRLHF's --pretrain"),
    "reward_pretrain": ("reward_model_path", "OpenRLHF: a seq-cls or ppomax reward model"),
    "critic_pretrain": ("critic_model_path", "OpenRLHF's --critic_pretrain"),
    "value_model_path": ("critic_model_path", "the critic's initialisation"),
    "stop_token": ("stop_at_eos", "'eos' is --stop_at_eos true (the default)"),
    "stop_token_id": (None, "put the id into generation_config.json's eos_token_id; ppomax stops at every id there"),
    "dataset_name": ("dataset", "a file, a saved dataset or a Hub id"),
    "prompt_data": ("dataset", "OpenRLHF's --prompt_data"),
    "dataset_train_split": ("dataset", "--dataset org/name:split"),
    "dataset_test_split": ("eval_dataset", "--eval_dataset org/name:split"),
    "eval_strategy": ("eval_steps", "evaluate every N iterations"),
    "save_strategy": ("save_steps", "checkpoint every N steps"),
    "logging_strategy": ("logging_steps", "log every N steps"),
    "warmup_steps": ("warmup_ratio", "a fraction of max_steps"),
    "resume_from_checkpoint": ("resume_from", "a checkpoint directory or 'latest'"),
    "logging_dir": ("output_dir", "TensorBoard events go to <output_dir>/tensorboard"),
    "save_path": ("output_dir", "OpenRLHF's --save_path"),
    "deepspeed": ("sharding", "zero2 / zero3 with PyTorch FSDP2"),
    "zero_stage": ("sharding", "OpenRLHF's --zero_stage 2|3 is --sharding zero2|zero3"),
    "fsdp": ("sharding", "zero2 / zero3 with PyTorch FSDP2"),
    "ds3_gather_for_generation": ("sharding", "zero2 keeps weights whole for generation, zero3 gathers per block"),
    "init_kl_coef": ("kl_coef", "η of the token-level KL penalty"),
    "micro_train_batch_size": ("per_device_train_batch_size", "OpenRLHF's micro-batch"),
    "max_epochs": ("num_ppo_epochs", "OpenRLHF: passes over each rollout"),
    "actor_learning_rate": ("learning_rate", "the policy's learning rate"),
    "prompt_max_len": ("max_prompt_length", "OpenRLHF's --prompt_max_len"),
    "generate_max_len": ("response_length", "maximum new tokens"),
    "max_new_tokens": ("response_length", "maximum new tokens"),
    "normalize_reward": ("reward_normalize", "running reward normalisation (Eq. 18)"),
    "lora_rank": ("lora_r", "LoRA rank"),
    "target_modules": ("lora_target_modules", "comma-separated, or all-linear"),
    "flash_attn": ("attn_implementation", "--attn_implementation flash_attention_2"),
    "use_wandb": ("report_to", "--report_to wandb"),
    "optim": (None, "ppomax always uses AdamW (torch's fused kernel where available)"),
    "model_adapter_name": ("use_peft", "one LoRA adapter; π_ref is the policy with it disabled"),
    "ref_adapter_name": ("ref_model_path", "merge the reference adapter and pass the directory"),
    "hub_token": (None, "log in with `hf auth login` or set HF_TOKEN"),
    "load_in_4bit": (None, "quantized training is not supported; --use_peft with --torch_dtype bfloat16 instead"),
    "load_in_8bit": (None, "quantized training is not supported; --use_peft with --torch_dtype bfloat16 instead"),
    "use_cpu": (None, "run without a GPU visible (CUDA_VISIBLE_DEVICES=) or `accelerate launch --cpu`"),
}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def stage_aliases(cls: type) -> dict[str, tuple[str | None, str]]:
    """The aliases that apply to ``cls``: their ppomax field exists there and the name itself does not."""
    names = _fields(cls)
    return {k: v for k, v in ALIASES.items() if k not in names and (v[0] is None or v[0] in names)}


def hint(name: str, cls: type) -> str:
    """One line for an unknown field ``name`` of ``cls``: its ppomax name, or the closest fields."""
    name = name.lstrip("-").replace("-", "_")
    alias = stage_aliases(cls).get(name)
    if alias is not None:
        target, how = alias
        return f"--{name} is {'--' + target if target else 'not a flag'} in ppomax: {how}"
    close = difflib.get_close_matches(name, sorted(_fields(cls)), n=3, cutoff=0.6)
    return f"--{name}: did you mean {' or '.join('--' + c for c in close)}?" if close else f"--{name}: no such flag"


def alias_table(cls: type) -> str:
    """The TRL / OpenRLHF names that differ for this stage, one per line."""
    rows = stage_aliases(cls)
    width = max(map(len, rows)) + 2
    lines = [f"  --{k:<{width}} {'--' + t if t else '(none)':<30} {how}" for k, (t, how) in sorted(rows.items())]
    return "TRL / OpenRLHF names that ppomax spells differently:\n" + "\n".join(lines)


def unknown_field_hints(names: list[str], cls: type) -> str:
    """The hints for unknown YAML keys, appended to the error (the CLI prints the table too)."""
    return "".join(f"\n  {hint(n, cls)}" for n in names)
