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
    """The checkpoint best/best.json names (best/ may also keep an older best a periodic checkpoint records)."""
    info = json.loads((out / "best" / "best.json").read_text())
    ckpt = out / "best" / info["checkpoint"]
    assert info["checkpoint"] == f"checkpoint-{info['step']}" and (ckpt / "COMPLETE").exists()
    return ckpt


def weights(ckpt) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "policy" / "model.safetensors")


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(Exception):
    pass


@pytest.mark.parametrize("metric, greater", [("gold", None), ("eval/length", False), ("rm_reward", False)])
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
    """Issue 21 item 1: the eval value entered the tracker before the collapse check; when the iteration rolled
    back, best/ got the restored (older) weights under the collapsed policy's value, and that value blocked
    every later real improvement. Lowest eval perplexity is exactly what a collapse produces, so the rolled-back
    iterations would win here: best/ must be the best *kept* iteration, with that iteration's weights."""
    # vanilla at a high lr collapses within a few iterations (tests/test_guards.py); rollback on
    tr = trainer(models, tmp_path, preset="vanilla", kl_coef=0.01, collapse_guard="rollback", learning_rate=5e-2,
                 num_ppo_epochs=4, rollout_batch_size=8, per_device_train_batch_size=4, generation_batch_size=8,
                 response_length=8, save_steps=1, save_total_limit=50, critic_pretrain_steps=0, max_steps=5,
                 metric_for_best_model="perplexity", greater_is_better=False)
    rows = tr.train()
    rolled_back = [r["step"] for r in rows if r.get("collapse")]
    assert rolled_back, "the run should collapse and roll back"
    lowest = min(rows, key=lambda r: r["eval/perplexity"])
    assert lowest["step"] in rolled_back  # the premise: a collapsed policy has the lowest eval perplexity
    kept = [(r["step"], r["eval/perplexity"]) for r in rows if not r.get("collapse")]
    value = min(v for _, v in kept)
    step = next(s for s, v in kept if v == value)
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    # before the fix: best.json named the rolled-back step 5 (eval/perplexity 87.9) over the kept step 3 (162.2)
    assert info["step"] not in rolled_back, (info, rolled_back)
    assert (info["step"], info["value"]) == (step, value)
    assert tr.best.state_dict() == {"key": "eval/perplexity", "value": value, "step": step}
    # best/ holds the weights that were evaluated at that step: the periodic checkpoint of the same step
    assert same_weights(weights(best_dir(tmp_path)), weights(tmp_path / f"checkpoint-{step}"))
    # and the two kinds of checkpoint never delete each other
    assert tr.last_healthy and (tmp_path / tr.last_healthy.split("/")[-1] / "COMPLETE").exists()


def test_resume_from_an_earlier_checkpoint_drops_the_abandoned_best(models, tmp_path):
    """Issue 21 item 2: resuming from an earlier checkpoint discarded the later periodic checkpoints but kept
    best/ from the abandoned future; load_best then took the highest-numbered best/checkpoint-*."""
    kw = dict(save_steps=1, save_total_limit=20, metric_for_best_model="rm_reward")
    trainer(models, tmp_path, **kw).train()
    future = json.loads((tmp_path / "best" / "best.json").read_text())
    resume = tmp_path / "checkpoint-3"
    branch = json.loads((resume / "state.json").read_text())["best"]  # the tracker at step 3
    assert future["step"] > 3 >= branch["step"], (future, branch)  # the best came later on the first branch
    resumed = trainer(models, tmp_path, resume_from=str(resume), **kw)
    real_step = resumed.step

    def crash_in_4(*a, **k):
        if resumed.iteration == 4:
            raise Crash
        return real_step(*a, **k)

    resumed.step = crash_in_4
    with pytest.raises(Crash):
        resumed.train()  # resumed at 3, crashed in 4: best/ now belongs to the branch that goes through 3
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    # before the fix: best.json still named the abandoned step
    assert (info["step"], info["value"]) == (branch["step"], branch["value"]) == (resumed.best.step, resumed.best.value)
    assert all(int(p.name.split("-")[1]) <= 3 for p in (tmp_path / "best").glob("checkpoint-*"))
    assert same_weights(weights(best_dir(tmp_path)), weights(tmp_path / f"checkpoint-{branch['step']}"))


