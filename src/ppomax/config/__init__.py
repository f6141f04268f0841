"""One config dataclass per stage; the CLI flags and YAML keys are generated from these fields.

Every field carries help text (citing the paper section where one applies) and, where it has
one, an allowed range that ``__post_init__`` checks before any model is loaded. Field names
follow ``transformers.TrainingArguments`` and TRL's ``PPOConfig`` where an equivalent exists.

Presets are data: :data:`PRESETS` maps a preset name to the field values it sets. The plain
``PPOConfig`` defaults *are* the ``ppo_max`` preset; ``vanilla`` overrides a handful of fields.
Precedence when parsing: preset < YAML file < command-line flags.

Import the names from ``ppomax.config``; the code lives in :mod:`~ppomax.config.base` (the shared
fields), :mod:`~ppomax.config.stages` (SFT, reward model, PPO), :mod:`~ppomax.config.presets` and
:mod:`~ppomax.config.commands` (eval, tiny-model, fetch-model, export). The studies' configs
(``DemoConfig``, ``AblateConfig``) live with the studies, in :mod:`ppomax.studies.config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ppomax.config.base import LoraArgs, RunArgs, check_device_field, check_engine
from ppomax.config.commands import EvalConfig, ExportConfig, FetchModelConfig, TinyModelConfig
from ppomax.config.presets import CRITIC_FIELDS, NO_CRITIC, PPO_MAX_PRESET, PRESETS, VANILLA_PRESET
from ppomax.config.stages import PPOConfig, RewardConfig, SFTConfig
from ppomax.fields import ConfigError, check, coerce, field_base_type, opt, validate_fields
from ppomax.hf_args import FIELD_ALIASES, HFArgs

__all__ = [
    "CRITIC_FIELDS", "FIELD_ALIASES", "NO_CRITIC", "PPO_MAX_PRESET", "PRESETS", "VANILLA_PRESET", "ConfigError",
    "EvalConfig", "ExportConfig", "FetchModelConfig", "HFArgs", "LoraArgs", "PPOConfig", "RewardConfig", "RunArgs",
    "SFTConfig", "TinyModelConfig", "check", "check_device_field", "check_engine", "coerce", "config_from_dict",
    "config_to_dict", "field_base_type", "load_yaml", "opt", "validate_fields",
]


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build ``cls`` from a dict (YAML + flags): unknown keys are errors; presets applied first."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {(FIELD_ALIASES[k] if k in FIELD_ALIASES and FIELD_ALIASES[k] in names else k): v
              for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        from ppomax.suggest import unknown_field_hints

        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}{unknown_field_hints(unknown, cls)}")
    typed = {k: coerce(cls, k, v) for k, v in values.items()}
    if cls is PPOConfig:
        return PPOConfig.from_preset(typed.pop("preset", "ppo_max"), **typed)
    return cls(**typed)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(path: str) -> dict[str, Any]:
    """The mapping of field: value in a YAML config file (``--config``); a ConfigError naming the file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML syntax error in {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of field: value, got {type(data).__name__}")
    return data


def __getattr__(name: str) -> Any:  # DemoConfig, AblateConfig, DEMO_METHODS: moved to ppomax.studies.config
    from ppomax import aliases

    return aliases.moved_name(__name__, name)
