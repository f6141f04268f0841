"""Non-finite guard and collapse guard of the PPO loop (issue 7, docs/reliability.md).

Non-finite values (losses, advantages, weights) are caught before the optimizer step: the update
is skipped with a logged cause, K consecutive skips stop the run, and a NaN never reaches a
checkpoint. The collapse guard is provoked by a genuine collapse: the vanilla preset (no KL
penalty, no reward normalisation, no gradient clipping) at a very high learning rate and 4 PPO
epochs drives a tiny random model's perplexity on its own samples from ~512 to ~150 within three
iterations, below the default threshold of 0.35 × the start value.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ppomax import cli
from ppomax import functional as F
from ppomax.config import PPOConfig
from ppomax.data import write_jsonl
from ppomax.errors import UserError
from ppomax.models import ScalarHeadModel, build_tiny_model, load_causal_lm, load_tokenizer
from ppomax.ppo.trainer import CollapseStop, PPOTrainer

PROMPTS = ["Say some words:", "Tell me a story.", "The weather", "Once upon a time"]
# A skipped first update makes torch warn that the LR scheduler stepped before the optimizer.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def share_of_e(prompts: list[str], responses: list[str]) -> list[float]:
    """Rewards one character: the policy can only please it by repeating a few tokens."""
    return [r.count("e") / max(len(r), 1) for r in responses]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_layers=1, hidden_size=32, num_heads=2)


BASE = dict(critic_init="sft", rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2,
            generation_batch_size=4, response_length=6, learning_rate=1e-3, critic_learning_rate=1e-3,
            critic_pretrain_steps=0, max_steps=2, report_to="none", disable_tqdm=True, num_sample_generations=0,
            save_steps=1000, seed=0)
# A collapse within a few iterations (module docstring).
COLLAPSE = dict(rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=4, generation_batch_size=8,
                response_length=8, learning_rate=5e-2, num_ppo_epochs=4)


def trainer(tiny, out, preset="ppo_max", reward_fn=share_of_e, **kw) -> PPOTrainer:
    cfg = PPOConfig.from_preset(preset, **{**BASE, "model_name_or_path": tiny, "output_dir": str(out), **kw})
    return PPOTrainer(cfg, prompts=PROMPTS, reward_fn=reward_fn)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    """Every parameter equals its snapshot (compared on the CPU: a loaded checkpoint is there)."""
    return all(torch.equal(v.cpu(), before[k].cpu()) for k, v in model.named_parameters())


def finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def metrics_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Non-finite guard (NaN rewards: tests/test_ppo.py::test_nan_reward_skips_the_update_then_stops)
# ---------------------------------------------------------------------------------------------


def test_infinite_value_loss_skips_the_update_with_its_cause(tiny, tmp_path):
    # A finite but huge score (vanilla: no normalisation) makes the value loss (V − R)² overflow.
    def huge(prompts, responses):
        return [3e38] + [0.0] * (len(responses) - 1)

    tr = trainer(tiny, tmp_path, preset="vanilla", reward_fn=huge, num_mini_batches=1)  # one (bad) mini-batch
    p0, c0 = params(tr.policy), params(tr.critic)
    row = tr.step()
    assert row["skipped"] == 1.0
    assert "non-finite value loss" in row["skip_cause"], row["skip_cause"]
    assert unchanged(tr.policy, p0) and unchanged(tr.critic, c0)
    assert all(p.grad is None for p in tr.policy.parameters())  # nothing left to leak into the next step


def test_nan_policy_loss_is_caught_before_backward(tiny, tmp_path, monkeypatch):
    real = F.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(F, "policy_loss", nan_loss)
    tr = trainer(tiny, tmp_path)
    p0, c0 = params(tr.policy), params(tr.critic)
    row = tr.step()
    assert row["skipped"] == 1.0 and row["skip_cause"] == "non-finite policy loss"
    assert unchanged(tr.policy, p0) and unchanged(tr.critic, c0)
    monkeypatch.setattr(F, "policy_loss", real)
    row = tr.step()  # a finite step afterwards updates normally and resets the counter
    assert "skipped" not in row and tr.consecutive_skips == 0
    assert not unchanged(tr.policy, p0)


def test_skip_counter_counts_iterations_not_mini_batches(tiny, tmp_path, monkeypatch):
    """Issue 21 item 5: with 4 mini-batches one bad iteration stopped the run at its third mini-batch
    (max_consecutive_skips = 3 counted optimizer steps). Now an iteration counts as skipped when none of its
    mini-batch steps was applied; 3 such iterations in a row stop the run; `skipped` is the skipped share."""
    real, bad = F.policy_loss, {"calls": set()}
    calls = iter(range(10**6))

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if next(calls) in bad["calls"] else loss), stats

    monkeypatch.setattr(F, "policy_loss", nan_loss)
    kw = dict(rollout_batch_size=8, num_mini_batches=4, per_device_train_batch_size=2, generation_batch_size=8,
              max_consecutive_skips=3, max_steps=10)
    tr = trainer(tiny, tmp_path, **kw)
    bad["calls"] = set(range(10**6))  # every mini-batch's policy loss is NaN
    for n in (1, 2):  # before the fix: UserError 'stopped after 3 consecutive skipped updates' in iteration 1
        p0 = params(tr.policy)
        row = tr.step()
        assert row["skipped"] == 1.0 and row["skip_cause"] == "non-finite policy loss"
        assert tr.consecutive_skips == n and unchanged(tr.policy, p0)
    bad["calls"] = set()
    p0 = params(tr.policy)
    row = tr.step()  # a good iteration resets the counter
    assert "skipped" not in row and tr.consecutive_skips == 0 and not unchanged(tr.policy, p0)
    start = next(calls)
    bad["calls"] = {start + 2}  # one of this iteration's 4 mini-batches (one micro-batch each): applied in part
    p0 = params(tr.policy)
    row = tr.step()
    assert row["skipped"] == 0.25 and row["skip_cause"] == "non-finite policy loss"  # before the fix: 1.0
    assert tr.consecutive_skips == 0 and not unchanged(tr.policy, p0)
    bad["calls"] = set(range(10**6))
    tr.step()
    tr.step()
    with pytest.raises(UserError, match="stopped after 3 consecutive skipped updates; last cause: non-finite policy"):
        tr.step()
    assert tr.consecutive_skips == 3


def test_nan_gradient_with_a_finite_loss_skips_the_update(tiny, tmp_path):
    tr = trainer(tiny, tmp_path, num_mini_batches=1)
    tr.policy.model.norm.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    p0, c0 = params(tr.policy), params(tr.critic)
    row = tr.step()
    assert row["skipped"] == 1.0 and row["skip_cause"] == "non-finite gradient norm (policy)"
    assert unchanged(tr.policy, p0) and unchanged(tr.critic, c0)
    assert finite(tr.policy)


def test_nan_advantages_skip_the_update(tiny, tmp_path):
    tr = trainer(tiny, tmp_path)
    real = tr.compute_advantages

    def nan_advantages(exp):
        real(exp)
        exp.advantages[0, 0] = float("nan")

    tr.compute_advantages = nan_advantages
    p0 = params(tr.policy)
    row = tr.step()
    assert row["skipped"] == 1.0 and row["skip_cause"] == "non-finite advantages or returns"
    assert unchanged(tr.policy, p0)


def test_nan_weights_skip_updates_stop_the_run_and_never_reach_a_checkpoint(tiny, tmp_path, caplog):
    out = tmp_path / "run"
    calls = {"n": 0}

    def poison_after_first_step(prompts, responses):
        # Called while iteration 2 scores its rollout: a weight turns NaN, as after a bad update.
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                tr.policy.model.norm.weight[0] = float("nan")
        return share_of_e(prompts, responses)

    # rollout_logprobs='forward': log π_old from a forward after scoring, so the poisoned weight shows
    # up as NaN log-probs in this rollout (from the sampling logits it would only reach the update)
    tr = trainer(tiny, out, reward_fn=poison_after_first_step, max_steps=6, save_steps=1, max_consecutive_skips=2,
                 rollout_logprobs="forward")
    with caplog.at_level(logging.WARNING, logger="ppomax"):
        with pytest.raises(UserError) as info:
            tr.train()
    msg = str(info.value)
    assert "stopped after 2 consecutive skipped updates" in msg
    assert "last cause: non-finite weights in policy" in msg
    assert f"{out / 'checkpoint-1'}, is intact" in msg
    # iteration 2: NaN log-probs -> NaN advantages, skipped; its checkpoint refused
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert "skipped" not in rows[0] and rows[1]["skip_cause"] == "non-finite advantages or returns"
    assert "iteration 2: checkpoint not saved: non-finite weights in policy" in caplog.text
    # the last good checkpoint is the newest on disk, loads, and is finite
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert finite(load_causal_lm(out / "checkpoint-1" / "policy"))
    assert finite(ScalarHeadModel.from_pretrained(out / "checkpoint-1" / "critic"))
    # and a run resumed from it is healthy again
    resumed = trainer(tiny, out, max_steps=2, save_steps=1, max_consecutive_skips=2, resume_from="latest",
                      rollout_logprobs="forward")
    rows = resumed.train()
    assert [r["step"] for r in rows] == [2] and "skipped" not in rows[0]


# ---------------------------------------------------------------------------------------------
# Collapse guard: warn, stop, rollback
# ---------------------------------------------------------------------------------------------


def test_collapse_warn_marks_rows_and_continues(tiny, tmp_path, caplog):
    out = tmp_path / "warn"
    tr = trainer(tiny, out, preset="vanilla", collapse_guard="warn", max_steps=5, **COLLAPSE)
    with caplog.at_level(logging.WARNING, logger="ppomax"):
        rows = tr.train()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # not stopped
    flagged = [r for r in rows if r.get("collapse")]
    assert flagged and flagged[0]["step"] > 1
    assert any("perplexity" in reason for reason in flagged[0]["collapse"])
    # metrics.jsonl carries the reasons too (the guard runs before the row is written)
    on_disk = metrics_rows(out)
    assert [r.get("collapse") for r in on_disk] == [r.get("collapse") for r in rows]
    assert f"iteration {flagged[0]['step']}: collapse signal" in caplog.text
    assert rows[-1]["policy/perplexity"] < 0.35 * rows[0]["policy/perplexity"]


def test_collapse_stop_saves_and_exits_1_from_the_cli(tiny, tmp_path, capsys):
    rm = tmp_path / "rm"
    torch.manual_seed(0)
    ScalarHeadModel.from_causal_lm(tiny).save_pretrained(rm, tokenizer=load_tokenizer(tiny))
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "stop"
    argv = ["ppo", "--preset", "vanilla", "--collapse_guard", "stop", "--model_name_or_path", tiny,
            "--reward_model_path", str(rm), "--dataset", str(prompts), "--output_dir", str(out), "--max_steps", "12",
            "--save_steps", "100", "--critic_learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm",
            "--num_sample_generations", "0"]
    for k, v in COLLAPSE.items():
        argv += [f"--{k}", str(v)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "ppomax ppo: error: collapse guard stopped the run at iteration " in err and "Traceback" not in err
    step = int(err.split("at iteration ")[1].split(":")[0])
    assert step < 12
    assert f"(state saved in {out / f'checkpoint-{step}'})" in err
    rows = metrics_rows(out)
    assert rows[-1]["step"] == step and rows[-1]["collapse"]  # the stopping row is logged with its reasons
    assert not any(r.get("collapse") for r in rows[:-1])
    ck = out / f"checkpoint-{step}"
    assert (ck / "COMPLETE").exists() and finite(load_causal_lm(ck / "policy"))
    assert issubclass(CollapseStop, UserError)


def _spy_rollbacks(tr: PPOTrainer) -> list[dict]:
    """Record every rollback: target, η before, and whether the weights now equal the target's."""
    events, real = [], tr.load_checkpoint

    def load(path, restore_rng=True):
        eta = tr.kl_coef
        real(path, restore_rng=restore_rng)
        disk = dict(load_causal_lm(path / "policy").named_parameters())
        events.append({"path": path, "eta_before": eta, "iteration": tr.iteration,
                       "restored": all(torch.equal(v.cpu(), disk[k]) for k, v in tr.policy.named_parameters())})

    tr.load_checkpoint = load
    return events


