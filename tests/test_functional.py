"""Hand-derived checks of ppomax.functional (derivations in the comments)."""

import math

import pytest
import torch

from ppomax import functional as F


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_masked_mean_and_num_tokens():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = t([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 3 = 7/3
    assert F.masked_mean(x, m).item() == pytest.approx(7 / 3)
    # per row: [1.5, 4]
    assert F.masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 4.0])
    # explicit denominator: 7 / 10
    assert F.masked_mean(x, m, num_tokens=10).item() == pytest.approx(0.7)


def test_whiten_hand_values():
    x = t([[1.0, 3.0, 99.0]])
    m = t([[1, 1, 0]])
    # masked mean 2, unbiased var = ((1-2)^2 + (3-2)^2) / (2-1) = 2 -> (x-2)/sqrt(2)
    out = F.whiten(x, m)
    assert out[0, 0].item() == pytest.approx(-1 / math.sqrt(2), rel=1e-6)
    assert out[0, 1].item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert out[0, 2].item() == 0.0  # outside the mask
    out2 = F.whiten(x, m, shift_mean=False)
    assert out2[0, 0].item() == pytest.approx(2 - 1 / math.sqrt(2), rel=1e-6)


def test_kl_estimators():
    logp = t([math.log(0.5)])
    ref = t([math.log(0.25)])
    # k1 = log 0.5 - log 0.25 = log 2
    assert F.kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k2 = 0.5 (log 2)^2
    assert F.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    # k3: rho = 0.25/0.5 = 0.5 -> (0.5 - 1) - log 0.5 = -0.5 + log 2
    assert F.kl_penalty(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    # k3 >= 0 everywhere, k1 can be negative
    a, b = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    assert (F.kl_penalty(a, b, "k3") >= 0).all()
    assert (F.kl_penalty(a, b, "k1") < 0).any()
    with pytest.raises(ValueError, match="kl_estimator"):
        F.kl_penalty(a, b, "k9")


def test_k3_is_masked_before_its_exponential():
    # Issue 21 item 4. Row: one response token with log π = log 0.5, log π_ref = log 0.25 (k3 = log 2 − 0.5,
    # as above), then a padding position where the training forward gives log π = −100 and the stored
    # log π_ref is 0: exp(−(−100)) = e^100 overflows float32 to inf, and inf · 0 in the masked mean is NaN.
    logp = torch.tensor([[math.log(0.5), -100.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    k3 = F.kl_penalty(logp, ref, "k3", mask=mask)
    assert k3[0].tolist() == pytest.approx([math.log(2) - 0.5, 0.0])  # log-ratio 0 on padding: k3 = 0 there
    loss = F.masked_mean(k3, mask)
    assert loss.item() == pytest.approx(math.log(2) - 0.5)  # before the fix: nan
    loss.backward()
    # ∂k3/∂log π = 1 − ρ with ρ = π_ref/π = 0.5 on the token; nothing reaches the padding
    assert logp.grad[0].tolist() == pytest.approx([0.5, 0.0])
    # the unmasked estimate really overflows there: what the mask prevents
    assert F.kl_penalty(logp.detach(), ref, "k3")[0, 1].item() == float("inf")


def test_shape_rewards_puts_score_on_last_token():
    scores = t([2.0, -1.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    r = F.shape_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: -0.5*kl, last token (t=2) gets +2: [-0.05, -0.1, -0.15+2]
    assert r[0].tolist() == pytest.approx([-0.05, -0.1, 1.85])
    # row 1: one token: -0.5*0.4 - 1 = -1.2, rest masked
    assert r[1].tolist() == pytest.approx([-1.2, 0.0, 0.0])
    # eta = 0: only the score remains
    r0 = F.shape_rewards(scores, kl, mask, kl_coef=0.0)
    assert r0.sum().item() == pytest.approx(1.0)


def test_gae_hand_values():
    # One row, 3 tokens, gamma = 1, lambda = 0.5.
    # r = [0, 0, 1], V = [0.5, 0.2, 0.4], V after the end = 0.
    # delta_2 = 1 + 0 - 0.4 = 0.6 ; A_2 = 0.6
    # delta_1 = 0 + 0.4 - 0.2 = 0.2 ; A_1 = 0.2 + 0.5*0.6 = 0.5
    # delta_0 = 0 + 0.2 - 0.5 = -0.3 ; A_0 = -0.3 + 0.5*0.5 = -0.05
    r = t([[0.0, 0.0, 1.0, 7.0]])
    v = t([[0.5, 0.2, 0.4, 9.0]])
    m = t([[1, 1, 1, 0]])
    adv, ret = F.gae(r, v, m, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.05, 0.5, 0.6, 0.0])
    assert ret[0].tolist() == pytest.approx([0.45, 0.7, 1.0, 0.0])


def _slow_gae(r, v, m, gamma, lam):
    B, T = r.shape
    adv = torch.zeros_like(r)
    for b in range(B):
        n = int(m[b].sum().item())
        for t_ in range(n):
            total = 0.0
            for k in range(t_, n):
                v_next = v[b, k + 1].item() if k + 1 < n else 0.0
                delta = r[b, k].item() + gamma * v_next - v[b, k].item()
                total += (gamma * lam) ** (k - t_) * delta
            adv[b, t_] = total
    return adv, (adv + v) * m


def test_gae_matches_slow_loop():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [9, 1, 4, 6, 0]
    m = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        m[b, :n] = 1
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 0.0), (1.0, 1.0)]:
        adv, ret = F.gae(r, v, m, gamma, lam)
        adv_s, ret_s = _slow_gae(r, v, m, gamma, lam)
        assert torch.allclose(adv, adv_s, atol=1e-10)
        assert torch.allclose(ret, ret_s, atol=1e-10)


def test_policy_loss_hand_values():
    # two tokens: A = [1, -1], ratio = [1.5, 0.5], eps = 0.2
    # token 0: max(-1*1.5, -1*1.2) = -1.2 (clipped term active)
    # token 1: max(1*0.5, 1*0.8) = 0.8 (clipped term active)
    old = t([[0.0, 0.0]])
    new = torch.log(t([[1.5, 0.5]]))
    adv = t([[1.0, -1.0]])
    m = t([[1, 1]])
    loss, stats = F.policy_loss(new, old, adv, m, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats.clipfrac.item() == pytest.approx(1.0)
    # approx_kl (k3 of ratio) = mean((r - 1) - log r)
    expect = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert stats.approx_kl.item() == pytest.approx(expect)
    # inside the trust region nothing is clipped and loss = -A*ratio
    new2 = torch.log(t([[1.1, 0.9]]))
    loss2, stats2 = F.policy_loss(new2, old, adv, m, clip_eps=0.2)
    assert loss2.item() == pytest.approx((-1.1 + 0.9) / 2)
    assert stats2.clipfrac.item() == 0.0


def test_policy_loss_gradient_zero_when_clipped():
    # positive advantage, ratio above 1+eps: the clipped branch is constant -> zero gradient
    new = torch.log(t([[1.5]])).requires_grad_(True)
    loss, _ = F.policy_loss(new, t([[0.0]]), t([[1.0]]), t([[1.0]]), clip_eps=0.2)
    loss.backward()
    assert new.grad.item() == 0.0


def test_value_loss_hand_values():
    # V_old = 0, V = 1, R = 2, eps = 0.2 -> V_clip = 0.2
    # (V-R)^2 = 1, (V_clip-R)^2 = 3.24 -> max = 3.24, loss = 0.5*3.24 = 1.62
    v, vo, r, m = t([[1.0]]), t([[0.0]]), t([[2.0]]), t([[1.0]])
    loss, stats = F.value_loss(v, vo, r, m, clip_eps=0.2)
    assert loss.item() == pytest.approx(1.62)
    assert stats.clipfrac.item() == 1.0
    loss_u, _ = F.value_loss(v, vo, r, m, clip_eps=None)
    assert loss_u.item() == pytest.approx(0.5)


def test_value_clipping_bounds_the_update():
    # With clipping, moving V beyond V_old ± eps toward R gives no gradient: the update is bounded.
    v = t([[0.5]]).requires_grad_(True)
    loss, _ = F.value_loss(v, t([[0.0]]), t([[2.0]]), t([[1.0]]), clip_eps=0.2)
    loss.backward()
    assert v.grad.item() == 0.0
    v2 = t([[0.5]]).requires_grad_(True)
    loss2, _ = F.value_loss(v2, t([[0.0]]), t([[2.0]]), t([[1.0]]), clip_eps=None)
    loss2.backward()
    assert v2.grad.item() == pytest.approx(0.5 - 2.0)


def test_pairwise_loss_hand_values_and_stability():
    # -log sigmoid(0) = log 2 ; -log sigmoid(2) = log(1 + e^-2)
    c, r = t([1.0, 3.0]), t([1.0, 1.0])
    expect = (math.log(2) + math.log1p(math.exp(-2))) / 2
    assert F.pairwise_loss(c, r).item() == pytest.approx(expect)
    # huge negative margin: finite and equal to the margin
    assert F.pairwise_loss(t([0.0]), t([1000.0])).item() == pytest.approx(1000.0)


def test_logprobs_and_entropy_from_logits():
    logits = t([[[0.0, math.log(3.0)]]])  # probs [0.25, 0.75]
    lp = F.logprobs_from_logits(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75))
    h = F.entropy_from_logits(logits)
    assert h.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_missing_eos_penalty_in_processed_units():
    # r̃ = [0.8, −0.3, 0.8, −0.8] after Eq. 18; rows 2 and 3 have no EOS: 1.0 off each, whatever the clip did
    r = torch.tensor([0.8, -0.3, 0.8, -0.8])
    truncated = torch.tensor([False, False, True, True])
    assert F.penalise_missing_eos(r, truncated, 1.0).tolist() == pytest.approx([0.8, -0.3, -0.2, -1.8])
    assert torch.equal(F.penalise_missing_eos(r, truncated, None), r)  # off
    assert torch.equal(F.penalise_missing_eos(r, torch.zeros(4, dtype=torch.bool), 1.0), r)  # every row ended


def test_running_moments_match_full_history():
    rm = F.RunningMoments()
    chunks = [torch.randn(n, dtype=torch.float64) * 3 + 1 for n in (5, 1, 17, 40)]
    for c in chunks:
        rm.update(c)
    allx = torch.cat(chunks)
    assert rm.count == 63
    assert rm.mean == pytest.approx(allx.mean().item())
    assert rm.std == pytest.approx(allx.std(unbiased=False).item())
    rm2 = F.RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    assert (rm2.mean, rm2.std, rm2.count) == (rm.mean, rm.std, rm.count)


def test_normalize_clip_and_scale():
    s = t([0.0, 2.0, 10.0])
    # (s - 2)/4 = [-0.5, 0, 2] -> clip 0.8 -> [-0.5, 0, 0.8]
    assert F.normalize_and_clip(s, mean=2.0, std=4.0, clip=0.8).tolist() == pytest.approx([-0.5, 0.0, 0.8])
    assert F.normalize_and_clip(s, mean=2.0, std=4.0, clip=None).tolist() == pytest.approx([-0.5, 0.0, 2.0])
    assert F.scale_rewards(s, std=2.0).tolist() == pytest.approx([0.0, 1.0, 5.0])


def test_adaptive_kl_controller():
    c = F.AdaptiveKLController(0.1, target=6.0, horizon=100)
    c.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2 -> 0.1 * (1 + 0.2*10/100) = 0.102
    assert c.value == pytest.approx(0.102)
    c.update(current_kl=3.0, n_steps=10)  # error -0.5 clipped to -0.2 -> * 0.98
    assert c.value == pytest.approx(0.102 * 0.98)


def test_explained_variance():
    ret = t([[1.0, 2.0, 3.0]])
    m = t([[1, 1, 1]])
    assert F.explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    # constant prediction at the mean: Var[R - V] = Var[R] -> 0
    assert F.explained_variance(t([[2.0, 2.0, 2.0]]), ret, m).item() == pytest.approx(0.0)


def test_micro_batch_accumulation_equals_full_batch():
    """Split-and-accumulate with the mini-batch token count = the full mini-batch gradient."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    w = torch.randn(T, generator=g, dtype=torch.float64, requires_grad=True)
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate([7, 2, 5, 1, 6, 3]):  # unequal lengths: a naive per-micro mean differs
        m[b, :n] = 1

    def losses(rows, num_tokens):
        logp = old[rows] + 0.1 * w
        pl, _ = F.policy_loss(logp, old[rows], adv[rows], m[rows], 0.2, num_tokens=num_tokens)
        vl, _ = F.value_loss(w.expand(len(rows), T), old[rows], ret[rows], m[rows], 0.2, num_tokens=num_tokens)
        return pl + vl

    full = losses(list(range(B)), None)
    (g_full,) = torch.autograd.grad(full, w)
    n_tok = m.sum()
    acc = torch.zeros_like(w)
    for rows in ([0, 1], [2, 3], [4, 5]):
        (g_part,) = torch.autograd.grad(losses(rows, n_tok), w)
        acc += g_part
    assert torch.allclose(acc, g_full, atol=1e-12)
    # and the naive per-micro-batch mean would NOT match (the test can fail)
    naive = sum(torch.autograd.grad(losses(rows, None), w)[0] for rows in ([0, 1], [2, 3], [4, 5])) / 3
    assert not torch.allclose(naive, g_full, atol=1e-6)


def test_next_token_nll_shifts_and_masks():
    # position 0 predicts token 1 with probs [0.25, 0.75]; label 1 -> nll = -log 0.75.
    # position 1 predicts token 2, whose label is -100 (masked).
    logits = t([[[0.0, math.log(3.0)], [5.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, -100]])
    nll, m = F.next_token_nll(logits, labels)
    assert nll.shape == (1, 2) and m.tolist() == [[1.0, 0.0]]
    assert nll[0, 0].item() == pytest.approx(-math.log(0.75))
    assert F.masked_mean(nll, m).item() == pytest.approx(-math.log(0.75))
