"""Resume is bit-exact: a PPO run interrupted after iteration k and resumed with
``--resume_from latest`` ends in exactly the state of the run that went straight through.

Exactly means ``torch.equal`` / ``==`` on CPU for everything that shapes the next step: both
models, both AdamW states (exp_avg, exp_avg_sq, step), both LR schedulers, the adaptive KL
controller, the running reward moments (Eq. 18), the prompt sampler, the collapse-guard
baselines and the global RNG streams. The run uses what makes this hard: critic pre-training
(the first resume point lies in it, so that resumed run crosses into PPO), a cosine schedule
with warm-up (the LR depends on the step counters), an adaptive η and reward normalisation.

On a GPU the guarantee is made under ``--full_determinism`` (deterministic kernels; without them two
runs differ in the last bits, docs/reliability.md), so there the test runs with it only; on CPU it
runs with and without (the CPU kernels are deterministic either way).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ppomax.config import PPOConfig
from ppomax.models import ScalarHeadModel, build_tiny_model, load_causal_lm, load_tokenizer
from ppomax.ppo.trainer import PPOTrainer

PROMPTS = ["Say some words:", "Say a few words:", "Say three words:", "Say words:", "Words, please:"]


def share_of_the(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule-based reward: the share of 'the' among a response's words."""
    return [sum(w == "the" for w in r.split()) / max(len(r.split()), 1) for r in responses]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tiny = build_tiny_model(tmp_path_factory.mktemp("tiny"), num_layers=2, hidden_size=64, vocab_size=512)
    torch.manual_seed(0)  # the critic's fresh value head
    return dict(tokenizer=load_tokenizer(tiny), policy=load_causal_lm(tiny), ref=load_causal_lm(tiny),
                critic=ScalarHeadModel.from_causal_lm(tiny))


CFG = dict(rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2, generation_batch_size=4,
           response_length=6, critic_init="sft", learning_rate=1e-3, critic_learning_rate=1e-3,
           critic_pretrain_steps=2, max_steps=5, lr_scheduler_type="cosine", warmup_ratio=0.25,
           adaptive_kl=True, kl_target=0.5, kl_horizon=50, reward_normalize=True, save_steps=2,
           save_total_limit=10, report_to="none", disable_tqdm=True, num_sample_generations=0, seed=0)


def trainer(models, out, reward_fn=share_of_the, **kw) -> PPOTrainer:
    cfg = PPOConfig.from_preset("ppo_max", **{**CFG, "output_dir": str(out), **kw})
    return PPOTrainer(cfg, policy=copy.deepcopy(models["policy"]), ref_policy=models["ref"],
                      critic=copy.deepcopy(models["critic"]), tokenizer=models["tokenizer"], prompts=PROMPTS,
                      reward_fn=reward_fn)


class Crash(Exception):
    """Stands in for a crash (the SIGKILL case is tests/test_kill_resume.py)."""


def global_rng() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []  # sampling on a GPU draws from these
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), cuda


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer, name: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"], name  # lr, initial_lr, betas, ... (exact floats)
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0, name
    for i, st in sa["state"].items():
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}, (name, set(st))
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]), (name, i, k)
            assert v.dtype == sb["state"][i][k].dtype, (name, i, k)


@pytest.mark.parametrize("full_determinism", [True] if torch.cuda.is_available() else [False, True])
def test_interrupted_and_resumed_run_is_bit_identical_to_a_straight_run(models, tmp_path, full_determinism):
    straight = trainer(models, tmp_path / "straight", full_determinism=full_determinism)
    rows = straight.train()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["phase"] for r in rows] == ["critic_pretrain"] * 2 + ["ppo"] * 5
    rng_straight = global_rng()

    # The second run crashes twice, each time one iteration after a checkpoint (that iteration's
    # metrics row is written, its checkpoint is not), and is restarted with the same command line:
    # - during iteration 3: resumes from checkpoint-2, the last critic pre-training step, so the
    #   resumed run crosses into PPO (η has not moved yet, the policy scheduler is at 0);
    # - during iteration 6: resumes from checkpoint-4, in PPO (η adapted twice, the schedulers at
    #   different steps, the moments of 4 batches).
    run = tmp_path / "interrupted"
    pending, current = [3, 6], {}

    def crashing(prompts, responses):
        if pending and current["tr"].iteration == pending[0]:
            raise Crash(f"crash during iteration {pending.pop(0)}")
        return share_of_the(prompts, responses)

    restarts = 0
    while True:
        torch.manual_seed(1234 + restarts)  # the caller's RNG state must not matter
        random.seed(1234 + restarts)
        current["tr"] = resumed = trainer(models, run, reward_fn=crashing, resume_from="latest",
                                          full_determinism=full_determinism)
        try:
            resumed_rows = resumed.train()
            break
        except Crash:
            restarts += 1
            newest = [p.name for p in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))]
            assert newest[-1] == f"checkpoint-{2 * restarts}", newest
    assert restarts == 2 and not pending
    assert [r["step"] for r in resumed_rows] == [5, 6, 7]  # the last restart, from checkpoint-4
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6, 7]  # rows after a resumed checkpoint dropped

    # the trajectory after the last resume point, value for value
    for a, b in zip(rows[4:], resumed_rows):
        for k in ("reward/raw_mean", "reward/processed_mean", "kl/ref", "kl/coef", "policy/loss", "critic/value_loss",
                  "lr/policy", "lr/critic", "grad_norm/policy", "grad_norm/critic"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])

    # weights
    for name, m in (("policy", "policy"), ("critic", "critic")):
        pa, pb = dict(getattr(straight, m).named_parameters()), dict(getattr(resumed, m).named_parameters())
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), (name, k)
    # AdamW states (moments and step counts) of both models
    assert_same_optimizer(straight.policy_opt, resumed.policy_opt, "policy optimizer")
    assert_same_optimizer(straight.critic_opt, resumed.critic_opt, "critic optimizer")
    # schedulers: state and last LR (cosine with warm-up: both depend on the step counters)
    for s in ("policy_sched", "critic_sched"):
        sa, sb = getattr(straight, s).state_dict(), getattr(resumed, s).state_dict()
        sa.pop("lr_lambdas"), sb.pop("lr_lambdas")
        assert sa == sb, s
        assert getattr(straight, s).get_last_lr() == getattr(resumed, s).get_last_lr(), s
    assert straight.policy_sched.last_epoch == 5 and straight.critic_sched.last_epoch == 7
    # adaptive KL controller, running reward moments, everything else the trainer checkpoints
    assert straight.kl_ctl.value == resumed.kl_ctl.value == straight.kl_coef == resumed.kl_coef
    assert straight.kl_ctl.value != PPOConfig.__dataclass_fields__["kl_coef"].default  # η did adapt
    ma, mb = straight.score_moments, resumed.score_moments
    assert (ma.mean, ma.var, ma.count) == (mb.mean, mb.var, mb.count)
    assert ma.count == 7 * CFG["rollout_batch_size"]  # every iteration's scores, none counted twice
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert Path(sa.pop("last_healthy")).name == Path(sb.pop("last_healthy")).name  # in their own run dirs
    assert sa == sb
    # the global RNG streams (sampling) ended in the same place
    rng_resumed = global_rng()
    assert torch.equal(rng_straight[0], rng_resumed[0])
    assert rng_straight[1] == rng_resumed[1]
    assert np.array_equal(rng_straight[2], rng_resumed[2])
    assert len(rng_straight[3]) == len(rng_resumed[3])
    assert all(torch.equal(a, b) for a, b in zip(rng_straight[3], rng_resumed[3]))
