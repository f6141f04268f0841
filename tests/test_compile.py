"""PPOConfig.torch_compile (torch.compile, issue #5): the compiled paths compute what the eager ones do.

The static-KV-cache decode that the compiled generation uses is checked eagerly (fast). Every
function ppomax compiles (the decode step and the policy / reference / critic / reward-model
forwards) is traced here with ``fullgraph=True`` on dynamo's cheap backends, so a graph break or a
trace-time crash (torch 2.11: ``AsPythonConstantNotImplementedError`` on a module passed to
``assume_constant_result``) fails CI in seconds. The compiled PPO iterations themselves (inductor)
take tens of seconds to compile, so that test is slow-marked (run with ``-m slow``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

import ppomax.ppo.rollout as R
from ppomax.config import PPOConfig
from ppomax.models import ScalarHeadModel, build_tiny_model, load_causal_lm, load_tokenizer
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


@pytest.fixture
def fullgraph(monkeypatch):
    """Everything ppomax compiles is traced in one graph (a break raises) by the given cheap backend:
    'eager' runs dynamo's graph as is, 'aot_eager' also traces the backward through AOTAutograd."""

    def use(backend: str) -> None:
        monkeypatch.setattr(R, "COMPILE_OPTIONS", {"fullgraph": True, "backend": backend})
        torch._dynamo.reset()

    yield use
    torch._dynamo.reset()


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_compiled_decode_step_traces_in_one_graph(tiny, fullgraph, stop_at_eos):
    """generate(compile=True) traces its decode step whole: the cache keyword and logits_to_keep are
    decided outside the trace. Same tokens as the eager loop, log-probs to fp32 rounding."""
    fullgraph("eager")
    model = load_causal_lm(tiny).eval()
    tok = load_tokenizer(tiny)
    batch = _prompt_batch(tok, PROMPTS[:4])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    outs = {}
    for compiled in (False, True):
        torch.manual_seed(5)
        outs[compiled] = R.generate(model, ids, mask, 8, 3, tok.pad_token_id, temperature=1.5, stop_at_eos=stop_at_eos,
                                    return_logprobs=True, compile=compiled)
    assert counters["stats"]["unique_graphs"] >= 1  # the step was compiled, not run eagerly
    for a, b in zip(outs[False][:3], outs[True][:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(outs[True][3], outs[False][3], rtol=0, atol=2e-6)


def _models_and_parts(tiny, lora: bool):
    from ppomax.models import apply_lora

    torch.manual_seed(0)
    policy = load_causal_lm(tiny)
    if lora:
        policy = apply_lora(policy)
        with torch.no_grad():  # non-zero adapters: the adapter-off pass must differ from the policy's
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    critic = ScalarHeadModel.from_causal_lm(tiny)
    tok = load_tokenizer(tiny)
    batch = _prompt_batch(tok, PROMPTS[:3])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(1)
    resp, rmask, _ = R.generate(policy.eval(), ids, mask, 5, None, tok.pad_token_id, stop_at_eos=False)
    return policy, critic, (ids, mask, resp, rmask)


@pytest.mark.parametrize("lora", [False, True])
def test_compiled_rollout_forwards_trace_in_one_graph(tiny, fullgraph, lora):
    """The rollout forwards the trainer compiles (maybe_compile), under no_grad as in make_experience:
    log π of the policy (and under LoRA π_ref, the policy with its adapters disabled), V of the
    critic, r of the reward model. Each traces in one graph and gives the eager values (to 1e-6)."""
    fullgraph("eager")
    policy, critic, parts = _models_and_parts(tiny, lora)
    policy.eval()
    forwards = [(R.response_logprobs, policy, (parts, 0.7))]
    if not lora:  # the scalar-head forwards do not change with the policy's adapters
        forwards += [(R.response_values, critic, parts), (R.reward_model_scores, critic, parts)]
    with torch.no_grad():
        for fn, model, args in forwards:
            eager_out, comp_out = fn(model, *args), R.maybe_compile(fn, True)(model, *args)
            torch.testing.assert_close(comp_out, eager_out, rtol=0, atol=1e-6)
        if lora:
            logp = R.maybe_compile(R.response_logprobs, True)(policy, parts, 0.7)
            with policy.disable_adapter():
                ref = R.maybe_compile(R.response_logprobs, True)(policy, parts, 0.7)
                torch.testing.assert_close(ref, R.response_logprobs(policy, parts, 0.7), rtol=0, atol=1e-6)
            assert not torch.allclose(ref, logp, atol=1e-3)  # the adapters were off


def test_compiled_training_forwards_trace_in_one_graph_with_their_backward(tiny, fullgraph):
    """The training forwards (policy log π, critic V) trace in one graph through AOTAutograd, which
    also traces their backward; the gradients equal the eager ones to fp32 rounding."""
    fullgraph("aot_eager")
    policy, critic, parts = _models_and_parts(tiny, lora=False)
    for fn, model, args in ((R.response_logprobs, policy.train(), (parts, 0.7)), (R.response_values, critic.train(), parts)):
        grads = []
        for f in (fn, R.maybe_compile(fn, True)):
            model.zero_grad(set_to_none=True)
            (f(model, *args) * torch.linspace(-1, 1, parts[2].shape[1])).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for g_eager, g_comp in zip(*grads):
            torch.testing.assert_close(g_comp, g_eager, rtol=1e-4, atol=1e-6)


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
    caches = [R.static_kv_cache(model, n) for n in (8, 9)]
    assert caches[0] is not None  # this transformers / Llama take the static path
    # one layer class for every cache: the compiled step guards on it (a new class per call recompiled)
    assert type(caches[0].layers[0]) is type(caches[1].layers[-1])
    eos = int(R.generate(model, ids, mask, 12, None, 0, temperature=1.5)[0][1, 3])  # an EOS that gets sampled
    outs = {}
    for compiled in (False, True):
        # the static path with the eager step function (no compilation in this fast test)
        monkeypatch.setattr(R, "compiled_decode_step", lambda: R.decode_step)
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
    monkeypatch.setattr(R, "compiled_decode_step", lambda: R.decode_step)
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
