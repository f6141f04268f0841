"""Hand-computed checks of ppomax.stats (derivations in the comments)."""

import math

import pytest

from ppomax import stats


def test_win_rate_ties_count_half():
    # 3>1 win, 2=2 tie, 1<4 loss, 5>0 win -> (2 + 0.5) / 4
    assert stats.win_rate([3, 2, 1, 5], [1, 2, 4, 0]) == pytest.approx(0.625)
    assert stats.win_rate([1, 1], [1, 1]) == pytest.approx(0.5)
    assert math.isnan(stats.win_rate([], []))
    with pytest.raises(ValueError, match="paired"):
        stats.win_rate([1, 2], [1])


def test_wilson_interval_hand_values():
    # 8/10, z=1.96: z²=3.8416, denom=1.38416, centre=(0.8+0.19208)/denom=0.716738,
    # half=1.96*sqrt(0.016+0.009604)/denom=0.226581 -> (0.490157, 0.943319)
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.490157, abs=1e-5)
    assert hi == pytest.approx(0.943319, abs=1e-5)
    # 0/10: centre=0.19208/denom=0.138770 = half -> (0, 0.277541)
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.277541, abs=1e-5)
    # fractional 2.5/5 (ties): p=0.5 so symmetric about 0.5; denom=1.76832,
    # half=1.96*sqrt(0.05+0.038416)/denom=0.329579
    lo, hi = stats.wilson_interval(2.5, 5)
    assert (lo, hi) == pytest.approx((0.170421, 0.829579), abs=1e-5)
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_mean_ci_student_t():
    # [1..5]: mean 3, s=sqrt(10/4)=1.581139, t_{4}=2.776, half=2.776*1.581139/sqrt(5)=1.962928
    m, lo, hi = stats.mean_ci([1, 2, 3, 4, 5])
    assert (m, lo, hi) == pytest.approx((3.0, 1.037072, 4.962928), abs=1e-5)
    # [2, 4]: s=sqrt(2), t_{1}=12.706, half = 12.706 * sqrt(2)/sqrt(2) = 12.706
    assert stats.mean_ci([2, 4]) == pytest.approx((3.0, -9.706, 15.706))
    # 90%: t_{4}=2.132, half = 2.132 * 0.707107 = 1.507552
    assert stats.mean_ci([1, 2, 3, 4, 5], confidence=0.90)[2] == pytest.approx(4.507552, abs=1e-5)
    m, lo, hi = stats.mean_ci([7.0])
    assert m == 7.0 and math.isnan(lo) and math.isnan(hi)


def test_t_critical_beyond_table():
    assert stats.t_critical(30) == 2.042
    assert stats.t_critical(40) == pytest.approx(2.021, abs=1e-3)  # textbook value
    assert stats.t_critical(120) == pytest.approx(1.980, abs=1e-3)
    assert stats.t_critical(10**7) == pytest.approx(1.959964, abs=1e-5)  # -> z
    with pytest.raises(ValueError, match="confidence"):
        stats.t_critical(5, confidence=0.8)


def test_bootstrap_diff_ci():
    # a=[0,2], b=[0,0]: bootstrap means of a are 0 (p=1/4), 1 (1/2), 2 (1/4), b is always 0,
    # so the 2.5% / 97.5% quantiles of the difference are 0 and 2; 0 is inside -> not significant
    diff, lo, hi = stats.bootstrap_diff_ci([0, 2], [0, 0], n_boot=4000, seed=1)
    assert (diff, lo, hi) == (1.0, 0.0, 2.0)
    assert not stats.significant(lo, hi)
    # constant samples: every resample gives exactly 1 - 0
    assert stats.bootstrap_diff_ci([1, 1, 1], [0, 0, 0]) == (1.0, 1.0, 1.0)
    assert stats.significant(1.0, 1.0)
    # clear separation is significant, deterministic per seed
    r1 = stats.bootstrap_diff_ci([5.0, 5.2, 4.9, 5.1], [1.0, 1.1, 0.9, 1.2], seed=3)
    assert r1 == stats.bootstrap_diff_ci([5.0, 5.2, 4.9, 5.1], [1.0, 1.1, 0.9, 1.2], seed=3)
    assert stats.significant(r1[1], r1[2])
    # one seed on a side: no interval
    diff, lo, hi = stats.bootstrap_diff_ci([1.0], [0.0, 0.5])
    assert diff == pytest.approx(0.75) and math.isnan(lo) and math.isnan(hi)
    assert not stats.significant(lo, hi)


def test_significant():
    assert stats.significant(0.1, 0.5)
    assert stats.significant(-0.5, -0.1)
    assert not stats.significant(-0.1, 0.5)
    assert not stats.significant(math.nan, 1.0)


def test_percentiles():
    # values 1..101: the q-th percentile sits exactly at index q -> value q + 1
    assert stats.percentiles(range(1, 102)) == {50: 51.0, 90: 91.0, 99: 100.0}
    # [1,2,3,4], q=25: index 0.25*3 = 0.75 -> 1 + 0.75 = 1.75; q=50 -> 2.5
    assert stats.percentiles([4, 1, 3, 2], qs=(25, 50)) == {25: 1.75, 50: 2.5}
    assert math.isnan(stats.percentiles([])[99])


def test_welch_diff_ci_hand_values():
    # a = [1, 3]: mean 2, var 2 ; b = [0, 0, 0]: mean 0, var 0
    # se² = 2/2 + 0 = 1, df = 1² / (1²/1 + 0) = 1 -> t = 12.706 -> [2 − 12.706, 2 + 12.706]
    d, lo, hi = stats.welch_diff_ci([1.0, 3.0], [0.0, 0.0, 0.0])
    assert d == pytest.approx(2.0)
    assert lo == pytest.approx(2.0 - 12.706, abs=1e-3) and hi == pytest.approx(2.0 + 12.706, abs=1e-3)
    assert not stats.significant(lo, hi)
    # clearly separated groups with many values are significant
    d, lo, hi = stats.welch_diff_ci([5.0, 5.1, 4.9, 5.0], [0.0, 0.1, -0.1, 0.0])
    assert stats.significant(lo, hi) and lo > 4.5
    assert math.isnan(stats.welch_diff_ci([1.0], [0.0, 1.0])[1])
