"""Critic-free advantage estimators in ppomax.functional (issue #14), against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from ppomax import functional as F


def test_grpo_advantages_by_hand():
    # groups of k = 3: [1, 2, 3] (mean 2, unbiased std 1) and [0, 0, 6] (mean 2, std sqrt(24 / 2) = sqrt 12)
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    adv = F.grpo_advantages(scores, 3, eps=0.0)
    s12 = math.sqrt(12.0)
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, -2 / s12, -2 / s12, 4 / s12]), atol=1e-6)
    eps_adv = F.grpo_advantages(scores, 3)  # ε = 1e-6 in the denominator
    assert eps_adv[0].item() == pytest.approx(-1.0 / (1.0 + 1e-6), abs=1e-7)
    assert eps_adv[0].item() > -1.0


def test_dr_grpo_does_not_divide_by_the_std():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    assert torch.equal(F.grpo_advantages(scores, 3, scale=False), torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))


def test_grpo_identical_rewards_give_zero_advantage():
    # std 0: (r − mean) = 0 exactly, and ε keeps the division finite
    adv = F.grpo_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7]), 2)
    assert torch.equal(adv, torch.zeros(4))


def test_rloo_advantages_by_hand():
    # r − mean of the other two: 1 − 2.5, 2 − 2, 3 − 1.5 | 0 − 3, 0 − 3, 6 − 0
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    assert torch.equal(F.rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    # = k / (k − 1) · (r − group mean)
    assert torch.allclose(F.rloo_advantages(scores, 3), 1.5 * F.grpo_advantages(scores, 3, scale=False))


def test_reinforce_pp_advantages_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 1.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # γ = 1 returns: row 0 [0.9, 0.9, 1.0], row 1 [0.5]; over the 4 tokens mean 0.825,
    # unbiased var (0.075² + 0.075² + 0.175² + 0.325²) / 3 = 0.1475 / 3
    sd = math.sqrt(0.1475 / 3)
    expect = torch.tensor([[0.075 / sd, 0.075 / sd, 0.175 / sd], [-0.325 / sd, 0.0, 0.0]])
    assert torch.allclose(F.reinforce_pp_advantages(rewards, mask), expect, atol=1e-5)
    # the returns themselves, for a caller that whitens over several processes
    G = torch.tensor([[0.9, 0.9, 1.0], [0.5, 0.0, 0.0]])
    assert torch.allclose(F.reinforce_pp_advantages(rewards, mask, whiten_returns=False), G, atol=1e-6)
    # γ = 0.5: row 0 returns [0 + 0.5·0.4, −0.1 + 0.5·1, 1] = [0.2, 0.4, 1.0]
    g = torch.tensor([0.2, 0.4, 1.0, 0.5])
    z = (g - g.mean()) / g.std()
    got = F.reinforce_pp_advantages(rewards, mask, gamma=0.5)
    assert torch.allclose(got[mask.bool()], z, atol=1e-5)
    assert torch.equal(got[~mask.bool()], torch.zeros(2))


@pytest.mark.parametrize("fn", [F.grpo_advantages, F.rloo_advantages])
def test_group_estimators_refuse_bad_groups(fn):
    with pytest.raises(ValueError, match="divisible by group_size"):
        fn(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        fn(torch.zeros(4), 1)


# ---------------------------------------------------------------------------------------------
# Through the trainer: each estimator trains, no critic exists, the math is the one above
# ---------------------------------------------------------------------------------------------

import random  # noqa: E402
import statistics  # noqa: E402

from ppomax.config import ConfigError, PPOConfig  # noqa: E402
from ppomax.data import write_jsonl  # noqa: E402
from ppomax.models import build_tiny_model  # noqa: E402
from ppomax.ppo.trainer import PPOTrainer  # noqa: E402

WORDS = ["the", "a", "and"]
PROMPTS = ["Say some words:", "Say a few words:", "Say three words:", "Say words:"]


def share_of_the(prompts, responses):
    """The share of 'the' among a response's words (≈ 1/3 for the SFT policy)."""
    return [sum(w == "the" for w in r.split()) / max(len(r.split()), 1) for r in responses]


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> str:
    from ppomax.config import SFTConfig
    from ppomax.sft import train_sft

    root = tmp_path_factory.mktemp("est")
    tiny = build_tiny_model(root / "tiny", num_layers=2, hidden_size=64, vocab_size=512)
    rng = random.Random(0)
    rows = [{"prompt": rng.choice(PROMPTS), "response": " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))}
            for _ in range(64)]
    write_jsonl(root / "sft.jsonl", rows)
    train_sft(SFTConfig(model_name_or_path=tiny, dataset=str(root / "sft.jsonl"), output_dir=str(root / "sft"),
                        learning_rate=3e-3, lr_scheduler_type="constant", warmup_ratio=0.0, per_device_train_batch_size=8,
                        eval_split=0.1, max_steps=60, logging_steps=20, eval_steps=60, save_steps=1000,
                        report_to="none", disable_tqdm=True, seed=0))
    return str(root / "sft")


def est_trainer(sft, out, estimator, **kw) -> PPOTrainer:
    base = dict(model_name_or_path=sft, output_dir=str(out), advantage_estimator=estimator, rollout_batch_size=4,
                num_samples_per_prompt=4, num_mini_batches=2, per_device_train_batch_size=8, generation_batch_size=16,
                response_length=8, learning_rate=1e-3, max_steps=2, report_to="none", disable_tqdm=True,
                num_sample_generations=0, save_steps=1000, seed=0)
    if estimator == "gae":
        base.update(critic_init="sft", critic_learning_rate=1e-3, critic_pretrain_steps=0)
    return PPOTrainer(PPOConfig.from_preset("ppo_max", **{**base, **kw}), prompts=PROMPTS, reward_fn=share_of_the)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_raise_the_reward_without_a_critic(sft, tmp_path, estimator):
    tr = est_trainer(sft, tmp_path, estimator, max_steps=20)
    assert tr.critic is None and tr.critic_opt is None  # no critic is loaded or trained
    rows = tr.train()
    assert len(rows) == 20 and all(r["phase"] == "ppo" for r in rows)  # no critic pre-training either
    assert not any(k.startswith("critic/") or k == "lr/critic" for r in rows for k in r)
    first = statistics.mean(r["reward/raw_mean"] for r in rows[:4])
    last = statistics.mean(r["reward/raw_mean"] for r in rows[-4:])
    assert last > first + 0.2, (estimator, first, last)
    assert not any(r.get("skipped") for r in rows)
    ckpt = tmp_path / "checkpoint-20"
    assert (ckpt / "policy").is_dir() and not (ckpt / "critic").exists()


def test_k_samples_per_prompt_sit_next_to_each_other(sft, tmp_path):
    tr = est_trainer(sft, tmp_path, "grpo")
    exp, _ = tr.make_experience()
    assert exp.prompt_ids.shape[0] == 16  # rollout_batch_size counts prompts: 4 prompts × k = 4
    groups = exp.prompt_ids.view(4, 4, -1)
    assert all(torch.equal(g[0], g[j]) for g in groups for j in range(4))
    assert len({tuple(g[0].tolist()) for g in groups}) == 4


@pytest.mark.parametrize("estimator, scale", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_trainer_advantages_are_the_group_functions(sft, tmp_path, estimator, scale):
    tr = est_trainer(sft, tmp_path, estimator, grpo_scale_rewards=scale)
    exp, _ = tr.make_experience()
    tr.compute_advantages(exp)
    seq = exp.processed_scores - tr.kl_coef * (exp.kl * exp.mask).sum(-1)  # r̃ − η Σ_t KL_t
    expect = (F.grpo_advantages(seq, 4, scale=scale) if estimator == "grpo" else F.rloo_advantages(seq, 4))
    assert torch.allclose(exp.advantages, expect[:, None] * exp.mask, atol=1e-6)


def test_reinforce_pp_advantages_in_the_trainer(sft, tmp_path):
    tr = est_trainer(sft, tmp_path, "reinforce_pp", num_samples_per_prompt=1, rollout_batch_size=8, num_mini_batches=2)
    exp, _ = tr.make_experience()
    tr.compute_advantages(exp)
    expect = F.reinforce_pp_advantages(F.shape_rewards(exp.processed_scores, exp.kl, exp.mask, tr.kl_coef), exp.mask)
    assert torch.allclose(exp.advantages, expect, atol=1e-6)


def test_kl_as_a_loss_term_moves_eta_out_of_the_reward(sft, tmp_path):
    tr = est_trainer(sft, tmp_path, "grpo", kl_in_reward=False, kl_coef=0.1)
    exp, _ = tr.make_experience()
    tr.compute_advantages(exp)
    assert torch.allclose(exp.advantages[:, 0], F.grpo_advantages(exp.processed_scores, 4), atol=1e-6)  # no KL in r
    tr.step()  # the policy moves away from π_ref, so the k3 term is positive next time
    row = tr.step()
    assert row["policy/kl_loss"] > 0
    no_kl = est_trainer(sft, tmp_path / "b", "grpo").step()
    assert "policy/kl_loss" not in no_kl


def test_k3_loss_term_ignores_padding_that_would_overflow(sft, tmp_path):
    """Issue 21 item 4: with --kl_in_reward false the k3 term exp(log π_ref − log π) was taken before the mask;
    a padding position with log π = −200 (after the response's EOS, where the training forward's value is
    arbitrary) overflowed to inf and inf · 0 made the loss NaN: every mini-batch was skipped."""
    stats = {}
    for name in ("plain", "low_padding"):
        tr = est_trainer(sft, tmp_path / name, "grpo", kl_in_reward=False, kl_coef=0.1, num_mini_batches=1)
        torch.manual_seed(0)
        exp, _ = tr.make_experience()
        assert (exp.mask == 0).any()  # some responses end before the cap: there is padding
        tr.compute_advantages(exp)
        exp.ref_logprobs = exp.ref_logprobs - 0.3 * exp.mask  # π moved away from π_ref: k3 > 0 on the tokens
        if name == "low_padding":
            real = tr._logprobs

            def low_on_padding(model, parts, temperature, _real=real, **kw):
                logp, ent = _real(model, parts, temperature, **kw)
                return logp.masked_fill(parts[3] == 0, -200.0), ent

            tr._logprobs = low_on_padding
        torch.manual_seed(1)
        stats[name] = tr.update(exp)
    plain, low = stats["plain"], stats["low_padding"]
    assert "skipped" not in low  # before the fix: skipped = 1.0, skip_cause 'non-finite policy loss'
    assert plain["policy/kl_loss"] > 0.01  # k3 of a log-ratio of 0.3 per token: ≈ 0.3 − (1 − e^−0.3) ≈ 0.041
    assert low["policy/kl_loss"] == pytest.approx(plain["policy/kl_loss"], rel=1e-6)
    assert low["policy/loss"] == pytest.approx(plain["policy/loss"], rel=1e-6)


def test_token_sum_reduction_divides_by_a_constant(sft, tmp_path):
    grads = {}
    for red in ("token_mean", "token_sum"):
        tr = est_trainer(sft, tmp_path / red, "grpo", loss_reduction=red, num_mini_batches=1)
        torch.manual_seed(0)
        exp, _ = tr.make_experience()
        tr.compute_advantages(exp)
        n_tok = exp.mask.sum()
        norm = n_tok if red == "token_mean" else torch.tensor(16.0 * 8)  # responses × response_length
        tr.policy.train()
        tr._micro_step(exp, exp.advantages, norm, train_policy=True)
        grads[red] = (torch.cat([p.grad.flatten() for p in tr.policy.parameters() if p.grad is not None]), n_tok)
    (g_mean, n_tok), (g_sum, _) = grads["token_mean"], grads["token_sum"]
    # the same summed token loss, divided by the token count or by 16 × 8
    assert n_tok < 128 and torch.allclose(g_sum * 128, g_mean * n_tok, rtol=1e-4, atol=1e-5)  # |g| up to ~17
    assert not torch.allclose(g_sum, g_mean, rtol=1e-2)


def test_critic_free_resume_is_exact(sft, tmp_path):
    kw = dict(max_steps=4, save_steps=2, save_total_limit=5)
    full_tr = est_trainer(sft, tmp_path / "full", "rloo", **kw)
    full = full_tr.train()
    resumed_tr = est_trainer(sft, tmp_path / "resumed", "rloo", resume_from=str(tmp_path / "full" / "checkpoint-2"), **kw)
    resumed = resumed_tr.train()
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["reward/raw_mean"] == b["reward/raw_mean"] and a["policy/loss"] == b["policy/loss"]
    for (k, a), (_, b) in zip(full_tr.policy.named_parameters(), resumed_tr.policy.named_parameters()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kw, match", [
    (dict(advantage_estimator="grpo"), r"num_samples_per_prompt = 1: advantage_estimator = 'grpo' needs >= 2"),
    (dict(advantage_estimator="rloo", num_samples_per_prompt=1), r"'rloo' needs >= 2"),
    (dict(advantage_estimator="grpo", num_samples_per_prompt=3, rollout_batch_size=10, num_mini_batches=4),
     r"rollout_batch_size = 10 × num_samples_per_prompt = 3: the 30 responses must be divisible by num_mini_batches = 4"),
    (dict(advantage_estimator="grpo", num_samples_per_prompt=4, critic_model_path="rm"),
     r"'grpo' trains no critic, but critic option\(s\) --critic_model_path were given"),
    (dict(advantage_estimator="reinforce_pp", critic_pretrain_steps=5, vf_coef=0.5),
     r"--critic_pretrain_steps, --vf_coef were given"),
])
def test_bad_estimator_settings_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        PPOConfig(**kw)


def test_bad_estimator_flags_fail_before_any_model_is_loaded(tmp_path, capsys):
    from ppomax import cli

    code = cli.main(["ppo", "--model_name_or_path", str(tmp_path / "no_such_model"), "--output_dir", str(tmp_path / "o"),
                     "--dataset", "x.jsonl", "--advantage_estimator", "rloo", "--num_samples_per_prompt", "4",
                     "--critic_learning_rate", "1e-5"])
    assert code == 2
    assert "--critic_learning_rate were given" in capsys.readouterr().err
