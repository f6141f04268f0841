"""Correctness on real model families (issue #11): dropout, top-k / top-p, responses without EOS,
several EOS ids, presets built any way, skipped updates, truncated responses and the reward model.

Each test failed on the code before its fix (the failing value is in the comment).
"""

from __future__ import annotations

import json

import pytest
import torch

from ppomax import functional as F
from ppomax.config import ConfigError, PPOConfig, config_from_dict
from ppomax.models import build_tiny_model, eos_token_ids, load_causal_lm, load_tokenizer
from ppomax.ppo import rollout as R
from ppomax.ppo import sampling as S
from ppomax.ppo.trainer import PPOTrainer

PROMPTS = ["Say some words:", "Tell me a story.", "The weather", "Once upon a time"]
BASE = dict(critic_init="sft", rollout_batch_size=4, num_mini_batches=1, per_device_train_batch_size=4,
            generation_batch_size=4, response_length=6, learning_rate=1e-3, critic_learning_rate=1e-3,
            critic_pretrain_steps=0, max_steps=2, report_to="none", disable_tqdm=True, num_sample_generations=0,
            save_steps=1000, seed=0)


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_layers=1, hidden_size=32, num_heads=2)


@pytest.fixture(scope="module")
def gpt2_dropout(tiny, tmp_path_factory) -> str:
    """A tiny GPT-2 with dropout 0.1 everywhere (embeddings, attention, residuals), tiny's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def trainer(model_dir, out, **kw) -> PPOTrainer:
    cfg = PPOConfig.from_preset(kw.pop("preset", "ppo_max"),
                                **{**BASE, "model_name_or_path": model_dir, "output_dir": str(out), **kw})
    return PPOTrainer(cfg, prompts=PROMPTS, reward_fn=kw.pop("reward_fn", length_reward))


def scripted_sampler(script: list[list[int]]):
    """A stand-in for sample_from_logits that emits ``script[row][t]`` at step t."""
    steps = iter(range(10**6))

    def sample(logits, temperature, top_k=0, top_p=1.0):
        t = next(steps)
        return torch.tensor([row[t] for row in script], dtype=torch.long, device=logits.device)

    return sample


# ---------------------------------------------------------------------------------------------
# 1. Dropout is off in PPO: the first mini-batch is at ratio exactly 1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("disable", [True, False])
def test_first_minibatch_of_a_dropout_model_is_at_ratio_one(gpt2_dropout, tmp_path, disable):
    tr = trainer(gpt2_dropout, tmp_path, learning_rate=1e-9, critic_learning_rate=1e-9, rollout_logprobs="forward",
                 disable_dropout=disable, max_steps=1)
    row = tr.step()
    if disable:  # before the fix: approx_kl 1.9e-3, critic clipfrac 0.31
        assert row["policy/approx_kl"] == 0.0
        assert row["policy/clipfrac"] == 0.0
        assert row["critic/clipfrac"] == 0.0
    else:  # the same run with dropout left on: the test above can fail
        assert row["policy/approx_kl"] > 1e-5
        assert row["critic/clipfrac"] > 0.0


def test_disable_dropout_zeroes_modules_and_attention_rates(gpt2_dropout):
    from ppomax.models import disable_dropout

    model = load_causal_lm(gpt2_dropout)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    assert disable_dropout(model) > 0
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()  # train mode (for gradient checkpointing) is now deterministic
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------
# 2. top-k / top-p: refused in PPO, where they would bias the ratio and the KL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("top_k", 1), ("top_k", 50), ("top_p", 0.9)])
def test_truncated_sampling_is_refused_in_ppo_with_the_reason(field, value):
    with pytest.raises(ConfigError, match=rf"PPOConfig\.{field} = .* not supported in PPO.*temperature"):
        PPOConfig(**{field: value})


def test_top_k_one_in_eval_is_greedy(tiny):
    from ppomax.evaluate import sample_responses

    policy, tok = load_causal_lm(tiny), load_tokenizer(tiny)
    ids = [tok("The weather")["input_ids"]] * 3
    s = sample_responses(policy, tok, ids, 5, top_k=1, seed=0)
    assert len(set(s["responses"])) == 1  # greedy: the same response for the same prompt
    # and the same tokens as an argmax decode
    p = torch.tensor([ids[0]])
    greedy = []
    for _ in range(5):
        nxt = policy(input_ids=p).logits[0, -1].argmax().item()
        greedy.append(nxt)
        p = torch.cat([p, torch.tensor([[nxt]])], dim=1)
        if nxt in eos_token_ids(tok, policy):
            break
    assert s["responses"][0] == tok.decode(greedy, skip_special_tokens=True)


def test_sampling_without_logprobs_gives_the_same_samples(tiny):
    from ppomax.evaluate import sample_responses

    policy, tok = load_causal_lm(tiny), load_tokenizer(tiny)
    ids = [tok(t)["input_ids"] for t in ("The weather", "A cat", "Hello")]
    full, fast = (sample_responses(policy, tok, ids, 6, seed=3, logprobs=lp) for lp in (True, False))
    assert fast["responses"] == full["responses"] and fast["truncated"] == full["truncated"]
    assert len(full["nll"]) == 3 and fast["nll"] == []  # the policy's forward pass was skipped


# ---------------------------------------------------------------------------------------------
# 3. stop_at_eos=False: a response that contains EOS is not truncated
# ---------------------------------------------------------------------------------------------


def test_no_stop_at_eos_marks_only_responses_without_eos_truncated(tiny, monkeypatch):
    policy, tok = load_causal_lm(tiny), load_tokenizer(tiny)
    eos = tok.eos_token_id
    monkeypatch.setattr(S, "sample_from_logits", scripted_sampler([[7, eos, 9, 9], [7, 8, 9, 9]]))
    p = torch.tensor([[5, 6], [5, 6]])
    resp, mask, truncated = R.generate(policy, p, torch.ones_like(p), 4, eos, tok.pad_token_id, stop_at_eos=False)
    assert resp.tolist() == [[7, eos, 9, 9], [7, 8, 9, 9]]
    assert mask.tolist() == [[1.0] * 4] * 2
    assert truncated.tolist() == [False, True]  # before the fix: [True, True]


# ---------------------------------------------------------------------------------------------
# 7. Several EOS ids (generation_config.eos_token_id lists end of turn and end of text)
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def two_eos(tiny, tmp_path) -> tuple[str, int, int]:
    """tiny with a generation_config whose eos_token_id lists [tokenizer eos, a second id]."""
    from transformers import GenerationConfig

    model, tok = load_causal_lm(tiny), load_tokenizer(tiny)
    # the second id: this random model's most likely first token after "The weather", so that a
    # near-greedy rollout (temperature 0.02) stops at it
    logits = model(input_ids=torch.tensor([tok("The weather")["input_ids"]])).logits[0, -1]
    logits[tok.eos_token_id] = -float("inf")
    second = int(logits.argmax())
    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id, second], pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m"), tok.eos_token_id, second


def test_eos_token_ids_collects_tokenizer_and_generation_config(two_eos):
    path, eos, second = two_eos
    assert eos_token_ids(load_tokenizer(path), load_causal_lm(path)) == [eos, second]


def test_generate_stops_at_any_eos_id(two_eos, monkeypatch):
    path, eos, second = two_eos
    policy = load_causal_lm(path)
    monkeypatch.setattr(S, "sample_from_logits", scripted_sampler([[7, second, 9, 9], [7, 8, eos, 9], [7, 8, 9, 9]]))
    p = torch.tensor([[5, 6]] * 3)
    resp, mask, truncated = R.generate(policy, p, torch.ones_like(p), 4, [eos, second], 0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
    assert resp[0, 2:].tolist() == [0, 0]  # padded after the second EOS id
    assert F.last_token_index(mask).tolist() == [1, 2, 3]  # where the reward model reads its score


def test_rollout_and_eval_stop_at_the_second_eos_id(two_eos, tmp_path):
    from ppomax.evaluate import sample_responses

    path, eos, second = two_eos
    tr = trainer(path, tmp_path / "run", response_length=4, temperature=0.02)
    assert tr.eos_ids == [eos, second]
    exp, _ = tr.make_experience()
    weather = [i for i, ids in enumerate(exp.prompt_ids) if tr.tokenizer.decode(ids, skip_special_tokens=True) == "The weather"]
    (row,) = weather
    # before the fix: the response ran on to the cap (truncated, mask all ones)
    assert exp.response_ids[row, 0].item() == second
    assert exp.mask[row].tolist() == [1.0, 0.0, 0.0, 0.0] and not exp.truncated[row]
    assert F.last_token_index(exp.mask)[row].item() == 0  # the reward model reads its score there
    tok = load_tokenizer(path)
    s = sample_responses(load_causal_lm(path), tok, [tok("The weather")["input_ids"]] * 2, 4, temperature=0.02)
    assert s["length"] == [1.0, 1.0] and s["truncated"] == [False, False]


# ---------------------------------------------------------------------------------------------
# 4. Presets apply however the config is built
# ---------------------------------------------------------------------------------------------


def test_constructor_applies_the_preset_like_from_preset():
    built = PPOConfig(preset="vanilla")
    # before the fix: kl_coef 0.05, reward_normalize True, critic_pretrain_steps 20 under "vanilla"
    assert built == PPOConfig.from_preset("vanilla")
    assert (built.kl_coef, built.reward_normalize, built.critic_pretrain_steps, built.max_grad_norm) == (0.0, False, 0, None)
    assert PPOConfig(preset="vanilla", kl_coef=0.1).kl_coef == 0.1  # an explicit field beats the preset
    assert config_from_dict(PPOConfig, {"preset": "vanilla"}) == built  # the YAML / CLI path
    assert PPOConfig() == PPOConfig.from_preset("ppo_max")


def test_a_preset_that_cannot_be_applied_is_refused():
    with pytest.raises(ConfigError, match=r"PPOConfig\.preset = 'none' is invalid"):
        PPOConfig(preset="none")
    with pytest.raises(TypeError):  # positional values could not be told from preset values
        PPOConfig("model")


# ---------------------------------------------------------------------------------------------
# 5. A skipped update changes no optimisation state
# ---------------------------------------------------------------------------------------------


def test_a_skipped_update_changes_no_optimisation_state(tiny, tmp_path, monkeypatch):
    tr = trainer(tiny, tmp_path, lr_scheduler_type="cosine", adaptive_kl=True, max_steps=4)
    tr.step()  # one applied step: optimizer states exist, schedules have moved
    real = F.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(F, "policy_loss", nan_loss)
    before = (tr.policy_sched.state_dict(), tr.critic_sched.state_dict(), tr.kl_ctl.state_dict(),
              tr.score_moments.state_dict(), tr.kl_coef)
    opt_before = [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                  for opt in (tr.policy_opt, tr.critic_opt) for st in opt.state.values()]
    row = tr.step()
    assert row["skipped"] == 1.0
    after = (tr.policy_sched.state_dict(), tr.critic_sched.state_dict(), tr.kl_ctl.state_dict(),
             tr.score_moments.state_dict(), tr.kl_coef)
    # before the fix: both schedulers stepped (last_epoch 1 -> 2), the KL controller and moments moved
    assert after == before
    opt_after = [{k: v for k, v in st.items() if torch.is_tensor(v)}
                 for opt in (tr.policy_opt, tr.critic_opt) for st in opt.state.values()]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(opt_after, opt_before) for k in a)
    monkeypatch.setattr(F, "policy_loss", real)
    tr.step()  # a good step afterwards moves them again
    assert tr.policy_sched.state_dict()["last_epoch"] == before[0]["last_epoch"] + 1


# ---------------------------------------------------------------------------------------------
# 11. Truncated responses and the reward model
# ---------------------------------------------------------------------------------------------


def test_truncated_mean_is_logged_and_ppo_max_penalises_a_missing_eos(tiny, tmp_path, monkeypatch):
    assert PPOConfig.from_preset("ppo_max").missing_eos_penalty == 1.0
    assert PPOConfig.from_preset("vanilla").missing_eos_penalty is None
    tok = load_tokenizer(tiny)
    eos = tok.eos_token_id
    # rows 0 and 2 end with EOS, rows 1 and 3 hit the cap of 3 tokens
    monkeypatch.setattr(S, "sample_from_logits", scripted_sampler([[7, eos, 9], [7, 8, 9], [eos, 9, 9], [7, 8, 9]]))
    tr = trainer(tiny, tmp_path, response_length=3, rollout_logprobs="forward")
    tr.sampler.take = lambda k: list(range(k))
    row = tr.step()
    raw = tr._last_exp.scores
    assert tr._last_exp.truncated.tolist() == [False, True, False, True]
    assert row["reward/truncated_mean"] == pytest.approx(raw[[1, 3]].mean().item())
    assert row["response/truncated_frac"] == 0.5
    # the running moments see the raw scores; the penalty is 1.0 off r̃ after normalisation and clipping
    assert tr.score_moments.mean == pytest.approx(raw.mean().item(), abs=1e-6)  # before issue 21: the penalised mean
    eos_like = ((raw - raw.mean()) / raw.std(unbiased=False)).clamp(-0.8, 0.8)
    expect = eos_like - torch.tensor([0.0, 1.0, 0.0, 1.0], device=raw.device)
    assert tr._last_exp.processed_scores.tolist() == pytest.approx(expect.tolist(), abs=1e-5)


def experience(scores: list[float], truncated: list[bool], device) -> R.Experience:
    """B hand-made responses of 2 tokens each (log-probs, values 0) on ``device``: only the scores matter here."""
    B = len(scores)
    z = torch.zeros(B, 2, device=device)
    long = dict(dtype=torch.long, device=device)
    return R.Experience(prompt_ids=torch.zeros(B, 2, **long), prompt_mask=torch.ones(B, 2, **long),
                        response_ids=torch.zeros(B, 2, **long), mask=torch.ones(B, 2, device=device),
                        truncated=torch.tensor(truncated, device=device), logprobs=z, ref_logprobs=z, values=z,
                        scores=torch.tensor(scores, device=device))


def test_missing_eos_penalty_survives_the_clip_at_every_score_level(tiny, tmp_path):
    """Issue 21 item 3: the penalty was subtracted from the raw score before Eq. 18's clip to [−δ, δ], so a
    truncated response scoring above μ + δσ + penalty (or below μ − δσ) got the same r̃ as one that stopped, and
    the penalised scores moved the running moments. Now: r̃ = clip((r − μ)/σ, ±δ) − penalty, μ/σ of raw scores."""
    tr = trainer(tiny, tmp_path)  # ppo_max: normalisation, δ = 0.8, missing_eos_penalty 1.0
    history = [-2.0, -1.0, 0.0, 1.0, 2.0]
    tr.compute_advantages(experience(history, [False] * 5, tr.device))
    levels = [-6.0, -1.2, -0.5, 0.0, 0.5, 1.2, 6.0]  # below μ − δσ, inside, above μ + δσ (+ penalty)
    exp = experience(levels + levels, [False] * 7 + [True] * 7, tr.device)
    tr.compute_advantages(exp)
    eos, trunc = exp.processed_scores[:7], exp.processed_scores[7:]
    assert (trunc < eos).all(), (eos, trunc)  # before the fix: equal at −6 and 6 (both clipped to ∓0.8)
    raw = torch.tensor(history + levels + levels, dtype=torch.float64)  # the moments hold raw scores only
    mu, sigma = raw.mean().item(), raw.std(unbiased=False).item()
    assert (tr.score_moments.mean, tr.score_moments.std) == pytest.approx((mu, sigma), rel=1e-6)
    expect = ((torch.tensor(levels, dtype=torch.float64) - mu) / sigma).clamp(-0.8, 0.8)
    assert eos.tolist() == pytest.approx(expect.tolist(), abs=1e-6)
    assert trunc.tolist() == pytest.approx((expect - 1.0).tolist(), abs=1e-6)
    assert torch.equal(exp.scores.cpu(), torch.tensor(levels + levels))  # the raw scores (logged) are untouched


def test_metrics_jsonl_has_truncated_mean_only_when_some_response_is_truncated(tiny, tmp_path):
    tr = trainer(tiny, tmp_path, response_length=2, max_steps=1)
    tr.train()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(("reward/truncated_mean" in r) == (r["response/truncated_frac"] > 0) for r in rows)
