"""The fast rollout paths give the same results as the straightforward ones.

- ``sample_categorical`` (inverse CDF, one uniform per row) samples the same distribution as
  ``torch.multinomial`` and never draws a token of probability 0;
- the preallocated KV cache gives the same tokens as the model's own ``DynamicCache``;
- ``logits_to_keep`` in ``response_logits`` gives the logits of a full forward;
- log-probs returned by ``generate`` match a second forward (fp32, to float rounding);
- ``stop_at_eos=False`` gives fixed-length responses.
"""

from __future__ import annotations

import pytest
import torch

import ppomax.ppo.rollout as R
import ppomax.ppo.sampling as S
from ppomax.models import build_tiny_model, load_causal_lm


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("fast") / "tiny", num_layers=2, hidden_size=32, num_heads=2,
                            vocab_size=300)
    return load_causal_lm(path).eval()


def _prompts(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (6, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0  # left padding
    ids[:2, :3] = 0
    return ids, mask


def test_sample_categorical_matches_the_distribution():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 20, generator=g) * 2, dim=-1)
    probs[1, 12:] = 0  # a cut tail (top-k / top-p)
    probs[1] /= probs[1].sum()
    probs[2] = 0
    probs[2, 5] = 1.0
    torch.manual_seed(0)
    n = 40_000
    draws = S.sample_categorical(probs.repeat(n, 1)).view(n, 3)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=20).double() / n
        assert freq[probs[row] == 0].sum() == 0, "a token of probability 0 was drawn"
        # binomial standard error of a frequency ≤ 0.5/sqrt(n) = 0.0025: 5 sigma
        assert torch.allclose(freq, probs[row].double(), atol=0.0125)


def test_sample_from_logits_respects_top_k():
    torch.manual_seed(0)
    logits = torch.randn(16, 100)
    top = torch.topk(logits, 3, dim=-1).indices
    for _ in range(20):
        tok = S.sample_from_logits(logits, 0.7, top_k=3)
        assert (top == tok[:, None]).any(-1).all()


@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_preallocated_cache_gives_the_same_tokens(model, monkeypatch, stop_at_eos):
    ids, mask = _prompts(model)
    torch.manual_seed(1)  # EOS := a token that row 3 samples at step 4, so rows stop at different steps
    eos = int(R.generate(model, ids, mask, 12, None, 0, temperature=1.5)[0][3, 4])
    torch.manual_seed(1)
    fast = R.generate(model, ids, mask, 12, eos, 0, temperature=1.5, stop_at_eos=stop_at_eos)
    if stop_at_eos:
        assert 0 < int(fast[1].sum()) < fast[1].numel()  # some rows stopped early
    monkeypatch.setattr(R, "_preallocated_kv_cache", lambda m, n: None)  # the model's own DynamicCache
    torch.manual_seed(1)
    plain = R.generate(model, ids, mask, 12, eos, 0, temperature=1.5, stop_at_eos=stop_at_eos)
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)


def test_logits_to_keep_gives_the_full_forward_logits(model):
    ids, mask = _prompts(model)
    torch.manual_seed(2)
    resp, rmask, _ = R.generate(model, ids, mask, 9, None, 0, temperature=1.0)
    kept = R.response_logits(model, ids, mask, resp, rmask)
    attn = torch.cat([mask, rmask.long()], dim=1)
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, resp], 1), attention_mask=attn,
                     position_ids=R.position_ids_from_mask(attn)).logits
    P, T = ids.shape[1], resp.shape[1]
    assert kept.shape == (6, T, model.config.vocab_size)
    torch.testing.assert_close(kept, full[:, P - 1 : P + T - 1], rtol=1e-5, atol=1e-5)


def test_generate_logprobs_match_a_second_forward(model):
    ids, mask = _prompts(model)
    torch.manual_seed(3)
    resp, rmask, trunc, logp = R.generate(model, ids, mask, 10, 5, 0, temperature=0.7, return_logprobs=True)
    with torch.no_grad():
        again = R.response_logprobs(model, (ids, mask, resp, rmask), 0.7)
    torch.testing.assert_close(logp * rmask, again * rmask, rtol=0, atol=1e-4)


def test_no_stop_at_eos_gives_fixed_length(model):
    ids, mask = _prompts(model)
    torch.manual_seed(4)
    resp, rmask, trunc = R.generate(model, ids, mask, 15, 5, 0, temperature=1.5, stop_at_eos=False)
    assert resp.shape == (6, 15) and bool((rmask == 1).all()) and bool(trunc.all())


def test_is_eos_is_torch_isin_without_its_host_syncs():
    """sampling.is_eos (a broadcast compare a CUDA graph can capture) gives torch.isin's answer."""
    from ppomax.ppo.sampling import is_eos

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (64, 9), generator=g)
    for eos in ([3], [3, 17, 49], list(range(0, 50, 2))):
        e = torch.tensor(eos)
        assert torch.equal(is_eos(tokens, e), torch.isin(tokens, e))
        assert torch.equal(is_eos(tokens[:, 0], e), torch.isin(tokens[:, 0], e))