def test_collapse_rollback_restores_the_last_healthy_checkpoint_and_raises_eta(tiny, tmp_path):
    out = tmp_path / "rollback"
    # save every iteration, keep only 1: rotation must still keep the rollback target
    tr = trainer(tiny, out, preset="vanilla", kl_coef=0.01, collapse_guard="rollback", rollback_kl_factor=2.0,
                 max_steps=6, save_steps=1, save_total_limit=1, **COLLAPSE)
    events = _spy_rollbacks(tr)
    rows = tr.train()
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert events, "no rollback happened"
    first = next(i for i, r in enumerate(rows) if r.get("collapse"))
    ev = events[0]
    assert ev["restored"]
    assert ev["path"] == out / f"checkpoint-{rows[first]['step'] - 1}"  # the newest healthy one
    assert ev["eta_before"] == pytest.approx(0.01)
    assert rows[first]["kl/coef"] == pytest.approx(0.01)
    assert rows[first + 1]["kl/coef"] == pytest.approx(0.02)  # η × rollback_kl_factor
    assert tr.kl_coef == pytest.approx(0.01 * 2 ** len(events))  # each rollback multiplies again
    # the last healthy checkpoint survived rotation (save_total_limit=1) and is recorded on disk
    last = json.loads((out / "checkpoint-6" / "state.json").read_text())
    assert (out / "checkpoint-6" / "COMPLETE").exists() and (tmp_path / last["last_healthy"]).exists()


