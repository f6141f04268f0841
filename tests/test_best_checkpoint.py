"""Evaluation during PPO and the best checkpoint (issue #15): --eval_steps, --metric_for_best_model,
--greater_is_better, --load_best_model_at_end. best/ is the argmax of the logged eval metric, it
survives rotation, resume and the collapse guard's rollback, and bad settings fail before compute."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from ppomax.config import ConfigError, PPOConfig
from ppomax.models import ScalarHeadModel, build_tiny_model, load_causal_lm, load_tokenizer
from ppomax.ppo.trainer import PPOTrainer

PROMPTS = ["Say some words:", "Say a few words:", "Say three words:", "Say words:"]
EVAL_PROMPTS = ["Words, please:", "Some words:", "A few words:", "Three words:"]


def share_of_e(prompts, responses):
    return [r.count("e") / max(len(r), 1) for r in responses]


def judge(prompts, responses, truncated):  # a gold judge that disagrees with the reward: shorter is better
    return [-len(r) / 10 for r in responses]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tiny = build_tiny_model(tmp_path_factory.mktemp("tiny"), num_layers=1, hidden_size=32, num_heads=2)
    torch.manual_seed(0)
    return dict(tokenizer=load_tokenizer(tiny), policy=load_causal_lm(tiny), ref=load_causal_lm(tiny),
                critic=ScalarHeadModel.from_causal_lm(tiny), path=tiny)


CFG = dict(rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2, generation_batch_size=4,
           response_length=6, critic_init="sft", learning_rate=3e-3, critic_learning_rate=1e-3,
           critic_pretrain_steps=1, max_steps=6, eval_steps=1, metric_for_best_model="gold", save_steps=2,
           save_total_limit=1, report_to="none", disable_tqdm=True, num_sample_generations=0, seed=0,
           full_determinism=torch.cuda.is_available())  # the runs compared bit for bit: on a GPU, deterministic kernels


def trainer(models, out, **kw) -> PPOTrainer:
    cfg = PPOConfig.from_preset(kw.pop("preset", "ppo_max"), **{**CFG, "output_dir": str(out), **kw})
    return PPOTrainer(cfg, policy=copy.deepcopy(models["policy"]), ref_policy=models["ref"],
                      critic=copy.deepcopy(models["critic"]), tokenizer=models["tokenizer"], prompts=PROMPTS,
                      reward_fn=share_of_e, gold_fn=judge, eval_prompts=EVAL_PROMPTS)


def best_dir(out):
    (ckpt,) = sorted((out / "best").glob("checkpoint-*"))
    return ckpt


@pytest.mark.parametrize("metric, greater", [("gold", None), ("eval/length", None), ("rm_reward", False)])
def test_best_is_the_argmax_of_the_logged_eval_metric(models, tmp_path, metric, greater):
    tr = trainer(models, tmp_path, metric_for_best_model=metric, greater_is_better=greater, save_steps=1,
                 save_total_limit=10)
    rows = tr.train()
    key = "eval/" + metric.removeprefix("eval/")
    evals = [(r["step"], r[key]) for r in rows if key in r]
    assert [s for s, _ in evals] == [2, 3, 4, 5, 6, 7]  # every PPO iteration, none in critic pre-training
    higher = greater if greater is not None else metric != "eval/length"
    value = (max if higher else min)(v for _, v in evals)
    step = next(s for s, v in evals if v == value)  # the first iteration that reached it
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (info["step"], info["value"], info["greater_is_better"]) == (step, value, higher)
    assert best_dir(tmp_path).name == f"checkpoint-{step}"
    # best/ holds the weights of that iteration: those of the periodic checkpoint of the same step
    a = load_file(best_dir(tmp_path) / "policy" / "model.safetensors")
    b = load_file(tmp_path / f"checkpoint-{step}" / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_survives_rotation_and_resume(models, tmp_path):
    straight = trainer(models, tmp_path / "straight")
    straight.train()
    best = json.loads((tmp_path / "straight" / "best" / "best.json").read_text())
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == ["checkpoint-7"]  # rotated
    assert best_dir(tmp_path / "straight").name == f"checkpoint-{best['step']}"  # best/ was not rotated away

    class Crash(Exception):
        pass

    out = tmp_path / "resumed"
    first = trainer(models, out)
    real_step = first.step

    def crashing(*a, **k):
        if first.iteration == 5:
            raise Crash
        return real_step(*a, **k)

    first.step = crashing
    with pytest.raises(Crash):
        first.train()
    resumed = trainer(models, out, resume_from="latest")
    resumed.train()
    assert json.loads((out / "best" / "best.json").read_text()) == best
    a = load_file(best_dir(out) / "policy" / "model.safetensors")
    b = load_file(best_dir(tmp_path / "straight") / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best.state_dict() == straight.best.state_dict()


def test_load_best_model_at_end_restores_the_best_weights(models, tmp_path):
    tr = trainer(models, tmp_path, load_best_model_at_end=True)
    tr.train()
    disk = load_file(best_dir(tmp_path) / "policy" / "model.safetensors")  # on the CPU; the policy on tr.device
    assert all(torch.equal(p.cpu(), disk[k]) for k, p in tr.policy.state_dict().items() if k in disk)
    last = load_file(tmp_path / "checkpoint-7" / "policy" / "model.safetensors")
    if best_dir(tmp_path).name != "checkpoint-7":
        assert not all(torch.equal(p.cpu(), last[k]) for k, p in tr.policy.state_dict().items() if k in last)


def test_rollback_and_best_never_delete_each_other(models, tmp_path):
    # vanilla at a high lr collapses within a few iterations (tests/test_guards.py); rollback on
    tr = trainer(models, tmp_path, preset="vanilla", kl_coef=0.01, collapse_guard="rollback", learning_rate=5e-2,
                 num_ppo_epochs=4, rollout_batch_size=8, per_device_train_batch_size=4, generation_batch_size=8,
                 response_length=8, save_steps=1, critic_pretrain_steps=0)
    rows = tr.train()
    assert any(r.get("collapse") for r in rows), "the run should collapse and roll back"
    assert (tmp_path / "best" / "best.json").exists() and best_dir(tmp_path).joinpath("COMPLETE").exists()
    assert tr.last_healthy and (tmp_path / tr.last_healthy.split("/")[-1] / "COMPLETE").exists()


def test_eval_metrics_are_documented_and_the_training_rng_is_untouched(models, tmp_path):
    from ppomax.report import METRIC_DOCS

    with_eval = trainer(models, tmp_path / "a", max_steps=3)
    rows = with_eval.train()
    assert {"eval/rm_reward", "eval/gold", "eval/kl", "eval/length", "eval/truncated", "eval/perplexity"} <= set(rows[-1])
    assert all(k in METRIC_DOCS for k in rows[-1] if k.startswith("eval/"))
    without = trainer(models, tmp_path / "b", max_steps=3, eval_steps=None, metric_for_best_model=None)
    rows_b = without.train()
    # evaluation samples with its own seed and restores the RNG: the training itself is the same
    assert [r["reward/raw_mean"] for r in rows] == [r["reward/raw_mean"] for r in rows_b]


@pytest.mark.parametrize("kw, match", [
    (dict(metric_for_best_model="loss"), r"metric_for_best_model = 'loss' is not an eval metric: allowed rm_reward"),
    (dict(metric_for_best_model="gold", eval_steps=None), r"metric_for_best_model needs --eval_steps"),
    (dict(load_best_model_at_end=True), r"load_best_model_at_end needs --metric_for_best_model"),
])
def test_bad_best_model_settings_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        PPOConfig(**kw)


def test_missing_eval_prompts_or_judge_fail_before_any_model_loads(models, tmp_path):
    cfg = PPOConfig.from_preset("ppo_max", **{**CFG, "output_dir": str(tmp_path), "model_name_or_path": models["path"]})
    with pytest.raises(ConfigError, match=r"eval_steps needs held-out prompts: --eval_dataset"):
        PPOTrainer(cfg, prompts=PROMPTS, reward_fn=share_of_e, gold_fn=judge)
    with pytest.raises(ConfigError, match=r"metric_for_best_model = 'gold' needs a gold judge"):
        PPOTrainer(cfg, prompts=PROMPTS, reward_fn=share_of_e, eval_prompts=EVAL_PROMPTS)
