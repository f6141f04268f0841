"""The bad-input catalogue (issue 7, docs/reliability.md): one test per case, through the CLI where
practical. Each ends with a clear error naming the problem and a non-zero exit code (or a
documented fallback / counted skip), and never touches a good run: most cases even point
``--output_dir`` at a finished run with ``--overwrite_output_dir`` and check that not one byte of
it changed. Security cases (pickles, remote code) are at the end.

Cases tested elsewhere, listed in docs/reliability.md: row-level data errors for every stage
(tests/test_data.py), YAML syntax errors and unknown YAML keys (tests/test_config_cli.py), every
out-of-range field at the dataclass level (tests/test_config_cli.py), the tokenizer pad fallback
(tests/test_models.py), reward_fn output errors (tests/test_ppo.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ppomax import cli
from ppomax.config import PPOConfig
from ppomax.data import write_jsonl
from ppomax.errors import UserError
from ppomax.models import ScalarHeadModel, build_tiny_model, load_tokenizer
from ppomax.ppo.trainer import PPOTrainer

PROMPTS = ["Say some words:", "Tell me a story.", "The weather", "Once upon a time"]



def ppo_flags(env, out, **over) -> list[str]:
    flags = {"model_name_or_path": env.tiny, "reward_model_path": env.rm, "dataset": env.prompts,
             "output_dir": str(out), "max_steps": 2, "critic_pretrain_steps": 0, "rollout_batch_size": 4,
             "num_mini_batches": 2, "per_device_train_batch_size": 2, "generation_batch_size": 4,
             "response_length": 6, "learning_rate": 1e-3, "critic_learning_rate": 1e-3, "save_steps": 1,
             "save_total_limit": 5, "num_sample_generations": 1, "report_to": "none", "seed": 0, **over}
    argv = ["ppo", "--disable_tqdm"]
    return argv + [f"--{k}={v}" for k, v in flags.items()]  # '=': values may start with '-'


def sft_flags(env, out, **over) -> list[str]:
    flags = {"model_name_or_path": env.tiny, "dataset": env.sft_data, "output_dir": str(out), "max_steps": 2,
             "save_steps": 1, "per_device_train_batch_size": 2, "eval_split": 0.0, "learning_rate": 1e-3,
             "report_to": "none", "seed": 0, **over}
    argv = ["sft", "--disable_tqdm"]
    return argv + [f"--{k}={v}" for k, v in flags.items()]  # '=': values may start with '-'


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """Tiny model + RM + data, and two finished runs (PPO and SFT) whose files must stay intact."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tiny = build_tiny_model(root / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    torch.manual_seed(0)
    ScalarHeadModel.from_causal_lm(tiny).save_pretrained(root / "rm", tokenizer=load_tokenizer(tiny))
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    write_jsonl(root / "sft.jsonl", [{"prompt": p, "response": " the a and"} for p in PROMPTS])
    e = SimpleNamespace(root=root, tiny=tiny, rm=str(root / "rm"), prompts=str(root / "prompts.jsonl"),
                        sft_data=str(root / "sft.jsonl"), good=root / "good", good_sft=root / "good_sft")
    assert cli.main(ppo_flags(e, e.good)) == 0
    assert cli.main(sft_flags(e, e.good_sft)) == 0
    assert (e.good / "checkpoint-2" / "COMPLETE").exists() and (e.good_sft / "checkpoint-2" / "COMPLETE").exists()
    return e


