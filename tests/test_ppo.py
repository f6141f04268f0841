"""PPOTrainer on tiny models: every option does what it says, learning, resume, invariances, errors.

The policy is a tiny Llama (2 layers, hidden 64, vocab 512) fine-tuned for a few dozen steps on
responses that are random sequences of the words "the", "a", "and". The rule-based reward is
the share of "the" among the response's words (≈ 1/3 for the SFT policy), so PPO has an easy,
quickly learnable signal.
"""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
from types import SimpleNamespace

import pytest
import torch

from ppomax import functional as F
from ppomax.config import PPOConfig
from ppomax.data import write_jsonl
from ppomax.errors import UserError
from ppomax.models import ScalarHeadModel, build_tiny_model, load_causal_lm, load_tokenizer
from ppomax.ppo.rollout import Experience
from ppomax.ppo.trainer import PPOTrainer

WORDS = ["the", "a", "and"]
PROMPTS = ["Say some words:", "Say a few words:", "Say three words:", "Say words:"]


def share_of_the(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule-based reward: the share of the words of a response that are 'the'."""
    out = []
    for r in responses:
        words = r.split()
        out.append(sum(w == "the" for w in words) / max(len(words), 1))
    return out



@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> SimpleNamespace:
    """A tiny random model and its SFT fine-tune on the 'the / a / and' responses."""
    from ppomax.config import SFTConfig
    from ppomax.sft import train_sft

    root = tmp_path_factory.mktemp("ppo_models")
    tiny = build_tiny_model(root / "tiny", num_layers=2, hidden_size=64, vocab_size=512)
    rng = random.Random(0)
    rows = [{"prompt": rng.choice(PROMPTS),
             "response": " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))}
            for _ in range(64)]
    write_jsonl(root / "sft.jsonl", rows)
    train_sft(SFTConfig(model_name_or_path=tiny, dataset=str(root / "sft.jsonl"), output_dir=str(root / "sft"),
                        learning_rate=3e-3, lr_scheduler_type="constant", warmup_ratio=0.0,
                        per_device_train_batch_size=8, eval_split=0.1, max_steps=60, logging_steps=20,
                        eval_steps=60, save_steps=1000, report_to="none", disable_tqdm=True, seed=0))
    return SimpleNamespace(root=root, tiny=tiny, sft=str(root / "sft"))


@pytest.fixture(scope="module")
def models(dirs) -> SimpleNamespace:
    """Loaded once; trainers that update get deep copies."""
    torch.manual_seed(0)
    return SimpleNamespace(tokenizer=load_tokenizer(dirs.sft), policy=load_causal_lm(dirs.sft),
                           ref=load_causal_lm(dirs.sft), critic=ScalarHeadModel.from_causal_lm(dirs.sft))


BASE = dict(rollout_batch_size=4, num_mini_batches=1, per_device_train_batch_size=4, generation_batch_size=4,
            response_length=8, critic_init="sft", learning_rate=1e-3, critic_learning_rate=1e-3,
            critic_pretrain_steps=0, max_steps=2, report_to="none", disable_tqdm=True, num_sample_generations=0,
            save_steps=1000, seed=0)


def make_cfg(out, preset: str = "ppo_max", **kw) -> PPOConfig:
    return PPOConfig.from_preset(preset, **{**BASE, "output_dir": str(out), **kw})


def make_trainer(models, out, preset: str = "ppo_max", reward_fn=share_of_the, **kw) -> PPOTrainer:
    """A trainer on copies of the shared models (the frozen reference is shared)."""
    return PPOTrainer(make_cfg(out, preset, **kw), policy=copy.deepcopy(models.policy), ref_policy=models.ref,
                      critic=copy.deepcopy(models.critic), tokenizer=models.tokenizer, prompts=PROMPTS,
                      reward_fn=reward_fn)


def hand_experience(scores, truncated=None, seed: int = 0, device="cpu") -> Experience:
    """B = 3 responses of lengths 4, 2, 1 (T = 4) with random log-probs and values, on ``device``
    (a trainer's: built on the CPU from a seeded generator, so the numbers do not depend on it)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    B, T = mask.shape
    logp = -torch.rand(B, T, generator=g) * 3 * mask
    ref = -torch.rand(B, T, generator=g) * 3 * mask
    values = torch.randn(B, T, generator=g) * mask
    if truncated is None:
        truncated = [False] * B
    exp = dict(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.zeros(B, T, dtype=torch.long), mask=mask, truncated=torch.tensor(truncated),
        logprobs=logp, ref_logprobs=ref, values=values, scores=torch.tensor(scores, dtype=torch.float32),
    )
    return Experience(**{k: v.to(device) for k, v in exp.items()})


LAST = [3, 1, 0]  # index of the last response token of each row of hand_experience


def param_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# compute_advantages: score processing and reward shaping, option by option
# ---------------------------------------------------------------------------------------------


def test_kl_coef_zero_rewards_are_the_score_at_the_last_token(models, tmp_path):
    tr = make_trainer(models, tmp_path, preset="vanilla")
    assert tr.kl_coef == 0.0
    exp = hand_experience([1.0, -2.0, 3.0], device=tr.device)
    tr.compute_advantages(exp)
    expected = torch.zeros(3, 4, device=tr.device)
    for b, s in enumerate([1.0, -2.0, 3.0]):
        expected[b, LAST[b]] = s
    assert torch.equal(exp.processed_scores, exp.scores)  # vanilla: raw scores
    assert torch.allclose(exp.rewards, expected)
    # the KL estimate is still computed (for monitoring), just not in the reward
    assert exp.kl.abs().sum() > 0


def test_kl_coef_puts_minus_eta_kl_on_every_token(models, tmp_path):
    tr = make_trainer(models, tmp_path, preset="vanilla", kl_coef=0.1)
    exp = hand_experience([1.0, -2.0, 3.0], device=tr.device)
    tr.compute_advantages(exp)
    kl = (exp.logprobs - exp.ref_logprobs) * exp.mask  # k1
    expected = -0.1 * kl
    for b, s in enumerate([1.0, -2.0, 3.0]):
        expected[b, LAST[b]] += s
    assert torch.allclose(exp.rewards, expected, atol=1e-6)
    # k3 estimator: ρ = π_ref/π_old, (ρ − 1) − log ρ ≥ 0
    tr3 = make_trainer(models, tmp_path, preset="vanilla", kl_coef=0.1, kl_estimator="k3")
    exp3 = hand_experience([1.0, -2.0, 3.0], device=tr3.device)
    tr3.compute_advantages(exp3)
    log_rho = (exp3.ref_logprobs - exp3.logprobs) * exp3.mask
    assert torch.allclose(exp3.kl, (torch.exp(log_rho) - 1 - log_rho) * exp3.mask, atol=1e-6)
    assert (exp3.kl >= 0).all()


def test_reward_clip_bounds_processed_scores(models, tmp_path):
    # clipping alone (no normalisation): clamp the raw scores to [−δ, δ]
    tr = make_trainer(models, tmp_path, preset="vanilla", reward_clip=0.5)
    exp = hand_experience([1.0, -2.0, 0.2], device=tr.device)
    tr.compute_advantages(exp)
    assert exp.processed_scores.tolist() == pytest.approx([0.5, -0.5, 0.2])
    assert exp.rewards[0, 3].item() == pytest.approx(0.5)
    # PPO-max (Eq. 18): r̃ = clip((r − μ)/σ, −δ, δ)
    tr = make_trainer(models, tmp_path, preset="ppo_max", reward_clip=0.8, kl_coef=0.0)
    scores = [0.0, 0.1, 10.0]
    exp = hand_experience(scores, device=tr.device)
    tr.compute_advantages(exp)
    s = torch.tensor(scores, dtype=torch.float64)
    z = (s - s.mean()) / s.std(unbiased=False)  # ≈ [-0.72, -0.69, 1.41]
    assert exp.processed_scores.tolist() == pytest.approx(z.clamp(-0.8, 0.8).tolist(), abs=1e-5)
    assert exp.processed_scores.abs().max().item() == pytest.approx(0.8)
    assert exp.processed_scores.abs().max().item() <= 0.8 + 1e-7


def test_reward_normalize_uses_moments_of_all_history(models, tmp_path):
    tr = make_trainer(models, tmp_path, preset="vanilla", reward_normalize=True)
    first, second = [1.0, 2.0, 3.0], [10.0, 11.0, 12.0]
    tr.compute_advantages(hand_experience(first, device=tr.device))
    exp = hand_experience(second, device=tr.device)
    tr.compute_advantages(exp)
    hist = torch.tensor(first + second, dtype=torch.float64)
    expected = (torch.tensor(second, dtype=torch.float64) - hist.mean()) / hist.std(unbiased=False)
    assert exp.processed_scores.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    # a uniformly good batch keeps positive rewards (per-batch normalisation would centre it)
    assert (exp.processed_scores > 0).all()
    assert tr.score_moments.count == 6 and tr.score_moments.mean == pytest.approx(6.5)


def test_reward_scaling_divides_by_running_std(models, tmp_path):
    tr = make_trainer(models, tmp_path, preset="vanilla", reward_scaling=True)
    first, second = [1.0, 2.0, 3.0], [10.0, 11.0, 12.0]
    tr.compute_advantages(hand_experience(first, device=tr.device))
    exp = hand_experience(second, device=tr.device)
    tr.compute_advantages(exp)
    std = torch.tensor(first + second, dtype=torch.float64).std(unbiased=False).item()
    assert exp.processed_scores.tolist() == pytest.approx([x / std for x in second], rel=1e-5)  # no shift


def test_missing_eos_penalty_hits_truncated_responses_only(models, tmp_path):
    tr = make_trainer(models, tmp_path, preset="vanilla", missing_eos_penalty=2.0)
    exp = hand_experience([1.0, -2.0, 3.0], truncated=[True, False, True], device=tr.device)
    tr.compute_advantages(exp)
    assert exp.processed_scores.tolist() == pytest.approx([-1.0, -2.0, 1.0])
    assert exp.scores.tolist() == [1.0, -2.0, 3.0]  # raw scores (logged) are untouched
    # off (None): nothing subtracted
    tr = make_trainer(models, tmp_path, preset="vanilla")
    exp = hand_experience([1.0, -2.0, 3.0], truncated=[True, False, True], device=tr.device)
    tr.compute_advantages(exp)
    assert exp.processed_scores.tolist() == pytest.approx([1.0, -2.0, 3.0])


def test_whiten_rewards(models, tmp_path):
    tr_plain = make_trainer(models, tmp_path, preset="vanilla", kl_coef=0.1)
    tr_white = make_trainer(models, tmp_path, preset="vanilla", kl_coef=0.1, whiten_rewards=True)
    plain = hand_experience([1.0, -2.0, 3.0], device=tr_plain.device)
    white = hand_experience([1.0, -2.0, 3.0], device=tr_white.device)
    tr_plain.compute_advantages(plain)
    tr_white.compute_advantages(white)
    m = plain.mask
    # unit variance over the response tokens, mean kept (shift_mean=False), zero outside the mask
    assert F.masked_var(white.rewards, m).item() == pytest.approx(1.0, rel=1e-4)
    assert F.masked_mean(white.rewards, m).item() == pytest.approx(F.masked_mean(plain.rewards, m).item(), abs=1e-5)
    assert (white.rewards * (1 - m)).abs().sum() == 0
    assert not torch.allclose(white.rewards, plain.rewards)
    # and GAE runs on the whitened rewards
    adv, _ = F.gae(white.rewards, white.values, m, 1.0, 0.9)
    assert torch.allclose(white.advantages, adv, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# update(): importance sampling, entropy bonus, accumulation invariance
# ---------------------------------------------------------------------------------------------


def _shifted_ref_experience(tr: PPOTrainer) -> Experience:
    """Real experience where π_ref is e^0.5 times less likely than π_old on every sampled token."""
    torch.manual_seed(1)
    exp, _ = tr.make_experience()
    exp.ref_logprobs = exp.logprobs - 0.5 * exp.mask
    tr.compute_advantages(exp)
    return exp


def test_importance_sampling_ref_uses_ref_logprobs_as_old(models, tmp_path):
    kw = dict(preset="vanilla", num_ppo_epochs=1)
    plain = make_trainer(models, tmp_path, **kw)
    st_plain = plain.update(_shifted_ref_experience(plain))
    is_ref = make_trainer(models, tmp_path, importance_sampling_ref=True, **kw)
    exp = _shifted_ref_experience(is_ref)
    st_ref = is_ref.update(exp)
    # π_old: the policy has not moved yet within the first (only) mini-batch, so ρ = 1
    assert st_plain["policy/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert st_plain["policy/clipfrac"] == 0.0
    # π_ref: log ρ = 0.5 on every token -> approx_kl = (e^0.5 − 1) − 0.5, beyond 1 + ε so clipping is active
    assert st_ref["policy/approx_kl"] == pytest.approx(math.exp(0.5) - 1.5, rel=1e-4)
    assert st_ref["policy/clipfrac"] > 0
    # the loss itself: ρ = e^0.5 on every token, Â whitened over the (single) mini-batch
    adv = F.whiten(exp.advantages, exp.mask)
    rho = math.exp(0.5)
    expected = F.masked_mean(torch.maximum(-adv * rho, -adv * min(rho, 1.2)), exp.mask).item()
    assert st_ref["policy/loss"] == pytest.approx(expected, abs=1e-5)
    assert st_plain["policy/loss"] == pytest.approx(0.0, abs=1e-5)  # ρ = 1: −mean(whitened Â) = 0


SGD_SWAP = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def _sgd_deltas(tr: PPOTrainer, exp: Experience, seed: int = 0) -> tuple[dict, dict]:
    """Run ``tr.update(exp)`` with plain SGD (lr = 1) so that Δθ = −(clipped) gradient exactly.

    (AdamW's first step is ≈ lr·sign(g): it hides gradient differences.)
    """
    tr.policy_opt = torch.optim.SGD(tr.policy.parameters(), lr=1.0)
    tr.critic_opt = torch.optim.SGD(tr.critic.parameters(), lr=1.0)
    p0, c0 = param_snapshot(tr.policy), param_snapshot(tr.critic)
    torch.manual_seed(seed)
    tr.update(exp)
    dp = {k: v.detach() - p0[k] for k, v in tr.policy.named_parameters()}
    dc = {k: v.detach() - c0[k] for k, v in tr.critic.named_parameters()}
    return dp, dc


@SGD_SWAP
def test_entropy_bonus_changes_the_gradient_by_the_entropy_gradient(models, tmp_path):
    from ppomax.ppo.rollout import response_logprobs

    c = 0.1
    base = make_trainer(models, tmp_path, preset="vanilla")
    torch.manual_seed(2)
    exp, _ = base.make_experience()
    base.compute_advantages(exp)
    ent = make_trainer(models, tmp_path, preset="vanilla", entropy_coef=c)
    d0, _ = _sgd_deltas(base, copy.deepcopy(exp))
    d1, _ = _sgd_deltas(ent, copy.deepcopy(exp))
    # loss_ent = loss − c·H̄  =>  Δθ_ent − Δθ = +c·∇H̄ (SGD, lr 1, no clipping in vanilla)
    policy = copy.deepcopy(models.policy).to(base.device)
    parts = (exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.mask)
    _, h = response_logprobs(policy, parts, 1.0, with_entropy=True)
    F.masked_mean(h, exp.mask).backward()
    grads = {k: p.grad for k, p in policy.named_parameters()}
    diff_norm = 0.0
    for k in d0:
        assert torch.allclose(d1[k] - d0[k], c * grads[k], atol=1e-6), k
        diff_norm += (d1[k] - d0[k]).norm().item()
    assert diff_norm > 1e-3


@SGD_SWAP
def test_gradient_accumulation_invariance(models, tmp_path):
    """One mini-batch of 4 as 1 micro-batch of 4 or as 4 micro-batches of 1: the same update."""
    kw = dict(preset="ppo_max", rollout_batch_size=4, num_mini_batches=1, num_ppo_epochs=1)
    full = make_trainer(models, tmp_path, per_device_train_batch_size=4, **kw)
    torch.manual_seed(3)
    exp, _ = full.make_experience()
    full.compute_advantages(exp)
    lengths = exp.mask.sum(-1).tolist()
    micro = make_trainer(models, tmp_path, per_device_train_batch_size=1, **kw)
    dp_full, dc_full = _sgd_deltas(full, copy.deepcopy(exp))
    dp_micro, dc_micro = _sgd_deltas(micro, copy.deepcopy(exp))
    for k in dp_full:
        assert torch.allclose(dp_full[k], dp_micro[k], atol=1e-5, rtol=1e-4), k
    for k in dc_full:
        assert torch.allclose(dc_full[k], dc_micro[k], atol=1e-5, rtol=1e-4), k
    # the update is not trivially zero, and the responses have different lengths (a naive
    # per-micro-batch mean would differ)
    assert max(v.abs().max().item() for v in dp_full.values()) > 1e-4
    assert max(v.abs().max().item() for v in dc_full.values()) > 1e-4
    assert len(set(lengths)) > 1, lengths

    # with the real optimizer (AdamW) too, from identical weights
    a = make_trainer(models, tmp_path, per_device_train_batch_size=4, **kw)
    b = make_trainer(models, tmp_path, per_device_train_batch_size=1, **kw)
    stats = []
    for tr in (a, b):
        torch.manual_seed(0)
        stats.append(tr.update(copy.deepcopy(exp)))
    for (k, pa), (_, pb) in zip(a.policy.named_parameters(), b.policy.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), k
    # the logged losses are mini-batch token means too, whatever the micro-batch size
    for k in ("policy/loss", "policy/entropy", "policy/approx_kl", "policy/clipfrac", "critic/value_loss"):
        assert stats[0][k] == pytest.approx(stats[1][k], abs=1e-6), (k, stats[0][k], stats[1][k])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def test_parameters_change_after_a_ppo_step(models, tmp_path):
    tr = make_trainer(models, tmp_path)
    p0, c0 = param_snapshot(tr.policy), param_snapshot(tr.critic)
    row = tr.step()
    assert "skipped" not in row
    for k, v in tr.policy.named_parameters():
        assert not torch.equal(v, p0[k]), f"policy {k} unchanged"
    for k, v in tr.critic.named_parameters():
        assert not torch.equal(v, c0[k]), f"critic {k} unchanged"
    # the frozen reference did not move
    for k, v in models.ref.named_parameters():  # on the trainer's device; models.policy never left the CPU
        assert torch.equal(v.cpu(), dict(models.policy.named_parameters())[k])


def test_adaptive_kl_moves_kl_coef(models, dirs, tmp_path):
    kw = dict(kl_coef=0.05, kl_target=6.0, kl_horizon=10)
    # policy == reference at the first step: KL = 0 < target -> η shrinks by the maximal 20 % · n/horizon
    tr = make_trainer(models, tmp_path, adaptive_kl=True, **kw)
    row = tr.step()
    # ~1e-7, not exactly 0: log π_old comes from the sampling logits (rollout_logprobs='auto' in fp32)
    assert row["kl/ref"] == pytest.approx(0.0, abs=1e-5) and row["kl/coef"] == 0.05
    assert tr.kl_coef == pytest.approx(0.05 * (1 - 0.2 * 4 / 10))
    # against a random reference the KL is far above target -> η grows
    far = PPOTrainer(make_cfg(tmp_path, adaptive_kl=True, **kw), policy=copy.deepcopy(models.policy),
                     ref_policy=load_causal_lm(dirs.tiny), critic=copy.deepcopy(models.critic),
                     tokenizer=models.tokenizer, prompts=PROMPTS, reward_fn=share_of_the)
    row = far.step()
    assert row["kl/ref"] > 6.0 * 1.2
    assert far.kl_coef == pytest.approx(0.05 * (1 + 0.2 * 4 / 10))
    # fixed η when adaptive_kl is off
    fixed = make_trainer(models, tmp_path, adaptive_kl=False, **kw)
    fixed.step()
    assert fixed.kl_coef == 0.05


def test_critic_pretraining_freezes_the_policy(models, tmp_path):
    tr = make_trainer(models, tmp_path / "run", critic_pretrain_steps=2, max_steps=1, save_steps=1, save_total_limit=5)
    p0, c0 = param_snapshot(tr.policy), param_snapshot(tr.critic)
    rows = tr.train()
    assert [(r["step"], r["phase"], r["ppo_step"]) for r in rows] == [
        (1, "critic_pretrain", 0), (2, "critic_pretrain", 0), (3, "ppo", 1)]
    assert rows[0]["lr/policy"] == 0.0 and rows[2]["lr/policy"] > 0
    assert "policy/loss" not in rows[0] and "policy/loss" in rows[2]
    prev_critic = c0
    for step in (1, 2):
        ck = tmp_path / "run" / f"checkpoint-{step}"
        policy = dict(load_causal_lm(ck / "policy").named_parameters())
        critic = dict(ScalarHeadModel.from_pretrained(ck / "critic").named_parameters())
        for k, v in p0.items():  # the checkpoint is on the CPU, the snapshot on the trainer's device
            assert torch.equal(policy[k], v.cpu()), f"policy {k} moved during critic pre-training (iteration {step})"
        assert any(not torch.equal(critic[k], prev_critic[k].cpu()) for k in critic), f"critic unchanged at {step}"
        prev_critic = critic
    policy = dict(load_causal_lm(tmp_path / "run" / "checkpoint-3" / "policy").named_parameters())
    assert any(not torch.equal(policy[k], v.cpu()) for k, v in p0.items())


def test_ppo_max_raises_reward_with_bounded_kl(models, tmp_path):
    tr = make_trainer(models, tmp_path, preset="ppo_max", rollout_batch_size=16, num_mini_batches=2,
                      per_device_train_batch_size=8, generation_batch_size=16, num_ppo_epochs=2,
                      critic_pretrain_steps=3, max_steps=25, learning_rate=1e-3, critic_learning_rate=1e-3)
    rows = tr.train()
    ppo = [r for r in rows if r["phase"] == "ppo"]
    assert len(ppo) == 25
    first = statistics.mean(r["reward/raw_mean"] for r in ppo[:5])
    last = statistics.mean(r["reward/raw_mean"] for r in ppo[-5:])
    assert last > first + 0.25, (first, last)
    assert last > 0.8
    assert 0 < ppo[-1]["kl/ref"] < 10.0  # summed per response; the collapse threshold is 20
    assert not any(r.get("skipped") for r in rows)


def cli_inputs(dirs, models, tmp_path):
    """A reward model (the SFT backbone + a fresh head, seeded) and a prompts file for CLI runs."""
    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    ScalarHeadModel.from_causal_lm(dirs.sft).save_pretrained(rm_dir, tokenizer=models.tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
    return rm_dir, prompts


def test_vanilla_cli_end_to_end(dirs, models, tmp_path):
    from ppomax import cli

    rm_dir, prompts = cli_inputs(dirs, models, tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["ppo", "--preset", "vanilla", "--model_name_or_path", dirs.sft, "--reward_model_path", str(rm_dir),
                   "--dataset", str(prompts), "--output_dir", str(out), "--max_steps", "2", "--rollout_batch_size", "4",
                   "--num_mini_batches", "2", "--per_device_train_batch_size", "2", "--generation_batch_size", "4",
                   "--response_length", "6", "--learning_rate", "1e-3", "--critic_learning_rate", "1e-3",
                   "--save_steps", "1", "--report_to", "none", "--disable_tqdm"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["phase"] == "ppo" for r in rows)
    names = ["reward/raw_mean", "reward/raw_p99", "kl/ref", "policy/perplexity", "response/length_mean",
             "response/truncated_frac", "policy/entropy", "policy/approx_kl", "policy/clipfrac",
             "critic/value_loss", "critic/explained_variance", "grad_norm/policy", "lr/policy",
             "time/generate", "tokens_per_s"]
    for r in rows:
        missing = [n for n in names if n not in r]
        assert not missing, missing
        assert r["kl/coef"] == 0.0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["stage"] == "ppo" and saved["config"]["preset"] == "vanilla" and saved["config"]["reward_clip"] is None
    for step in (1, 2):
        ck = out / f"checkpoint-{step}"
        assert (ck / "COMPLETE").exists()
        assert (ck / "policy" / "model.safetensors").exists()
        assert (ck / "critic" / "model.safetensors").exists() and (ck / "critic" / "value_head.safetensors").exists()
        assert (ck / "optimizer-policy.pt").exists() and (ck / "optimizer-critic.pt").exists()
    assert (out / "samples.jsonl").exists()


def test_exact_resume(models, tmp_path):
    kw = dict(preset="ppo_max", critic_pretrain_steps=1, max_steps=3, save_steps=2, save_total_limit=5,
              rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2)
    full_tr = make_trainer(models, tmp_path / "full", **kw)
    full = full_tr.train()
    assert [r["step"] for r in full] == [1, 2, 3, 4]

    torch.manual_seed(123)  # the resumed run must not depend on the caller's RNG
    resumed_tr = make_trainer(models, tmp_path / "resumed", resume_from=str(tmp_path / "full" / "checkpoint-2"), **kw)
    resumed = resumed_tr.train()
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for k in ("reward/raw_mean", "kl/ref", "policy/loss", "critic/value_loss", "reward/processed_mean"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k, a[k], b[k])
    for (k, a), (_, b) in zip(full_tr.policy.named_parameters(), resumed_tr.policy.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), k


# ---------------------------------------------------------------------------------------------
# Bad rewards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reward_fn, match",
    [
        (lambda p, r: [1.0] * (len(r) - 1), r"reward_fn returned 3 scores for 4 responses"),
        (lambda p, r: ["good"] * len(r), r"reward_fn must return a list of numbers"),
        (lambda p, r: None, r"reward_fn must return a list of numbers, got NoneType"),
    ],
)
def test_bad_reward_fn_output_is_a_user_error(models, tmp_path, reward_fn, match):
    tr = make_trainer(models, tmp_path, reward_fn=reward_fn)
    with pytest.raises(UserError, match=match):
        tr.step()


def test_nan_reward_skips_the_update_then_stops(models, tmp_path):
    calls = {"n": 0}

    def nan_once(prompts, responses):
        calls["n"] += 1
        scores = share_of_the(prompts, responses)
        if calls["n"] == 1:
            scores[0] = float("nan")
        return scores

    tr = make_trainer(models, tmp_path / "once", reward_fn=nan_once)
    p0, c0 = param_snapshot(tr.policy), param_snapshot(tr.critic)
    row = tr.step()
    assert row["skipped"] == 1.0 and "non-finite reward" in row["skip_cause"]
    for k, v in tr.policy.named_parameters():
        assert torch.equal(v, p0[k]), k
    for k, v in tr.critic.named_parameters():
        assert torch.equal(v, c0[k]), k
    row = tr.step()  # the next batch is finite: a normal update resets the counter
    assert "skipped" not in row and tr.consecutive_skips == 0

    def always_nan(prompts, responses):
        return [float("nan")] * len(responses)

    tr = make_trainer(models, tmp_path / "always", reward_fn=always_nan, max_consecutive_skips=2, max_steps=5)
    p0 = param_snapshot(tr.policy)
    with pytest.raises(UserError, match="stopped after 2 consecutive skipped updates"):
        tr.train()
    rows = [json.loads(line) for line in (tmp_path / "always" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["skipped"] == 1.0
    for k, v in tr.policy.named_parameters():
        assert torch.equal(v, p0[k]), k


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimator_cli_end_to_end(dirs, models, tmp_path, estimator):
    """Issue #14: each critic-free estimator trains from the CLI; no critic in the rows or checkpoints."""
    from ppomax import cli

    rm_dir, prompts = cli_inputs(dirs, models, tmp_path)
    out = tmp_path / "out"
    k = "1" if estimator == "reinforce_pp" else "2"
    rc = cli.main(["ppo", "--advantage_estimator", estimator, "--num_samples_per_prompt", k, "--model_name_or_path",
                   dirs.sft, "--reward_model_path", str(rm_dir), "--dataset", str(prompts), "--output_dir", str(out),
                   "--max_steps", "2", "--rollout_batch_size", "4", "--num_mini_batches", "2",
                   "--per_device_train_batch_size", "2", "--generation_batch_size", "8", "--response_length", "6",
                   "--learning_rate", "1e-3", "--save_steps", "2", "--report_to", "none", "--disable_tqdm"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["ppo", "ppo"]  # no critic pre-training without a critic
    assert not any(key.startswith("critic/") for r in rows for key in r)
    ck = out / "checkpoint-2"
    assert (ck / "policy" / "model.safetensors").exists() and not (ck / "critic").exists()
    assert not (ck / "optimizer-critic.pt").exists()
