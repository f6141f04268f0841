"""Porting from TRL / OpenRLHF (issue 23): input_ids datasets, LoRA all-linear, what a reward_fn sees, the
critic's start without a reward model, report_to lists and integrations, errors that teach."""

import importlib.machinery
import sys
import types

import pytest
import torch

from ppomax.config import ConfigError, PPOConfig, SFTConfig
from ppomax.data import DataError, load_rows
from ppomax.models import build_tiny_model, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "sft", num_layers=1, hidden_size=32, num_heads=2)


def _ppo(tiny, out, **kw):
    base = dict(model_name_or_path=tiny, output_dir=str(out), max_steps=1, critic_pretrain_steps=0,
                rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2, response_length=4,
                report_to="none", disable_tqdm=True, num_sample_generations=0, learning_rate=1e-3, seed=0,
                critic_init="sft")
    return PPOConfig.from_preset("ppo_max", **{**base, **kw})


def _no_model_loads(monkeypatch):
    """Any model load fails the test: the error under test must come first."""
    from ppomax import models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(models, "load_causal_lm", refuse)
    for name in ("from_pretrained", "from_causal_lm"):
        monkeypatch.setattr(models.ScalarHeadModel, name, refuse)


# ---- 4. TRL's shapes --------------------------------------------------------------------------------------


def test_input_ids_rows_are_prompts(tiny, tmp_path):
    import datasets

    from ppomax.ppo.trainer import PPOTrainer

    tok = load_tokenizer(tiny)
    prompts = ["the cat sat", "a dog ran far", "hello there", "one two three"]
    ds = datasets.Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})  # TRL's PPO example
    tr = PPOTrainer(_ppo(tiny, tmp_path / "run"), prompts=ds, reward_fn=lambda p, r: [float(len(x)) for x in r])
    assert tr.prompt_ids == [tok(p)["input_ids"] for p in prompts]  # used as given: no second BOS, no template
    assert torch.isfinite(torch.tensor(tr.train()[-1]["policy/loss"]))


@pytest.mark.parametrize("row, error", [
    ({"input_ids": "1 2 3"}, "field 'input_ids' must be a list of token ids, got str"),
    ({"input_ids": []}, "field 'input_ids' is empty"),
    ({"input_ids": [1, 2.5]}, "field 'input_ids' must hold integers, got float 2.5"),
    ({"input_ids": [1, True]}, "field 'input_ids' must hold integers, got bool True"),
    ({"input_ids": [1, 512]}, r"field 'input_ids' holds token id 512, outside the tokenizer's vocabulary \[0, 512\)"),
    ({"input_ids": [-1]}, "field 'input_ids' holds token id -1"),
])
def test_bad_input_ids_rows_name_the_row(row, error, tmp_path):
    from ppomax.data import write_jsonl

    write_jsonl(tmp_path / "p.jsonl", [{"input_ids": [3, 4]}, row])
    with pytest.raises(DataError, match=f"p.jsonl:2: {error}"):
        load_rows(tmp_path / "p.jsonl", "prompt", vocab_size=512)