def test_collapse_rollback_before_any_periodic_checkpoint(tiny, tmp_path):
    # No periodic checkpoint before the collapse: the guard saved one before the first PPO step,
    # and vanilla's η = 0 (which no factor can raise) becomes PPO-max's 0.05.
    out = tmp_path / "early"
    tr = trainer(tiny, out, preset="vanilla", collapse_guard="rollback", max_steps=4, save_steps=100, **COLLAPSE)
    start = params(tr.policy)
    events = _spy_rollbacks(tr)
    rows = tr.train()
    assert events and events[0]["restored"] and events[0]["path"] == out / "checkpoint-0"
    assert unchanged(load_causal_lm(out / "checkpoint-0" / "policy"), start)
    first = next(i for i, r in enumerate(rows) if r.get("collapse"))
    assert rows[first]["kl/coef"] == 0.0 and rows[first + 1]["kl/coef"] == pytest.approx(0.05)


def test_reward_tail_signal():
    from ppomax.ppo.monitors import CollapseGuard

    calm = {"kl/ref": 0.0, "policy/perplexity": 10.0, "response/truncated_frac": 0.0}
    guard = CollapseGuard(max_kl=20.0, min_ppl_ratio=0.35, max_truncated=0.5, max_tail_ratio=3.0)
    assert guard.check({**calm, "reward/raw_p50": 0.0, "reward/raw_p99": 0.5}) == []  # start tail 0.5
    assert guard.check({**calm, "reward/raw_p50": 0.1, "reward/raw_p99": 1.5}) == []  # 1.4 ≤ 3 × 0.5
    reasons = guard.check({**calm, "reward/raw_p50": 0.1, "reward/raw_p99": 1.7})  # 1.6 > 1.5
    assert len(reasons) == 1 and reasons[0].startswith("reward tail p99 − p50 = 1.6 > 3.0 × start 0.5")
    assert CollapseGuard(**{**guard.state_dict(), "max_kl": 20.0, "min_ppl_ratio": 0.35, "max_truncated": 0.5,
                            "max_tail_ratio": 3.0}).start_tail == 0.5  # resumable
    off = CollapseGuard(max_kl=20.0, min_ppl_ratio=0.35, max_truncated=0.5)  # the default: off
    off.check({**calm, "reward/raw_p50": 0.0, "reward/raw_p99": 0.5})
    assert off.check({**calm, "reward/raw_p50": 0.0, "reward/raw_p99": 50.0}) == []


