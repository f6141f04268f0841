"""Log-probs and entropy from hidden states without the full-vocabulary logits (issue #13 item 4).

- ``functional.chunked_logprobs`` equals the plain ``logprobs_from_logits`` / ``entropy_from_logits``
  on ``F.linear(hidden, W, b) / τ`` in values and in gradients w.r.t. hidden, weight and bias
  (fp32 against autograd of the plain path, fp64 against finite differences with gradcheck);
- it keeps O(rows · H + V · H) for the backward, not the (rows, V) logits (saved-tensor bytes);
- ``rollout.response_logprobs`` takes that path for Llama and GPT-2, with and without LoRA, and
  gives the plain path's log-probs, entropies and parameter gradients; models whose logits are
  not exactly ``lm_head(hidden)`` fall back to the plain path.
"""

from __future__ import annotations

import pytest
import torch

import ppomax.ppo.rollout as R
from ppomax import functional as F
from ppomax.models import build_tiny_model, load_causal_lm

lin = torch.nn.functional.linear


def _case(B=3, T=7, H=16, V=50, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # logits of a few nats, like a trained LM head's (std ≈ 1.2 before the temperature)
    hidden = (0.3 * torch.randn(B, T, H, generator=g, dtype=dtype)).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, b, tokens


def _plain(hidden, weight, bias, tokens, temperature):
    z = lin(hidden, weight, bias) / temperature
    return F.logprobs_from_logits(z, tokens), F.entropy_from_logits(z)


# ---------------------------------------------------------------------------------------------
# The pure function
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [1, 5, 21, None])  # 21 = B·T rows (one chunk); 5 leaves a chunk of 1
def test_values_equal_the_plain_computation(temperature, chunk_size):
    h, w, b, tok = _case()
    logp, ent = F.chunked_logprobs(h, w, tok, temperature, bias=b, chunk_size=chunk_size, with_entropy=True)
    ref_logp, ref_ent = _plain(h, w, b, tok, temperature)
    assert logp.shape == ent.shape == (3, 7) and logp.dtype == ent.dtype == torch.float32
    # a few float32 ulps: exp(z − logsumexp) and softmax round differently
    torch.testing.assert_close(logp, ref_logp, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=2e-6, atol=2e-6)
    only = F.chunked_logprobs(h, w, tok, temperature, bias=b, chunk_size=chunk_size)
    assert torch.equal(only, logp)  # the entropy changes nothing about the log-probs


def test_temperature_is_applied_to_the_logits():
    # Hand-computed: H = 1, W = [[0], [1], [2]] (V = 3), h = 1 -> logits (0, 1, 2); τ = 2 -> z = (0, .5, 1).
    # log p(token 2) = 1 − log(1 + e^.5 + e^1);  H = log Σ e^z − Σ softmax(z)·z
    h = torch.ones(1, 1, 1)
    w = torch.tensor([[0.0], [1.0], [2.0]])
    z = torch.tensor([0.0, 0.5, 1.0])
    lse = torch.log(1 + torch.exp(torch.tensor(0.5)) + torch.exp(torch.tensor(1.0)))
    logp, ent = F.chunked_logprobs(h, w, torch.tensor([[2]]), 2.0, with_entropy=True)
    torch.testing.assert_close(logp, (1.0 - lse).view(1, 1))
    torch.testing.assert_close(ent, (lse - (torch.softmax(z, 0) * z).sum()).view(1, 1))
    at_one = F.chunked_logprobs(h, w, torch.tensor([[2]]), 1.0)
    assert not torch.allclose(at_one, logp, atol=1e-3)  # τ = 1 is a different distribution