def test_lora_all_linear_targets_every_linear_layer_but_the_head(tiny, tmp_path):
    from ppomax.models import ScalarHeadModel, apply_lora
    from ppomax.ppo.setup import load_models

    model = apply_lora(load_causal_lm(tiny), target_modules="all-linear")
    wrapped = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.endswith(("_proj",))
               and hasattr(model.get_submodule(n), "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not hasattr(model.get_submodule("base_model.model.lm_head"), "lora_A")
    critic = apply_lora(ScalarHeadModel.from_causal_lm(tiny), target_modules="all-linear")
    assert sum(hasattr(m, "lora_A") for m in critic.backbone.modules()) == 7
    pol, _, _, crit = load_models(_ppo(tiny, tmp_path, use_peft=True, critic_use_peft=True,
                                       lora_target_modules="all-linear"), with_reward_model=False)
    assert sum(hasattr(m, "lora_A") for m in pol.modules()) == 7 and crit is not None
    with pytest.raises(ConfigError, match="'all-linear' stands alone"):
        SFTConfig(lora_target_modules="all-linear,q_proj")


# ---- 6. what a reward_fn sees -----------------------------------------------------------------------------


def test_reward_fn_gets_messages_token_ids_and_columns(tiny, tmp_path):
    from ppomax.data import encode_prompt
    from ppomax.ppo.trainer import PPOTrainer

    tok = load_tokenizer(tiny)
    rows = [{"messages": [{"role": "user", "content": f"count to {i}"}], "answer": str(i)} for i in range(4)]
    seen = []

    def reward(prompts, responses, prompt_messages, prompt_ids, completion_ids, prompt_texts, truncated, answer):
        seen.append(dict(prompts=prompts, messages=prompt_messages, ids=prompt_ids, resp=completion_ids,
                         texts=prompt_texts, truncated=truncated, answer=answer))
        return [float(a) for a in answer]

    tr = PPOTrainer(_ppo(tiny, tmp_path / "run"), prompts=rows, reward_fn=reward)
    row = tr.train()[-1]
    batch = seen[0]
    assert len(batch["answer"]) == 4 and sorted(batch["answer"]) == ["0", "1", "2", "3"]  # every prompt once
    by_answer = {r["answer"]: r for r in rows}
    for msgs, ids, text, answer in zip(batch["messages"], batch["ids"], batch["texts"], batch["answer"]):
        assert msgs == by_answer[answer]["messages"]  # the row's messages, as given
        assert ids == encode_prompt(tok, msgs)  # what the policy saw: the chat template's tokens
        assert text.startswith("<|im_start|>user\ncount to") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>" not in batch["prompts"][0]  # the positional texts stay as before (special tokens off)
    assert all(isinstance(t, bool) for t in batch["truncated"]) and all(len(r) >= 1 for r in batch["resp"])
    assert row["reward/raw_mean"] == pytest.approx(1.5)  # the scores it returned: mean of 0..3


def test_reward_fn_asking_for_a_missing_column_fails_before_any_model(tiny, tmp_path, monkeypatch):
    from ppomax.ppo.trainer import PPOTrainer

    tok = load_tokenizer(tiny)
    _no_model_loads(monkeypatch)
    with pytest.raises(ConfigError, match=r"reward_fn requires answer, which neither ppomax .*\(columns: topic\)"):
        PPOTrainer(_ppo(tiny, tmp_path), tokenizer=tok, prompts=[{"prompt": "a", "topic": "x"}] * 4,
                   reward_fn=lambda prompts, responses, answer: [0.0] * len(prompts))


def test_reward_fn_with_the_default_critic_init_is_a_clear_error_before_any_model(tiny, tmp_path, monkeypatch):
    """critic_init='reward_model' (PPO-max) has no reward model to start from with a reward_fn: ppomax says so
    before loading anything instead of switching to a fresh head."""
    from ppomax.ppo.trainer import PPOTrainer

    tok = load_tokenizer(tiny)
    _no_model_loads(monkeypatch)
    cfg = _ppo(tiny, tmp_path, critic_init="reward_model")
    with pytest.raises(ConfigError, match="no --reward_model_path is given .* set critic_init='sft'"):
        PPOTrainer(cfg, tokenizer=tok, prompts=["a b"], reward_fn=lambda p, r: [0.0] * len(p))
    # critic-free estimators need no critic: no error there
    PPOConfig.from_preset("ppo_max", advantage_estimator="grpo", num_samples_per_prompt=2)


# ---- 7. report_to -----------------------------------------------------------------------------------------


def _fake_tracker(name, monkeypatch):
    """A stand-in for wandb / trackio (not installed here) recording what ppomax calls."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.calls = []

    class Run:
        def log(self, data, step=None):
            mod.calls.append(("log", data, step))

        def finish(self):
            mod.calls.append(("finish",))

    def init(**kw):
        mod.calls.append(("init", kw))
        return Run()

    mod.init = init
    mod.log = lambda data, step=None: mod.calls.append(("log", data, step))
    mod.finish = lambda: mod.calls.append(("finish",))
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_report_to_is_a_list_with_wandb_and_trackio(tiny, tmp_path, monkeypatch):
    from ppomax.ppo.trainer import PPOTrainer

    wandb, trackio = _fake_tracker("wandb", monkeypatch), _fake_tracker("trackio", monkeypatch)
    cfg = _ppo(tiny, tmp_path / "run", report_to=["tensorboard", "wandb", "trackio"], run_name="port-1")
    assert cfg.report_to == "tensorboard,wandb,trackio"
    PPOTrainer(cfg, prompts=["a b", "c d"], reward_fn=lambda p, r: [1.0] * len(p)).train()
    for mod in (wandb, trackio):
        kind, kw = mod.calls[0]
        assert kind == "init" and kw["name"] == "port-1" and kw["config"]["learning_rate"] == 1e-3
        logs = [c for c in mod.calls if c[0] == "log"]
        assert len(logs) == 1 and logs[0][2] == 1 and "reward/raw_mean" in logs[0][1]
        assert mod.calls[-1] == ("finish",)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_all_none_and_missing_packages(monkeypatch, tmp_path):
    from ppomax.hf_args import report_integrations

    assert report_integrations("none") == [] and report_integrations(["tensorboard"]) == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whatever is installed
    monkeypatch.setattr("importlib.util.find_spec", lambda n, *a: None if n in ("wandb", "trackio") else object())
    assert report_integrations("all") == ["tensorboard"]
    with pytest.raises(ConfigError, match="report_to names wandb, which is not installed: pip install wandb"):
        PPOConfig(report_to="tensorboard,wandb")
    with pytest.raises(ConfigError, match="unknown 'comet'"):
        SFTConfig(report_to="comet")
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        SFTConfig(report_to="none,tensorboard")


def test_a_missing_logging_package_stops_the_cli_before_any_model(tmp_path, capsys, monkeypatch):
    from ppomax.cli import main

    monkeypatch.setattr("importlib.util.find_spec", lambda n, *a: None if n == "wandb" else object())
    _no_model_loads(monkeypatch)
    rc = main(["ppo", "--model_name_or_path", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "o"),
               "--report_to", "tensorboard,wandb"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install wandb" in err and "no_model" not in err


def test_yaml_lists_for_report_to_and_lora_target_modules(tmp_path):
    from ppomax.cli import build_config, make_parser

    (tmp_path / "c.yaml").write_text("report_to: [tensorboard]\nlora_target_modules: [q_proj, v_proj]\n"
                                     "dtype: bfloat16\n")
    ns = make_parser().parse_args(["sft", "--config", str(tmp_path / "c.yaml")])
    cfg = build_config(SFTConfig, ns)
    assert (cfg.report_to, cfg.lora_target_modules, cfg.torch_dtype) == ("tensorboard", "q_proj,v_proj", "bfloat16")


# ---- 8. errors that teach ---------------------------------------------------------------------------------


def test_an_unknown_flag_prints_the_stage_usage_the_closest_flag_and_the_trl_names(capsys):
    from ppomax.cli import main

    def exit_code(argv):
        with pytest.raises(SystemExit) as info:
            main(argv)
        return info.value.code

    assert exit_code(["ppo", "--total_episodes", "6400", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ppomax ppo ") and "--rollout_batch_size" in err  # the stage's usage, not ppomax's
    assert "--total_episodes is --max_steps in ppomax: PPO iterations: max_steps = ceil(total_episodes" in err
    assert "TRL / OpenRLHF names that ppomax spells differently" in err
    assert "--gradient_accumulation_steps" in err and "--local_rollout_forward_batch_size" in err
    assert "--dtype" not in err.split("unrecognized arguments:")[1].splitlines()[0]  # --dtype is accepted
    assert exit_code(["ppo", "--learning_rat", "1e-5"]) == 2
    err = capsys.readouterr().err
    assert "--learning_rat: did you mean --learning_rate" in err and "TRL / OpenRLHF names" not in err
    assert exit_code(["sft", "--gradient_accumulation_steps", "2", "--zero_stage", "3"]) == 2  # valid in sft
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zero_stage 3" in err and "--zero_stage is --sharding" in err


def test_an_unknown_yaml_key_gets_the_same_hint(tmp_path):
    from ppomax.cli import build_config, make_parser

    (tmp_path / "c.yaml").write_text("total_episodes: 100\nkl_coeff: 0.1\n")
    ns = make_parser().parse_args(["ppo", "--config", str(tmp_path / "c.yaml")])
    with pytest.raises(ConfigError, match=r"(?s)unknown PPOConfig key\(s\): kl_coeff, total_episodes.*"
                                          r"did you mean --kl_coef.*--total_episodes is --max_steps"):
        build_config(PPOConfig, ns)


def test_ppomax_eval_reads_input_ids_rows(tiny, tmp_path):
    from ppomax.config import EvalConfig
    from ppomax.data import write_jsonl
    from ppomax.evaluate import evaluate

    tok = load_tokenizer(tiny)
    write_jsonl(tmp_path / "p.jsonl", [{"input_ids": tok("the cat")["input_ids"]}, {"prompt": "a dog"}])
    result = evaluate(EvalConfig(model_name_or_path=tiny, dataset=str(tmp_path / "p.jsonl"), num_prompts=2,
                                 output_dir=str(tmp_path / "eval"), num_samples=2, response_length=3,
                                 disable_tqdm=True))
    assert [s["prompt"] for s in result["samples"]] == ["the cat", "a dog"]