def test_reward_tail_through_the_trainer(tiny, tmp_path):
    calls = {"n": 0}

    def outlier_later(prompts, responses):  # from the third batch on, one response scores 100
        calls["n"] += 1
        scores = [0.1 * i for i in range(len(responses))]
        if calls["n"] >= 3:
            scores[0] = 100.0
        return scores

    tr = trainer(tiny, tmp_path, reward_fn=outlier_later, collapse_reward_tail=3.0, max_steps=3)
    rows = tr.train()
    assert [bool(r.get("collapse")) for r in rows] == [False, False, True]
    assert rows[2]["collapse"][0].startswith("reward tail")


def test_sft_non_finite_loss_stops_with_the_last_checkpoint_intact(tiny, tmp_path, monkeypatch):
    from ppomax import sft
    from ppomax.config import SFTConfig

    real, calls = sft.lm_loss, {"n": 0}

    def nan_at_step_2(model, batch):
        calls["n"] += 1
        loss, stats = real(model, batch)
        return (loss * float("nan"), stats) if calls["n"] == 2 else (loss, stats)

    monkeypatch.setattr(sft, "lm_loss", nan_at_step_2)
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": p, "response": " the a"} for p in PROMPTS])
    out = tmp_path / "sft"
    cfg = SFTConfig(model_name_or_path=tiny, dataset=str(data), output_dir=str(out), max_steps=4, save_steps=1,
                    per_device_train_batch_size=2, eval_split=0.0, report_to="none", disable_tqdm=True)
    with pytest.raises(UserError, match="sft: non-finite loss at step 2"):
        sft.train_sft(cfg)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert finite(load_causal_lm(out / "checkpoint-1" / "model"))


def test_weight_check_scans_only_trained_parameters():
    """A frozen LoRA base is never updated, so the per-iteration NaN-weight check skips it (it cost
    ~0.4 s per 135M-parameter model per iteration); a non-finite trained weight is still caught."""
    from torch import nn

    from ppomax import sharding

    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    m[0].requires_grad_(False)
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    assert sharding.all_finite(m)  # the NaN sits in a frozen layer
    with torch.no_grad():
        m[1].bias[0] = float("inf")
    assert not sharding.all_finite(m)