@pytest.mark.parametrize("chunk_size", [4, None])  # 4 does not divide the 21 rows
def test_gradients_match_autograd_of_the_plain_computation(chunk_size):
    h, w, b, tok = _case()
    g = torch.Generator().manual_seed(5)
    c_logp, c_ent = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    logp, ent = F.chunked_logprobs(h, w, tok, 0.7, bias=b, chunk_size=chunk_size, with_entropy=True)
    got = torch.autograd.grad((c_logp * logp).sum() + (c_ent * ent).sum(), (h, w, b))
    ref_logp, ref_ent = _plain(h, w, b, tok, 0.7)
    want = torch.autograd.grad((c_logp * ref_logp).sum() + (c_ent * ref_ent).sum(), (h, w, b))
    for name, x, y in zip(("hidden", "weight", "bias"), got, want):
        scale = float(y.abs().max())
        assert scale > 0.1, name  # a real gradient to compare
        # float32 rounding of sums over V in another order: an element's error scales with the largest
        # gradient, not with its own size (measured: 2.9e-6 on a hidden gradient of max 11.1 on an AMD EPYC)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_an_unused_entropy_output_adds_no_gradient():
    h, w, b, tok = _case()
    logp, _ = F.chunked_logprobs(h, w, tok, 0.9, bias=b, chunk_size=6, with_entropy=True)
    got = torch.autograd.grad(logp.sum(), (h, w, b))
    want = torch.autograd.grad(_plain(h, w, b, tok, 0.9)[0].sum(), (h, w, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # and the entropy alone gives the entropy's gradient
    _, ent = F.chunked_logprobs(h, w, tok, 0.9, bias=b, chunk_size=6, with_entropy=True)
    got = torch.autograd.grad(ent.sum(), (h, w, b))
    want = torch.autograd.grad(_plain(h, w, b, tok, 0.9)[1].sum(), (h, w, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_gradcheck_fp64():
    h, w, b, tok = _case(B=2, T=3, H=4, V=6, dtype=torch.float64)
    fn = lambda h_, w_, b_: F.chunked_logprobs(h_, w_, tok, 0.8, bias=b_, chunk_size=4, with_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)
    out = F.chunked_logprobs(h, w, tok, 0.8, bias=b, chunk_size=4)
    assert out.dtype == torch.float64  # fp64 stays fp64 (the "float32 at least" rule)
    no_bias = lambda h_, w_: F.chunked_logprobs(h_, w_, tok, 1.0, chunk_size=5)  # noqa: E731
    assert torch.autograd.gradcheck(no_bias, (h, w), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_masked_padded_batch():
    """Right-padded responses (pad id 0 past the end): the masked loss and its gradients equal the plain
    path's, and the padded rows get exactly zero gradient w.r.t. their hidden states."""
    h, w, b, tok = _case(B=3, T=6, V=40)
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    tok = tok.masked_fill(mask == 0, 0)
    adv = torch.linspace(-1.0, 1.0, 18).view(3, 6)
    logp, ent = F.chunked_logprobs(h, w, tok, 0.7, bias=b, chunk_size=4, with_entropy=True)
    loss = F.masked_mean(-adv * logp, mask) - 0.01 * F.masked_mean(ent, mask)
    got = torch.autograd.grad(loss, (h, w, b))
    ref_logp, ref_ent = _plain(h, w, b, tok, 0.7)
    ref = F.masked_mean(-adv * ref_logp, mask) - 0.01 * F.masked_mean(ref_ent, mask)
    want = torch.autograd.grad(ref, (h, w, b))
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert torch.equal(got[0][mask == 0], torch.zeros_like(got[0][mask == 0]))
    assert got[0][mask == 1].abs().amin(dim=-1).gt(0).all()


def test_bf16_autocast_runs_the_matmul_in_bf16_and_the_softmax_in_fp32():
    h, w, b, tok = _case(H=32, V=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = F.chunked_logprobs(h, w, tok, 0.7, bias=b, chunk_size=5, with_entropy=True)
        z = lin(h, w, b)  # bf16 under autocast, as the model's lm_head
        ref_logp = F.logprobs_from_logits(z.float() / 0.7, tok)
    assert z.dtype == torch.bfloat16 and logp.dtype == torch.float32
    # same bf16 logits (rounded the same way), softmax of them in fp32 on both sides
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    fp32 = F.chunked_logprobs(h, w, tok, 0.7, bias=b)
    assert (logp - fp32).abs().max() > 1e-4  # the matmul really ran in bf16
    grads = torch.autograd.grad((logp + ent).sum(), (h, w, b))
    assert [x.dtype for x in grads] == [torch.float32] * 3  # gradients in the inputs' dtypes


def test_bad_shapes_name_the_argument():
    h, w, b, tok = _case()
    with pytest.raises(ValueError, match="weight"):
        F.chunked_logprobs(h, w.t(), tok)
    with pytest.raises(ValueError, match="tokens"):
        F.chunked_logprobs(h, w, tok[:, :-1])
    with pytest.raises(ValueError, match="bias"):
        F.chunked_logprobs(h, w, tok, bias=b[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        F.chunked_logprobs(h, w, tok, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        F.chunked_logprobs(h, w, tok, temperature=0.0)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("with_entropy", [False, True])
def test_saves_a_tenth_of_the_plain_path_for_backward(with_entropy):
    B, T, H, V = 8, 128, 64, 8192
    h, w, _, tok = _case(B=B, T=T, H=H, V=V, bias=False)

    def plain():
        lp, ent = _plain(h, w, None, tok, 0.7)
        return lp.sum() + (ent.sum() if with_entropy else 0)

    def chunked():
        out = F.chunked_logprobs(h, w, tok, 0.7, with_entropy=with_entropy)
        return out[0].sum() + out[1].sum() if with_entropy else out.sum()

    p, c = _saved_bytes(plain), _saved_bytes(chunked)
    logits = B * T * V * 4
    assert p >= logits  # the plain path keeps at least one fp32 copy of the logits
    # chunked: hidden (B·T·H) + weight (V·H, a parameter anyway) + tokens + per-row logsumexp/entropy
    assert c <= (B * T * H + V * H) * 4 + B * T * (8 + 4 + 4) + 64
    assert c < p / 10, (c, p)


# ---------------------------------------------------------------------------------------------
# response_logprobs on real architectures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("chunked") / "tiny", num_layers=2, hidden_size=32,
                            num_heads=2, vocab_size=300)
    return load_causal_lm(path)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _parts(vocab: int):
    """B = 4, P = 5 (two rows left-padded), T = 6 (right-padded, one row of a single token)."""
    g = torch.Generator().manual_seed(0)
    p_ids = torch.randint(3, vocab, (4, 5), generator=g)
    p_mask = torch.ones_like(p_ids)
    p_mask[:2, :2] = 0
    p_ids[:2, :2] = 0
    resp = torch.randint(3, vocab, (4, 6), generator=g)
    mask = torch.tensor([[1.0] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    resp = resp.masked_fill(mask == 0, 0)
    return p_ids, p_mask, resp, mask


def _lora(model, targets):
    from ppomax.models import apply_lora

    model = apply_lora(model, r=4, target_modules=targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at 0 (identity adapters): make them matter
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _logprobs_and_grads(model, parts, chunked: bool):
    model.zero_grad(set_to_none=True)
    logp, ent = R.response_logprobs(model, parts, 0.7, with_entropy=True, chunked=chunked)
    mask = parts[3]
    adv = torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask)
    (F.masked_mean(-adv * logp, mask) - 0.05 * F.masked_mean(ent, mask)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


@pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")  # peft on GPT-2's Conv1D: expected
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_response_logprobs_chunked_equals_plain(arch, lora, llama, monkeypatch):
    import copy

    if lora:
        pytest.importorskip("peft")
    model = copy.deepcopy(llama) if arch == "llama" else _gpt2()
    if lora:
        model = _lora(model, "q_proj,v_proj" if arch == "llama" else "c_attn")
    model.train()
    calls = []
    real = F.chunked_logprobs
    monkeypatch.setattr(R.F, "chunked_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    parts = _parts(300)
    logp, ent, grads = _logprobs_and_grads(model, parts, chunked=True)
    assert calls == [1]  # the chunked path ran
    ref_logp, ref_ent, ref_grads = _logprobs_and_grads(model, parts, chunked=False)
    assert calls == [1]
    mask = parts[3]
    torch.testing.assert_close(logp * mask, ref_logp * mask, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent * mask, ref_ent * mask, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    if lora:
        assert all("lora_" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)
    if lora:  # π_ref: the same model with its adapters disabled, through the chunked path too
        with model.disable_adapter(), torch.no_grad():
            ref_chunked = R.response_logprobs(model, parts, 0.7)
            ref_plain = R.response_logprobs(model, parts, 0.7, chunked=False)
        torch.testing.assert_close(ref_chunked * mask, ref_plain * mask, rtol=0, atol=1e-5)
        assert (ref_chunked - logp).abs().max() > 1e-3  # the adapters were really off
        assert len(calls) == 2


def test_entropy_grad_false_detaches_the_entropy(llama):
    logp, ent = R.response_logprobs(llama, _parts(300), 1.0, with_entropy=True, entropy_grad=False)
    assert logp.requires_grad and not ent.requires_grad


def test_other_models_fall_back_to_the_full_forward(llama, monkeypatch):
    import copy

    assert R._decoder_and_head(llama) == (llama.model, llama.lm_head)
    capped = copy.deepcopy(llama)
    capped.config.final_logit_softcapping = 30.0  # Gemma-2-style tanh capping happens after the head
    assert R._decoder_and_head(capped) is None

    class MyLlama(type(llama)):  # a subclass may change its forward
        pass

    sub = copy.deepcopy(llama)
    sub.__class__ = MyLlama
    assert R._decoder_and_head(sub) is None
    hooked = copy.deepcopy(llama)
    hooked.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    assert R._decoder_and_head(hooked) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert R._decoder_and_head(llama) is None  # maybe_compile'd callers trace the plain path


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # LoRA on a tied head: the point
def test_lora_on_the_head_falls_back(llama):
    import copy

    pytest.importorskip("peft")
    on_attn = _lora(copy.deepcopy(llama), "q_proj")
    assert R._decoder_and_head(on_attn) is not None
    on_head = _lora(copy.deepcopy(llama), "q_proj,lm_head")
    assert R._decoder_and_head(on_head) is None
    parts = _parts(300)
    with torch.no_grad():  # and the fallback computes what the adapted head gives
        got = R.response_logprobs(on_head, parts, 0.7)
        logits = R.response_logits(on_head, *parts) / 0.7
    torch.testing.assert_close(got, F.logprobs_from_logits(logits, parts[2]))