def test_load_best_loads_the_step_best_json_names(models, tmp_path):
    """Issue 21 item 2: load_best took the highest-numbered best/checkpoint-*, not the one best.json names
    (after a crash, or with an older best still kept, they differ)."""
    import shutil

    from ppomax.ppo import evaluation

    tr = trainer(models, tmp_path, save_steps=1, save_total_limit=20)
    tr.train()
    named = best_dir(tmp_path)
    other = next(tmp_path / f"checkpoint-{s}" for s in (7, 6) if named.name != f"checkpoint-{s}")
    higher = tmp_path / "best" / "checkpoint-99"  # a complete checkpoint with a higher number, other weights
    shutil.copytree(other, higher)
    assert not same_weights(weights(named), weights(higher))
    assert evaluation.load_best(tr) == named  # before the fix: checkpoint-99
    assert all(torch.equal(p, weights(named)[k]) for k, p in tr.policy.state_dict().items() if k in weights(named))


@pytest.mark.parametrize("crash_at", ["save_best", "best.json"])
def test_crash_between_the_periodic_save_and_save_best_leaves_best_consistent(models, tmp_path, crash_at):
    """Issue 21 item 2: killed after checkpoint-N (whose state records the new best N) but before best/ had it
    (or before best.json named it): the resumed run ends with the uninterrupted run's best/ and tracker."""
    from ppomax import checkpoint as ckpt_lib
    from ppomax.ppo import evaluation

    kw = dict(save_steps=1, save_total_limit=3, metric_for_best_model="rm_reward")
    straight = trainer(models, tmp_path / "straight", **kw)
    straight.train()
    best = json.loads((tmp_path / "straight" / "best" / "best.json").read_text())
    assert best["step"] > 2  # the first evaluation (step 2) is always a best: crash at a later one

    out = tmp_path / "crashed"
    first = trainer(models, out, **kw)
    real_save_best, real_write = evaluation.save_best, getattr(ckpt_lib, "write_json_atomic", None)

    def crash(*a, **k):
        if first.iteration == best["step"]:
            raise Crash
        return (real_save_best if crash_at == "save_best" else real_write)(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "save_best", crash) if crash_at == "save_best" else mp.setattr(
            ckpt_lib, "write_json_atomic", crash)
        with pytest.raises(Crash):
            first.train()
    stale = json.loads((out / "best" / "best.json").read_text())
    assert stale["step"] < best["step"]  # the crash left best.json behind the newest checkpoint's tracker
    resumed = trainer(models, out, resume_from="latest", **kw)
    resumed.train()
    # before the fix: the resumed run kept the older best/ (and best.json) while its tracker said step N
    assert json.loads((out / "best" / "best.json").read_text()) == best
    assert resumed.best.state_dict() == straight.best.state_dict()
    assert same_weights(weights(best_dir(out)), weights(best_dir(tmp_path / "straight")))


def test_eval_metrics_are_documented_and_the_training_rng_is_untouched(models, tmp_path):
    from ppomax.metrics_doc import METRIC_DOCS

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
    # issue 21 item 6: no default direction can avoid selecting a collapse (before: 'lower is better')
    (dict(metric_for_best_model="perplexity", eval_steps=1),
     r"metric_for_best_model = 'perplexity' needs an explicit --greater_is_better true\|false: .*collapse"),
    (dict(metric_for_best_model="eval/length", eval_steps=1),
     r"metric_for_best_model = 'eval/length' needs an explicit --greater_is_better true\|false: .*collapse"),
])
def test_bad_best_model_settings_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        PPOConfig(**kw)


def test_length_and_perplexity_take_the_direction_given():
    from ppomax.ppo.evaluation import BestTracker, greater_is_better

    for metric in ("perplexity", "length"):
        for greater in (True, False):
            cfg = PPOConfig(metric_for_best_model=metric, eval_steps=1, greater_is_better=greater)
            assert greater_is_better(cfg.metric_for_best_model, cfg.greater_is_better) is greater
    assert greater_is_better("kl", None) is False and greater_is_better("truncated", None) is False
    assert greater_is_better("gold", None) is True and greater_is_better("rm_reward", None) is True
    t = BestTracker("perplexity", greater=True)
    assert t.improves(5.0) and (t.commit(5.0, 2) or True) and t.improves(6.0) and not t.improves(4.0)


