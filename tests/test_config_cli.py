"""Config validation, presets, precedence (preset < YAML < flag) and the `ppomax` CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ppomax import cli
from ppomax import config as C
from ppomax.config import ConfigError, PPOConfig, RewardConfig, SFTConfig
from ppomax.studies.config import AblateConfig, DemoConfig

# ---------------------------------------------------------------------------------------------
# Validation: the message names the field, the value and the allowed range
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, expected",
    [
        (SFTConfig, {"learning_rate": -1e-4}, ["SFTConfig.learning_rate", "-0.0001", "> 0"]),
        (RewardConfig, {"learning_rate": 0.0}, ["RewardConfig.learning_rate", "0.0", "> 0"]),
        (PPOConfig, {"cliprange": 0.0}, ["PPOConfig.cliprange", "0.0", "> 0", "< 1"]),
        (PPOConfig, {"cliprange": -0.2}, ["PPOConfig.cliprange", "-0.2", "> 0"]),
        (PPOConfig, {"gamma": 1.5}, ["PPOConfig.gamma", "1.5", ">= 0", "<= 1"]),
        (PPOConfig, {"gamma": -0.1}, ["PPOConfig.gamma", "-0.1", ">= 0"]),
        (PPOConfig, {"lam": 1.01}, ["PPOConfig.lam", "1.01", "<= 1"]),
        (PPOConfig, {"lam": -0.5}, ["PPOConfig.lam", "-0.5", ">= 0"]),
        (PPOConfig, {"kl_estimator": "k7"}, ["PPOConfig.kl_estimator", "'k7'", "'k1'", "'k3'"]),
        (PPOConfig, {"rollout_batch_size": 10, "num_mini_batches": 4},
         ["PPOConfig.rollout_batch_size", "10", "divisible by num_mini_batches", "4"]),
    ],
)
def test_invalid_values_name_field_value_and_range(cls, kwargs, expected):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    msg = str(info.value)
    for part in expected:
        assert part in msg, (part, msg)


def test_valid_boundaries_are_accepted():
    # the ranges are inclusive where the paper's values sit on the boundary (γ = 1, λ in [0, 1])
    cfg = PPOConfig(gamma=1.0, lam=0.0, rollout_batch_size=8, num_mini_batches=4, per_device_train_batch_size=2)
    assert cfg.mini_batch_size == 2


def test_config_errors_are_user_errors_and_value_errors():
    from ppomax.errors import UserError

    with pytest.raises(UserError):
        SFTConfig(warmup_ratio=2.0)
    with pytest.raises(ValueError):
        SFTConfig(warmup_ratio=2.0)


def test_unknown_key_and_wrong_type_from_dict():
    with pytest.raises(ConfigError, match=r"unknown SFTConfig key\(s\): learning_rat"):
        C.config_from_dict(SFTConfig, {"learning_rat": 1e-3})
    with pytest.raises(ConfigError, match=r"SFTConfig\.seed = 'abc' is not a valid int"):
        C.config_from_dict(SFTConfig, {"seed": "abc"})
    with pytest.raises(ConfigError, match=r"SFTConfig\.max_steps = 2\.5 is not a valid int"):
        C.config_from_dict(SFTConfig, {"max_steps": 2.5})
    with pytest.raises(ConfigError, match=r"SFTConfig\.bf16 = 'maybe' is not a valid bool"):
        C.config_from_dict(SFTConfig, {"bf16": "maybe"})
    with pytest.raises(ConfigError, match=r"SFTConfig\.learning_rate may not be None"):
        C.config_from_dict(SFTConfig, {"learning_rate": None})
    # 'none' unsets an optional field
    assert C.config_from_dict(PPOConfig, {"reward_clip": "none"}).reward_clip is None


# ---------------------------------------------------------------------------------------------
# Presets are data
# ---------------------------------------------------------------------------------------------


def test_vanilla_preset():
    cfg = PPOConfig.from_preset("vanilla")
    assert cfg.preset == "vanilla"
    assert cfg.kl_coef == 0.0
    assert cfg.reward_normalize is False
    assert cfg.reward_clip is None
    assert cfg.cliprange_value is None
    assert cfg.critic_pretrain_steps == 0
    assert cfg.max_grad_norm is None
    # vanilla keeps the clipped surrogate, GAE and advantage whitening
    assert cfg.cliprange == 0.2 and cfg.whiten_advantages is True


def test_ppo_max_preset_is_the_paper_recipe():
    cfg = PPOConfig.from_preset("ppo_max")
    assert cfg.kl_coef == 0.05
    assert cfg.reward_normalize is True
    assert cfg.reward_clip == 0.8
    assert cfg.cliprange_value == 0.2
    assert cfg.gamma == 1.0
    assert cfg.lam == 0.9
    assert cfg.max_grad_norm == 1.0
    assert cfg.critic_pretrain_steps > 0
    assert cfg.cliprange == 0.2
    assert cfg.critic_init == "reward_model"
    # the dataclass defaults are the ppo_max preset
    assert dataclasses.asdict(cfg) == dataclasses.asdict(PPOConfig())


def test_from_preset_overrides_and_unknown_preset():
    cfg = PPOConfig.from_preset("vanilla", kl_coef=0.1, seed=3)
    assert cfg.kl_coef == 0.1 and cfg.seed == 3 and cfg.reward_clip is None
    with pytest.raises(ConfigError, match=r"PPOConfig\.preset = 'fancy' is invalid"):
        PPOConfig.from_preset("fancy")


# ---------------------------------------------------------------------------------------------
# Precedence: preset < YAML < flag
# ---------------------------------------------------------------------------------------------


def _parse(argv):
    ns = cli.make_parser().parse_args(argv)
    return cli.build_config(ns.cls, ns)


def test_precedence_preset_yaml_flag_with_build_config(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    # YAML overrides two vanilla values (kl_coef, reward_clip) and sets cliprange
    yaml_file.write_text("preset: vanilla\nkl_coef: 0.02\nreward_clip: 0.5\ncliprange: 0.3\n")
    cfg = _parse(["ppo", "--config", str(yaml_file), "--cliprange", "0.1"])
    assert cfg.preset == "vanilla"
    assert cfg.kl_coef == 0.02  # YAML beats preset (vanilla: 0)
    assert cfg.reward_clip == 0.5  # YAML beats preset (vanilla: None)
    assert cfg.cliprange == 0.1  # flag beats YAML
    assert cfg.critic_pretrain_steps == 0  # untouched preset value
    assert cfg.reward_normalize is False
    # a flag can unset an optional value the YAML set, and switch the preset
    cfg = _parse(["ppo", "--config", str(yaml_file), "--reward_clip", "none", "--preset", "ppo_max"])
    assert cfg.reward_clip is None and cfg.preset == "ppo_max"
    assert cfg.critic_pretrain_steps == PPOConfig().critic_pretrain_steps
    assert cfg.kl_coef == 0.02


def test_precedence_through_main(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setitem(cli.STAGES, "ppo", ("ppo", "PPOConfig", seen.append))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("kl_coef: 0.2\nlam: 0.8\n")
    rc = cli.main(["ppo", "--preset", "vanilla", "--config", str(yaml_file), "--lam", "0.7", "--whiten_rewards"])
    assert rc == 0
    (cfg,) = seen
    assert isinstance(cfg, PPOConfig)
    assert (cfg.preset, cfg.kl_coef, cfg.lam, cfg.whiten_rewards) == ("vanilla", 0.2, 0.7, True)
    assert cfg.max_grad_norm is None  # from the preset


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage, cls",
    [("sft", SFTConfig), ("rm", RewardConfig), ("ppo", PPOConfig), ("eval", C.EvalConfig),
     ("demo", DemoConfig), ("ablate", AblateConfig), ("tiny-model", C.TinyModelConfig)],
)
def test_stage_help_lists_every_field(stage, cls, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([stage, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(cls):
        assert f"--{f.name} " in out or f"--{f.name}\n" in out, f"--{f.name} missing from `ppomax {stage} --help`"
    assert "--config" in out


def _cli(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sft", "--learning_rate=-1"], ["SFTConfig.learning_rate", "-1.0", "> 0"]),
        (["sft", "--seed", "abc"], ["SFTConfig.seed", "'abc'", "not a valid int"]),
        (["ppo", "--gamma", "2"], ["PPOConfig.gamma", "2.0", "<= 1"]),
        (["ppo", "--rollout_batch_size", "6", "--num_mini_batches", "4"],
         ["rollout_batch_size = 6", "num_mini_batches = 4"]),
    ],
)
def test_cli_bad_config_exits_2_with_message(argv, expected, capsys):
    rc, err = _cli(argv, capsys)
    assert rc == 2
    assert err.startswith(f"ppomax {argv[0]}: config error: ")
    for part in expected:
        assert part in err, (part, err)
    assert "Traceback" not in err


def test_cli_yaml_errors_exit_2(tmp_path, capsys):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rate: 1.0e-4\nlearnin_rate: 3\n")
    rc, err = _cli(["sft", "--config", str(unknown)], capsys)
    assert rc == 2 and "unknown SFTConfig key(s): learnin_rate" in err

    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1, 2\nseed: 3\n")
    rc, err = _cli(["sft", "--config", str(broken)], capsys)
    assert rc == 2 and "YAML syntax error in" in err and str(broken) in err

    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    rc, err = _cli(["sft", "--config", str(not_mapping)], capsys)
    assert rc == 2 and "must be a mapping" in err

    rc, err = _cli(["sft", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and "config file not found" in err

    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("max_steps: many\n")
    rc, err = _cli(["sft", "--config", str(wrong_type)], capsys)
    assert rc == 2 and "SFTConfig.max_steps = 'many' is not a valid int" in err


def test_cli_bad_data_row_exits_1_naming_file_and_line(tmp_path, capsys):
    from ppomax.models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", num_layers=1, hidden_size=32)
    data = tmp_path / "sft.jsonl"
    data.write_text(
        json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n"
        + json.dumps({"prompt": "Bye"}) + "\n"  # line 2: no response
    )
    rc, err = _cli(["sft", "--model_name_or_path", model_dir, "--dataset", str(data),
                    "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--disable_tqdm"], capsys)
    assert rc == 1
    assert f"{data}:2: field 'response' is missing" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before training


def test_cli_without_stage_prints_help(capsys):
    assert cli.main([]) == 2
    assert "<stage>" in capsys.readouterr().out