def snapshot(directory: Path, only_checkpoints: bool = False) -> dict[str, str]:
    """sha256 of every file (or every checkpoint file) under ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()
            and (not only_checkpoints or p.relative_to(directory).parts[0].startswith("checkpoint-"))}


@pytest.fixture
def untouched(env):
    """Fail the test if it changed a byte of the good runs."""
    before = snapshot(env.good), snapshot(env.good_sft)
    yield
    assert (snapshot(env.good), snapshot(env.good_sft)) == before, "a good run directory was modified"


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def write_lines(path: Path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Data: each bad row stops the stage before any model is loaded, naming file:line and field
# ---------------------------------------------------------------------------------------------

GOOD_PROMPT = json.dumps({"prompt": "Hello"}).encode()
GOOD_SFT = json.dumps({"prompt": "Hello", "response": "Hi."}).encode()
GOOD_PAIR = json.dumps({"prompt": "Hello", "chosen": "Hi.", "rejected": "Go away."}).encode()

DATA_CASES = {
    # case: (stage, good row, bad line 2, expected message after "file:2: ")
    "malformed_jsonl_line": ("ppo", GOOD_PROMPT, b'{"prompt": "Hi', "malformed JSON"),
    "missing_field": ("sft", GOOD_SFT, b'{"prompt": "Bye"}', "field 'response' is missing"),
    "wrong_field_type": ("rm", GOOD_PAIR, b'{"prompt": "a", "chosen": 3, "rejected": "y"}',
                         "field 'chosen' must be a string, got int"),
    "wrong_field_type_number": ("ppo", GOOD_PROMPT, b'{"prompt": 42}', "field 'prompt' must be a string, got int"),
    "empty_prompt": ("ppo", GOOD_PROMPT, b'{"prompt": "   "}', "field 'prompt' is empty"),
    "empty_response": ("sft", GOOD_SFT, b'{"prompt": "Hi", "response": ""}', "field 'response' is empty"),
    "invalid_utf8": ("ppo", GOOD_PROMPT, b'{"prompt": "caf\xe9"}', "invalid UTF-8 at byte"),
    "chosen_identical_to_rejected": ("rm", GOOD_PAIR, b'{"prompt": "a", "chosen": "same", "rejected": " same "}',
                                     "fields 'chosen' and 'rejected' are identical"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_row_is_named_and_stops_before_touching_the_run(case, env, untouched, tmp_path, capsys):
    stage, good, bad, expected = DATA_CASES[case]
    data = write_lines(tmp_path / "data.jsonl", [good, bad, good])
    argv = {"ppo": lambda: ppo_flags(env, env.good, dataset=data),
            "sft": lambda: sft_flags(env, env.good, dataset=data),
            "rm": lambda: sft_flags(env, env.good, dataset=data)}[stage]()
    argv[0] = stage
    rc, err = run_cli(argv + ["--overwrite_output_dir"], capsys)
    assert rc == 1
    assert f"ppomax {stage}: error: {data}:2: {expected}" in err, err


def test_bad_rows_skipped_when_asked_are_counted(env, tmp_path, capsys, caplog):
    data = write_lines(tmp_path / "data.jsonl", [GOOD_PROMPT, b"{oops", b'{"prompt": ""}', GOOD_PROMPT])
    with caplog.at_level(logging.INFO, logger="ppomax"):
        rc, _ = run_cli(ppo_flags(env, tmp_path / "out", dataset=data, max_steps=1, skip_bad_rows="true"), capsys)
    assert rc == 0
    assert "prompts: 2 used, 2 bad rows skipped" in caplog.text


def test_empty_dataset(env, untouched, tmp_path, capsys):
    data = write_lines(tmp_path / "empty.jsonl", [b"", b"  "])
    rc, err = run_cli(ppo_flags(env, env.good, dataset=data) + ["--overwrite_output_dir"], capsys)
    assert rc == 1 and f"{data}: no usable prompt rows" in err


def test_prompt_longer_than_max_length_is_truncated_or_dropped_and_counted(env, tmp_path, caplog):
    long = "word " * 50
    prompts = [long, "Hi", long]
    kw = dict(model_name_or_path=env.tiny, reward_model_path=env.rm, output_dir=str(tmp_path), max_prompt_length=8,
              rollout_batch_size=4, num_mini_batches=1, per_device_train_batch_size=4)
    with caplog.at_level(logging.INFO, logger="ppomax"):
        left = PPOTrainer(PPOConfig(**kw), prompts=prompts)
        drop = PPOTrainer(PPOConfig(truncation_mode="drop", **kw), prompts=prompts)
    assert [len(p) for p in left.prompt_ids][::2] == [8, 8] and len(left.prompt_ids[1]) < 8  # the last 8 tokens
    assert "prompts: 3 used, 0 bad rows skipped, 2 left-truncated, 0 dropped as too long" in caplog.text
    assert len(drop.prompt_ids) == 1
    assert "prompts: 1 used, 0 bad rows skipped, 0 left-truncated, 2 dropped as too long" in caplog.text


def test_every_prompt_too_long_is_an_error(env, untouched, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    write_jsonl(data, [{"prompt": "word " * 50}] * 3)
    rc, err = run_cli(ppo_flags(env, env.good, dataset=data, max_prompt_length=4, truncation_mode="drop")
                      + ["--overwrite_output_dir"], capsys)
    assert rc == 1 and "no prompts left after length filtering" in err and "max_prompt_length" in err


def test_tokenizer_without_pad_token_falls_back_to_eos(env, tmp_path, capsys, caplog):
    # The documented fallback (pad = eos, a warning) through a whole SFT run; the unit test is
    # tests/test_models.py::test_tokenizer_without_pad_falls_back_to_eos.
    model = tmp_path / "nopad"
    shutil.copytree(env.tiny, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["pad_token"]
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="ppomax"):
        rc, _ = run_cli(sft_flags(env, tmp_path / "out", model_name_or_path=model, max_steps=1), capsys)
    assert rc == 0
    assert "has no pad token; using eos '<|endoftext|>' as pad" in caplog.text


# ---------------------------------------------------------------------------------------------
# Paths and resume
# ---------------------------------------------------------------------------------------------


def test_model_path_that_does_not_exist(env, untouched, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    rc, err = run_cli(ppo_flags(env, env.good, model_name_or_path=missing) + ["--overwrite_output_dir"], capsys)
    assert rc == 1 and f"{missing}: no such tokenizer directory" in err
    rc, err = run_cli(ppo_flags(env, env.good, reward_model_path=missing) + ["--overwrite_output_dir"], capsys)
    assert rc == 1 and f"{missing}: no such scalar-head model directory" in err


@pytest.fixture(scope="module")
def other_model(env) -> str:
    """A tiny model of another size (hidden 48), with the same tokenizer."""
    return build_tiny_model(env.root / "other", num_layers=1, hidden_size=48, num_heads=2)


def test_ppo_resume_from_a_checkpoint_of_a_different_model(env, other_model, untouched, tmp_path, capsys):
    rc, err = run_cli(ppo_flags(env, tmp_path / "new", model_name_or_path=other_model, critic_init="sft",
                                resume_from=env.good / "checkpoint-2"), capsys)
    assert rc == 1 and f"{env.good / 'checkpoint-2'} was written for a different model" in err
    assert not list((tmp_path / "new").glob("checkpoint-*"))


def test_ppo_resume_with_a_different_config(env, untouched, capsys):
    rc, err = run_cli(ppo_flags(env, env.good, max_steps=4, learning_rate=5e-3, resume_from="latest"), capsys)
    assert rc == 1 and f"cannot resume {env.good}: its config differs in learning_rate" in err


def test_ppo_resume_from_an_sft_checkpoint(env, untouched, tmp_path, capsys):
    rc, err = run_cli(ppo_flags(env, tmp_path / "new", resume_from=env.good_sft / "checkpoint-2"), capsys)
    assert rc == 1 and "is a sft checkpoint, not ppo" in err


def test_sft_resume_from_a_checkpoint_of_a_different_model(env, other_model, untouched, tmp_path, capsys):
    rc, err = run_cli(sft_flags(env, tmp_path / "new", model_name_or_path=other_model,
                                resume_from=env.good_sft / "checkpoint-2"), capsys)
    assert rc == 1 and "weights do not match the model" in err and "size mismatch" in err


def test_sft_resume_with_a_different_config_or_stage(env, untouched, capsys):
    rc, err = run_cli(sft_flags(env, env.good_sft, max_steps=4, learning_rate=5e-3, resume_from="latest"), capsys)
    assert rc == 1 and f"cannot resume {env.good_sft}: its config differs in learning_rate" in err
    rc, err = run_cli(sft_flags(env, env.good_sft.parent / "new_sft", resume_from=env.good / "checkpoint-2"), capsys)
    assert rc == 1 and "is a ppo checkpoint, not sft" in err


def test_output_dir_holding_a_different_run_is_refused_unless_asked(env, untouched, tmp_path, capsys):
    rc, err = run_cli(ppo_flags(env, env.good, learning_rate=5e-3), capsys)
    assert rc == 1 and f"{env.good} already holds a different run (ppo)" in err and "--overwrite_output_dir" in err
    rc, err = run_cli(sft_flags(env, env.good), capsys)  # another stage
    assert rc == 1 and "already holds a different run (ppo)" in err
    # the very same command again, without --resume_from: starting over would overwrite its checkpoints
    rc, err = run_cli(ppo_flags(env, env.good), capsys)
    assert rc == 1 and f"{env.good} already holds checkpoints of this run (newest: checkpoint-2)" in err
    assert "--resume_from latest continues it" in err
    copy = tmp_path / "copy"
    shutil.copytree(env.good, copy)
    rc, _ = run_cli(ppo_flags(env, copy, learning_rate=5e-3, max_steps=1, overwrite_output_dir="true"), capsys)
    assert rc == 0 and "learning_rate: 0.005" in (copy / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, expected", [
    ("learning_rate", "-1e-5", "PPOConfig.learning_rate = -1e-05 is out of range: allowed > 0"),
    ("cliprange", "0", "PPOConfig.cliprange = 0.0 is out of range: allowed > 0 and < 1"),
    ("cliprange", "-0.2", "PPOConfig.cliprange = -0.2 is out of range"),
    ("gamma", "1.5", "PPOConfig.gamma = 1.5 is out of range: allowed >= 0 and <= 1"),
    ("lam", "-0.1", "PPOConfig.lam = -0.1 is out of range: allowed >= 0 and <= 1"),
    ("num_mini_batches", "3", "PPOConfig.rollout_batch_size = 4 × num_samples_per_prompt = 1: the 4 responses must "
                             "be divisible by num_mini_batches = 3"),
], ids=["negative_lr", "clip_zero", "clip_negative", "gamma_above_1", "lambda_negative", "batch_not_divisible"])
def test_out_of_range_config_value(flag, value, expected, env, untouched, capsys):
    rc, err = run_cli(ppo_flags(env, env.good, **{flag: value}), capsys)
    assert rc == 2 and err.startswith("ppomax ppo: config error: ") and expected in err, err


def test_unknown_config_key_on_the_command_line(env, untouched, capsys):
    # (unknown YAML keys: tests/test_config_cli.py::test_cli_yaml_errors_exit_2)
    with pytest.raises(SystemExit) as info:
        cli.main(ppo_flags(env, env.good) + ["--learning_rat", "1e-3"])
    assert info.value.code == 2
    assert "unrecognized arguments: --learning_rat" in capsys.readouterr().err


def test_yaml_syntax_error(env, untouched, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1e-3\nkl_coef: 0.1\n")
    rc, err = run_cli(ppo_flags(env, env.good) + ["--config", broken], capsys)
    assert rc == 2 and f"YAML syntax error in {broken}" in err and "line" in err


# ---------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reward_fn, expected", [
    (lambda p, r: [0.5] * (len(r) + 1), "reward_fn returned 5 scores for 4 responses"),
    (lambda p, r: [{"score": 1}] * len(r), "reward_fn must return a list of numbers, got list"),
], ids=["wrong_count", "not_numbers"])
def test_bad_reward_fn_output_leaves_the_checkpoints_alone(reward_fn, expected, env, tmp_path):
    # A resumed run whose reward function misbehaves: a clear UserError, and the checkpoints it
    # resumed from are unchanged (the other reward_fn errors: tests/test_ppo.py).
    run = tmp_path / "run"
    shutil.copytree(env.good, run)
    before = snapshot(run, only_checkpoints=True)
    cfg = cli.build_config(PPOConfig, cli.make_parser().parse_args(ppo_flags(env, run, max_steps=4, resume_from="latest")))
    with pytest.raises(UserError, match=expected):
        PPOTrainer(cfg, reward_fn=reward_fn).train()
    assert snapshot(run, only_checkpoints=True) == before


# ---------------------------------------------------------------------------------------------
# Security: pickles are refused, never executed; remote code only when asked
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _resume_copy(env, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(env.good, run)
    return run


def test_malicious_optimizer_state_is_refused_and_never_executed(env, tmp_path, capsys):
    run, marker = _resume_copy(env, tmp_path), tmp_path / "EXECUTED"
    # a real torch.save pickle, named like ppomax's own optimizer state
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, run / "checkpoint-2" / "optimizer-policy.pt")
    from ppomax.checkpoint import write_manifest

    # whoever can write the file can rewrite the manifest too: weights_only loading is the defence
    write_manifest(run / "checkpoint-2")
    rc, err = run_cli(ppo_flags(env, run, max_steps=3, resume_from="latest"), capsys)
    assert rc == 1 and "optimizer-policy.pt: refused to load (not a plain tensor state" in err
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker))).close()  # the payload is live: plain unpickling runs it
    assert marker.exists()


def test_pickle_file_in_a_checkpoint_is_refused_and_never_executed(env, tmp_path, capsys):
    run, marker = _resume_copy(env, tmp_path), tmp_path / "EXECUTED"
    with open(run / "checkpoint-2" / "policy" / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    rc, err = run_cli(ppo_flags(env, run, max_steps=3, resume_from="latest"), capsys)
    assert rc == 1 and "pytorch_model.bin: pickle-format file in a checkpoint" in err
    assert not marker.exists()


def test_model_with_only_pickle_weights_is_refused_and_never_executed(env, tmp_path, capsys):
    model, marker = tmp_path / "pickled_model", tmp_path / "EXECUTED"
    shutil.copytree(env.tiny, model)
    (model / "model.safetensors").unlink()
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    rc, err = run_cli(ppo_flags(env, tmp_path / "out", model_name_or_path=model), capsys)
    assert rc == 1 and f"{model}: could not load a model" in err
    assert "only safetensors weights are loaded, pytorch_model.bin is a pickle file" in err
    assert not marker.exists()


def test_remote_code_is_not_run_unless_asked(env, tmp_path, monkeypatch):
    # A model directory whose config points to its own Python code (auto_map): ppomax loads the
    # built-in architecture and never imports that code unless trust_remote_code is set.
    import transformers

    model, marker = tmp_path / "remote", tmp_path / "EXECUTED"
    shutil.copytree(env.tiny, model)
    (model / "evil_modeling.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig, LlamaForCausalLM, LlamaModel\n"
        "class EvilConfig(LlamaConfig):\n    pass\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n"
        "class EvilModel(LlamaModel):\n    pass\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_modeling.EvilConfig", "AutoModel": "evil_modeling.EvilModel",
                       "AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    calls = []
    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(
            lambda c, *a, _real=real, **kw: calls.append(kw) or _real(c, *a, **kw)))
    assert PPOConfig().trust_remote_code is False
    tr = PPOTrainer(PPOConfig(model_name_or_path=str(model), output_dir=str(tmp_path / "out"), critic_init="sft",
                              rollout_batch_size=4, num_mini_batches=1, per_device_train_batch_size=4),
                    prompts=PROMPTS, reward_fn=lambda p, r: [0.0] * len(r))
    assert type(tr.policy).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    assert len(calls) == 3  # policy, reference, critic backbone
    assert all(kw["trust_remote_code"] is False and kw["use_safetensors"] is True for kw in calls), calls


def test_resume_after_an_upgrade_that_added_a_config_field(env, tmp_path, capsys):
    # config.yaml written by an older ppomax lacks a newer field: its default is assumed, not a
    # difference (a renamed or changed value still is, see the tests above).
    import yaml

    run = tmp_path / "run"
    shutil.copytree(env.good, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["config"]["collapse_reward_tail"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    rc, _ = run_cli(ppo_flags(env, run, max_steps=3, resume_from="latest"), capsys)
    assert rc == 0 and (run / "checkpoint-3" / "COMPLETE").exists()
