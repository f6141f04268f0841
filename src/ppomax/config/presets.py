"""Presets are data: :data:`PRESETS` maps a preset name to the PPOConfig field values it sets.
``ppo_max`` = the PPOConfig defaults; ``vanilla`` switches off every PPO-max detail except the
clipped surrogate, GAE and advantage whitening (PPO_MAX.md)."""

from __future__ import annotations

from typing import Any

PPO_MAX_PRESET: dict[str, Any] = {}  # the dataclass defaults are the recipe

VANILLA_PRESET: dict[str, Any] = {
    "kl_coef": 0.0,
    "adaptive_kl": False,
    "reward_normalize": False,
    "reward_clip": None,
    "reward_scaling": False,
    "cliprange_value": None,
    "critic_pretrain_steps": 0,
    "max_grad_norm": None,
    "ptx_coef": 0.0,
    "missing_eos_penalty": None,
    "whiten_advantages": True,
    "advantage_clip": None,
    "entropy_coef": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {"ppo_max": PPO_MAX_PRESET, "vanilla": VANILLA_PRESET}

# Critic options: with a critic-free advantage estimator their preset values are replaced by NO_CRITIC
# (no critic pre-training, no value clipping), and any other value than that or the default is refused.
CRITIC_FIELDS = ("critic_model_path", "critic_init", "critic_use_peft", "critic_learning_rate", "critic_pretrain_steps",
                 "cliprange_value", "vf_coef")
NO_CRITIC: dict[str, Any] = {"critic_pretrain_steps": 0, "cliprange_value": None}