def test_a_nan_eval_value_never_freezes_the_tracker(models, tmp_path, monkeypatch):
    """Issue 21 item 6: a NaN first eval value became the best, and every comparison with NaN is False: the
    tracker froze, best/ kept the NaN iteration for the rest of the run."""
    from ppomax.ppo import evaluation

    real = evaluation.evaluate
    calls = {"n": 0}

    def nan_first(tr, prompt_ids):
        out = real(tr, prompt_ids)
        calls["n"] += 1
        if calls["n"] == 1:
            out["eval/rm_reward"] = float("nan")
        return out

    monkeypatch.setattr(evaluation, "evaluate", nan_first)
    rows = trainer(models, tmp_path, metric_for_best_model="rm_reward").train()
    evals = [(r["step"], r["eval/rm_reward"]) for r in rows if "eval/rm_reward" in r]
    assert evals[0][0] == 2 and evals[0][1] != evals[0][1]  # the first evaluation is NaN
    value = max(v for _, v in evals[1:])
    step = next(s for s, v in evals if v == value)
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (info["step"], info["value"]) == (step, value)  # before the fix: step 2, value NaN
    t = evaluation.BestTracker("rm_reward", greater=True)
    assert not t.improves(float("nan")) and not t.improves(float("inf")) and t.improves(-1e30)
    t.load_state_dict({"value": float("nan"), "step": 3})  # a NaN best from an older state is no best
    assert t.improves(-1.0)


def test_missing_eval_prompts_or_judge_fail_before_any_model_loads(models, tmp_path):
    cfg = PPOConfig.from_preset("ppo_max", **{**CFG, "output_dir": str(tmp_path), "model_name_or_path": models["path"]})
    with pytest.raises(ConfigError, match=r"eval_steps needs held-out prompts: --eval_dataset"):
        PPOTrainer(cfg, prompts=PROMPTS, reward_fn=share_of_e, gold_fn=judge)
    with pytest.raises(ConfigError, match=r"metric_for_best_model = 'gold' needs a gold judge"):
        PPOTrainer(cfg, prompts=PROMPTS, reward_fn=share_of_e, eval_prompts=EVAL_PROMPTS)


# Each case: (rank 0's eval/rm_reward, rank 1's); the best so far is 1.5 (greater is better).
RANK_CASES = [(1.0, 3.0), (1.0, 1.8), (2.0, float("nan"))]


def _decisions_on_rank(d) -> list:
    """evaluation.evaluate_step on a stand-in trainer whose evaluation gives each rank its own value."""
    from types import SimpleNamespace

    from ppomax.ppo import evaluation

    out = []
    for case in RANK_CASES:
        best = evaluation.BestTracker("rm_reward", greater=True)
        best.commit(1.5, 2)
        tr = SimpleNamespace(eval_prompt_ids=[[1]], cfg=SimpleNamespace(eval_steps=1), iteration=3, total_iterations=9,
                             best=best, dist=d)
        evaluation.evaluate = lambda tr, ids, v=case[d.rank]: {"eval/rm_reward": v, "eval/kl": 0.1 * (d.rank + 1)}
        row = {"ppo_step": 2}
        out.append((evaluation.evaluate_step(tr, row), row["eval/rm_reward"], row["eval/kl"]))
    return out


def _decisions_worker(rank: int, world: int, port: int, out: str) -> None:
    import os
    from pathlib import Path

    from ppomax import distributed as dist_lib

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    d = dist_lib.setup()
    (Path(out) / f"decisions-{rank}.json").write_text(json.dumps(_decisions_on_rank(d)))
    dist_lib.shutdown()


def test_the_improved_decision_is_the_same_on_every_rank(tmp_path):
    """Issue 21 item 6: each rank compared its own eval value with the best; when they differed, one rank
    entered save_best (gathers, barriers) and the other did not: a deadlock. The values are now averaged over
    ranks first (2 gloo processes, each evaluation giving its rank another value)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_decisions_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"decisions-{r}.json").read_text()) for r in range(2))
    assert [x[0] for x in r0] == [x[0] for x in r1] == [True, False, False]  # before the fix: rank 0 False,
    # rank 1 True in the first two cases (each its own value against 1.5)
    assert [x[1] for x in r0[:2]] == [x[1] for x in r1[:2]] == [2.0, 1.4]  # the mean, logged on every rank
    assert r0[2][1] != r0[2][1] and r1[2][1] != r1[2][1]  # a NaN on one rank: NaN everywhere, never an improvement
    assert r0[0][2] == r1[0][2] == pytest.approx(0.15)  # every eval/* value is the ranks' mean
