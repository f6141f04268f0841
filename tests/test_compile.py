"""PPOConfig.torch_compile (torch.compile, issue #5): the compiled paths compute what the eager ones do.

The static-KV-cache decode that the compiled generation uses is checked eagerly (fast); the
compiled PPO iterations themselves take tens of seconds to compile, so that test is slow-marked
(run with ``-m slow``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

import ppomax.ppo.rollout as R
from ppomax.config import PPOConfig
from ppomax.models import build_tiny_model, load_causal_lm, load_tokenizer
from ppomax.ppo.trainer import PPOTrainer

# Prompts of different token lengths: batches differ in prompt width, so the compiled forwards
# see more than one shape (one recompile with dynamic sizes, then no more).
PROMPTS = ["Say some words:", "Say a few words please:", "Words:", "Say three short words now, please:",
           "Say words:", "Now say a few more words:", "Hi:", "Go on, say something:"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("compile") / "tiny", num_layers=2, hidden_size=64, vocab_size=512)


def _prompt_batch(tok, texts):
    from ppomax.data import collate_prompts, encode_prompt

    return collate_prompts([encode_prompt(tok, t) for t in texts], tok.pad_token_id)


def test_maybe_compile_off_is_identity():
    assert R.maybe_compile(R.response_logprobs, False) is R.response_logprobs


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_static_cache_decode_matches_dynamic(tiny, monkeypatch, stop_at_eos):
    """The static-cache decode loop (run eagerly here) samples the same tokens with the same
    log-probs as the default preallocated dynamic cache: full-length keys with the unwritten
    positions causally masked give the same attention as the filled prefix."""
    model = load_causal_lm(tiny).eval()
    tok = load_tokenizer(tiny)
    batch = _prompt_batch(tok, PROMPTS[:4])  # left-padded: prompt lengths differ
    ids, mask = batch["input_ids"], batch["attention_mask"]
    caches = [R._static_kv_cache(model, n) for n in (8, 9)]
    assert caches[0] is not None  # this transformers / Llama take the static path
    # one layer class for every cache: the compiled step guards on it (a new class per call recompiled)
    assert type(caches[0].layers[0]) is type(caches[1].layers[-1])
    eos = int(R.generate(model, ids, mask, 12, None, 0, temperature=1.5)[0][1, 3])  # an EOS that gets sampled
    outs = {}
    for compiled in (False, True):
        # the static path with the eager step function (no compilation in this fast test)
        monkeypatch.setattr(R, "_get_compiled_decode_step", lambda: R._decode_step)
        torch.manual_seed(3)
        outs[compiled] = R.generate(model, ids, mask, 12, eos, tok.pad_token_id, temperature=1.5,
                                    stop_at_eos=stop_at_eos, return_logprobs=True, compile=compiled)
    (r0, m0, t0, lp0), (r1, m1, t1, lp1) = outs[False], outs[True]
    assert torch.equal(r0, r1) and torch.equal(m0, m1) and torch.equal(t0, t1)
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=2e-6)


def test_static_cache_decode_under_bf16_autocast(tiny, monkeypatch):
    """Under autocast the keys leave RoPE in fp32 and the values in bf16; the static cache stores
    both (StaticLayer alone allocates both in the keys' dtype and fails on the values)."""
    model = load_causal_lm(tiny).eval()
    tok = load_tokenizer(tiny)
    batch = _prompt_batch(tok, PROMPTS[:3])
    monkeypatch.setattr(R, "_get_compiled_decode_step", lambda: R._decode_step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        resp, mask, _, logp = R.generate(model, batch["input_ids"], batch["attention_mask"], 5, None, tok.pad_token_id,
                                         stop_at_eos=False, return_logprobs=True, compile=True)
    assert resp.shape == (3, 5) and bool(mask.all()) and bool(torch.isfinite(logp).all())


@pytest.mark.slow
def test_compiled_ppo_iterations_match_eager(tiny, tmp_path):
    """Four seeded PPO iterations (EOS stop, prompts of varying length) with torch_compile on and
    off: every logged loss / statistic within 1e-4 relative (1e-6 absolute near 0; measured: at most
    8e-6), the same weights to 5 % of a learning-rate step (measured: 1.6e-5 with lr 1e-3), the
    compiled run does train, and it stops compiling once the lengths are dynamic."""
    tok = load_tokenizer(tiny)
    prompts = [" ".join(["say"] * n) + ":" for n in range(1, 17)]  # 2 to 17 tokens

    def reward_fn(ps, rs):
        return [len(r) / 10.0 for r in rs]

    rows, params = {}, {}
    for compiled in (False, True):
        cfg = PPOConfig.from_preset(
            "ppo_max", model_name_or_path=tiny, output_dir=str(tmp_path / f"c{int(compiled)}"), seed=0,
            rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=2, generation_batch_size=8,
            response_length=6, critic_init="sft", learning_rate=1e-3, critic_learning_rate=1e-3,
            critic_pretrain_steps=0, max_steps=4, report_to="none", disable_tqdm=True, num_sample_generations=0,
            save_steps=1000, torch_compile=compiled,
        )
        trainer = PPOTrainer(cfg, tokenizer=tok, prompts=prompts, reward_fn=reward_fn)
        before = [p.detach().clone() for p in trainer.policy.parameters()]
        step, graphs, widths = trainer.step, [], []

        def counted_step(*a, step=step, graphs=graphs, widths=widths, trainer=trainer, **k):
            row = step(*a, **k)
            graphs.append(counters["stats"]["unique_graphs"])
            widths.append(trainer._last_exp.prompt_ids.shape[1])
            return row

        trainer.step = counted_step
        rows[compiled] = trainer.train()
        params[compiled] = [p.detach().clone() for p in trainer.policy.parameters()]
        if compiled:
            assert any(not torch.equal(a, b) for a, b in zip(before, params[compiled]))  # it trained
            # the prompt width changes from batch to batch: one recompile with a dynamic width at the
            # first change, then nothing compiles any more
            assert widths[1] != widths[0] and graphs[0] > 0, (widths, graphs)
            assert graphs[1] > graphs[0] and graphs[-1] == graphs[1], (widths, graphs)
    for eager, comp in zip(rows[False], rows[True]):
        for key, value in eager.items():
            if key.startswith("time/") or key == "tokens_per_s" or not isinstance(value, float):
                continue
            assert math.isclose(comp[key], value, rel_tol=1e-4, abs_tol=1e-6), (key, comp[key], value)
    # Adam divides by sqrt(v): a weight whose gradients are ~0 moves by up to lr per step whatever
    # their rounding, so the weights are compared to 5 % of one step (lr 1e-3) instead.
    for a, b in zip(params[False], params[True]):
        torch.testing.assert_close(b, a, rtol=0, atol=5e-5)
