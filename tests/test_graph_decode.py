"""The hf engine's fast decode paths (issue 22) sample exactly what the eager loop samples.

- ``GraphDecoder`` with ``capture=False`` runs the very steps a CUDA graph captures (static KV cache,
  device-side write column and cache position, ``sampling.sample_step``): on CPU it gives the eager
  loop's tokens, masks and truncation flags (``torch.equal``) and its log-probs to fp32 rounding
  (static keys are P + N long with the unwritten slots masked: measured ≤ 1e-6 here, asserted at
  2e-6), and it consumes the same random numbers. A GPU replays the graph instead: not verified on a
  GPU in this session (``benchmarks/gpu_ppo.py`` checks it there).
- Where no graph can be used the decoder logs one reason and is the eager loop.
- ``Bf16RolloutCopy`` (``--rollout_bf16_weights``) computes under autocast exactly what the fp32
  policy computes under autocast, and follows the policy after ``sync``.
- A PPO run sampling through the static steps resumes bit-exactly.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import ppomax.ppo.rollout as R
from ppomax.engines import Sampling
from ppomax.engines.graph_decode import GraphDecoder
from ppomax.engines.hf import Bf16RolloutCopy, HFEngine
from ppomax.models import build_tiny_model, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("graph") / "tiny", num_layers=2, hidden_size=64, vocab_size=512)


@pytest.fixture(scope="module")
def model(tiny):
    return load_causal_lm(tiny).eval()


def _prompts(model, B=6, P=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (B, P), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0  # left padding
    ids[:2, :3] = 0
    return ids, mask


def _eos_sampled(model, ids, mask):
    """Two ids that get sampled (seed 1, temperature 1.5): rows then stop at different steps."""
    torch.manual_seed(1)
    r = R.generate(model, ids, mask, 12, None, 0, temperature=1.5)[0]
    return (int(r[3, 4]), int(r[0, 6]))


def _eager(model, ids, mask, s: Sampling, logps=True):
    return R.generate(model, ids, mask, s.max_new_tokens, list(s.eos_token_ids), s.pad_token_id, s.temperature,
                      s.top_k, s.top_p, stop_at_eos=s.stop_at_eos, return_logprobs=logps)


def _assert_same(fast, eager, atol=2e-6):
    for a, b in zip(fast[:3], eager[:3]):  # tokens, mask, truncated
        assert torch.equal(a, b)
    torch.testing.assert_close(fast[3], eager[3], rtol=0, atol=atol)


@pytest.mark.parametrize("stop_at_eos", [True, False])
@pytest.mark.parametrize("bucket", [1, 16])
def test_static_steps_sample_the_eager_loops_tokens(model, stop_at_eos, bucket):
    """Same seed, same tokens / mask / truncation (torch.equal) and log-probs to fp32 rounding, with
    every EOS id, per-row stop and temperature; again on a second call (the static tensors are reset
    in place); the random stream ends where the eager loop's ends. bucket 16: prompts left-padded
    from 7 to 16 (extra masked padding changes the attention sums' rounding only)."""
    ids, mask = _prompts(model)
    s = Sampling(12, _eos_sampled(model, ids, mask), 0, temperature=1.5, stop_at_eos=stop_at_eos)
    dec = GraphDecoder(capture=False, prompt_bucket=bucket)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        eager = _eager(model, ids, mask, s)
        after_eager = torch.get_rng_state()
        torch.manual_seed(seed)
        fast = dec.generate(model, ids, mask, s, return_logprobs=True)
        assert torch.equal(torch.get_rng_state(), after_eager)  # the same draws, no more, no fewer
        _assert_same(fast, eager, atol=2e-6 if bucket == 1 else 1e-5)
        outs.append(fast)
    first = outs[0]  # seed 1 samples both EOS ids
    if stop_at_eos:  # rows stopped at different steps; some ran to the cap
        assert 0 < int(first[1].sum()) < first[1].numel() and bool(first[2].any()) and not bool(first[2].all())
    else:
        assert first[0].shape[1] == 12 and bool((first[1] == 1).all()) and not bool(first[2].all())
    assert dec.counts["static_steps"] > 0 and dec.counts["eager_calls"] == 0 and len(dec.steps) == 1


def test_static_steps_with_top_k_top_p_and_without_logprobs(model):
    """ppomax eval samples with top-k / top-p: the static steps apply them as the eager loop does."""
    ids, mask = _prompts(model)
    s = Sampling(9, (5,), 0, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    eager = _eager(model, ids, mask, s, logps=False)
    torch.manual_seed(3)
    fast = GraphDecoder(capture=False, prompt_bucket=1).generate(model, ids, mask, s)
    assert len(fast) == 3 and all(torch.equal(a, b) for a, b in zip(fast, eager))


def test_without_a_gpu_the_decoder_says_why_once_and_is_the_eager_loop(model, caplog):
    ids, mask = _prompts(model)
    s = Sampling(8, (5,), 0, temperature=1.2)
    dec = GraphDecoder()  # capture=True: CUDA graphs
    outs = []
    with caplog.at_level(logging.WARNING, logger="ppomax"):
        for _ in range(2):
            torch.manual_seed(4)
            outs.append(dec.generate(model, ids, mask, s, return_logprobs=True))
    torch.manual_seed(4)
    eager = _eager(model, ids, mask, s)
    for out in outs:
        assert all(torch.equal(a, b) for a, b in zip(out, eager))  # it *is* the eager loop
    msgs = [r.getMessage() for r in caplog.records if "rollout_cuda_graph" in r.getMessage()]
    assert len(msgs) == 1 and "CUDA device" in msgs[0] and "cpu" in msgs[0], msgs
    assert dec.counts == {"captures": 0, "replays": 0, "static_steps": 0, "eager_calls": 2}


def test_a_model_without_a_static_cache_falls_back_with_its_name(model, monkeypatch, caplog):
    monkeypatch.setattr(R, "static_kv_cache", lambda m, n: None)  # as for sliding-window / hybrid models
    ids, mask = _prompts(model)
    dec = GraphDecoder(capture=False)
    with caplog.at_level(logging.WARNING, logger="ppomax"):
        dec.generate(model, ids, mask, Sampling(4, (5,), 0))
        dec.generate(model, ids, mask, Sampling(4, (5,), 0))
    msgs = [r.getMessage() for r in caplog.records if "rollout_cuda_graph" in r.getMessage()]
    assert len(msgs) == 1 and "LlamaForCausalLM" in msgs[0] and "StaticCache" in msgs[0]


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_copy_samples_exactly_what_autocast_samples_and_follows_sync(tiny, lora):
    """Under bf16 autocast the copy's tokens and log-probs are torch.equal to the fp32 policy's; after
    a weight change the copy is stale until sync, then equal again. Only nn.Linear weights are bf16
    copies (the LM head untied); embeddings and norms are the policy's own tensors."""
    from ppomax.models import apply_lora

    torch.manual_seed(0)
    policy = load_causal_lm(tiny).eval()
    if lora:
        policy = apply_lora(policy)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    ids, mask = _prompts(policy)
    s = Sampling(8, (5,), 0, temperature=1.3)
    plain = HFEngine(policy, bf16=True)
    fast = HFEngine(policy, bf16=True, bf16_weights=True)
    copy_ = fast.bf16_copy.module
    base = copy_.get_base_model() if lora else copy_
    pbase = policy.get_base_model() if lora else policy
    assert base.lm_head.weight.dtype == torch.bfloat16 and base.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight is pbase.model.embed_tokens.weight  # shared, fp32
    assert base.model.norm.weight is pbase.model.norm.weight
    assert pbase.lm_head.weight.dtype == torch.float32  # the policy itself is untouched

    def sample(engine):
        torch.manual_seed(5)
        return engine.generate(ids, mask, s, return_logprobs=True)

    def same(a, b):
        return torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)

    assert same(sample(fast), sample(plain))
    with torch.no_grad():  # an "update" of a trained weight
        name = "lora_B" if lora else "q_proj"
        w = next(p for n, p in policy.named_parameters() if name in n and p.requires_grad)
        w.add_(torch.randn_like(w) * 0.5)
    assert not same(sample(fast), sample(plain))  # stale: the copy still holds the old weights
    fast.sync(policy)
    assert same(sample(fast), sample(plain))


def test_bf16_copy_refresh_keeps_storage(tiny):
    """A captured graph reads the copy's weights at fixed addresses: refresh writes in place."""
    policy = load_causal_lm(tiny)
    c = Bf16RolloutCopy(policy)
    ptrs = [d.data_ptr() for d, _ in c.pairs]
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    c.refresh()
    assert [d.data_ptr() for d, _ in c.pairs] == ptrs
    assert all(torch.equal(d, src.to(torch.bfloat16)) for d, src in c.pairs)


def test_ppo_sampling_through_the_static_steps_resumes_exactly(tiny, tmp_path):
    """PPO with --rollout_cuda_graph, its decoder forced to run the static steps (capture=False, as
    the graph would): a run interrupted after iteration 2 and resumed equals the straight run."""
    from ppomax.config import PPOConfig
    from ppomax.ppo.trainer import PPOTrainer

    tok = load_tokenizer(tiny)
    prompts = ["Say some words:", "Say a few words:", "Say three words:", "Say words:"]
    base = load_causal_lm(tiny)

    def run(out, max_steps, resume=None):
        cfg = PPOConfig.from_preset(
            "ppo_max", model_name_or_path=tiny, output_dir=str(out), seed=0, rollout_batch_size=4, num_mini_batches=2,
            per_device_train_batch_size=2, generation_batch_size=4, response_length=6, critic_init="sft",
            learning_rate=1e-3, critic_learning_rate=1e-3, critic_pretrain_steps=0, max_steps=max_steps,
            save_steps=2, report_to="none", disable_tqdm=True, num_sample_generations=0, rollout_cuda_graph=True,
            resume_from=resume)
        tr = PPOTrainer(cfg, policy=copy.deepcopy(base), ref_policy=copy.deepcopy(base), tokenizer=tok,
                        prompts=prompts, reward_fn=lambda p, r: [len(x) / 10 for x in r])
        tr.engine.decoder = GraphDecoder(capture=False, prompt_bucket=8)
        rows = tr.train()
        assert tr.engine.decoder.counts["static_steps"] > 0 and tr.engine.decoder.counts["eager_calls"] == 0
        return tr, rows

    straight, rows = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, rows_b = run(tmp_path / "b", 4, resume="latest")
    assert [r["step"] for r in rows_b][-2:] == [3, 4]
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)
    for key in ("policy/loss", "kl/ref", "reward/raw_mean", "response/length_mean", "critic/value_loss"):
        assert rows[-1][key] == rows_b[-1][key], key
