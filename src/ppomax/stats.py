"""Small statistics for evaluation and ablation reports: win rates, intervals, bootstrap.

Pure numpy / standard library, no scipy (it is not a dependency). Every function is checked
against hand-computed values in ``tests/test_stats.py``.

- :func:`win_rate` + :func:`wilson_interval`: the paper's "win rate against SFT" (Sec. 5.2)
  with a binomial interval; ties count half, so the success count may be fractional.
- :func:`mean_ci`: Student-t interval of a mean over seeds (few seeds, so t, not normal).
- :func:`bootstrap_diff_ci` + :func:`significant`: is an ablation variant different from the
  baseline? Percentile bootstrap of the difference of means of two independent samples.
- :func:`percentiles`: the reward-tail summary (p50 / p90 / p99) logged during PPO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

# Two-sided Student-t critical values t_{1-α/2, df} for df = 1..30, to 3 decimals (standard
# tables; checked against numerical integration of the t density to < 4e-5 in the CDF).
_T_TABLE: dict[float, tuple[float, ...]] = {
    0.90: (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812,
           1.796, 1.782, 1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725,
           1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697),
    0.95: (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
           2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
           2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
    0.99: (63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169,
           3.106, 3.055, 3.012, 2.977, 2.947, 2.921, 2.898, 2.878, 2.861, 2.845,
           2.831, 2.819, 2.807, 2.797, 2.787, 2.779, 2.771, 2.763, 2.756, 2.750),
}  # fmt: skip


def _z(confidence: float) -> float:
    """Two-sided normal critical value, e.g. 1.95996 for ``confidence=0.95``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t critical value for ``df`` degrees of freedom.

    df <= 30 reads the table (confidence 0.90, 0.95 or 0.99). Beyond 30 the Cornish-Fisher
    expansion t ≈ z + (z³+z)/(4df) + (5z⁵+16z³+3z)/(96df²) is used: it is within 2e-4 of the
    exact value at df=30 and tends to z, so it is strictly better than the plain 1.96 cut-off.
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= 30:
        table = _T_TABLE.get(round(confidence, 6))
        if table is None:
            raise ValueError(f"confidence must be one of {sorted(_T_TABLE)} when df <= 30, got {confidence}")
        return table[df - 1]
    z = _z(confidence)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Share of paired items where ``a > b``; ties count half. NaN if there are no pairs.

    ``scores_a[i]`` and ``scores_b[i]`` are the (gold) scores of two systems on the same prompt.
    """
    a = np.asarray(scores_a, dtype=float)
    b = np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b must be paired (same length), got {a.shape} and {b.shape}")
    if a.size == 0:
        return math.nan
    return float(((a > b).sum() + 0.5 * (a == b).sum()) / a.size)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    Unlike the normal (Wald) interval it stays inside [0, 1] and is sensible at p = 0 or 1,
    which matters for small evaluation sets. ``successes`` may be fractional (ties = ½).
    Returns (nan, nan) for n = 0.
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp float round-off at the ends (p = 0 or 1 gives lo/hi exactly 0/1 in exact maths)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval ``mean ± t·s/√n`` (s: sample std, ddof=1).

    n = 1 gives ``(x, nan, nan)`` (no spread estimate); n = 0 gives all NaN.
    """
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return (mean, math.nan, math.nan)
    half = t_critical(n - 1, confidence) * float(x.std(ddof=1)) / math.sqrt(n)
    return (mean, mean - half, mean + half)


def bootstrap_diff_ci(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Difference of means ``mean(a) - mean(b)`` with a percentile-bootstrap interval.

    ``a`` and ``b`` are independent samples (e.g. final gold score per seed of a variant and of
    the baseline): each is resampled with replacement separately. Needs >= 2 values on each
    side, else the interval is (nan, nan): one seed says nothing about seed-to-seed spread.
    Deterministic for a given ``seed``.
    """
    xa = np.asarray(a, dtype=float)
    xb = np.asarray(b, dtype=float)
    if xa.size == 0 or xb.size == 0:
        return (math.nan, math.nan, math.nan)
    diff = float(xa.mean() - xb.mean())
    if xa.size < 2 or xb.size < 2:
        return (diff, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    # (n_boot, n) resampled indices; vectorised instead of a Python loop over n_boot
    boot_a = xa[rng.integers(0, xa.size, size=(n_boot, xa.size))].mean(axis=1)
    boot_b = xb[rng.integers(0, xb.size, size=(n_boot, xb.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot_a - boot_b, [alpha, 1.0 - alpha])
    return (diff, float(lo), float(hi))


def welch_diff_ci(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean(a) − mean(b), lo, hi): Welch's t-interval for a difference of means.

    Used to mark ablation differences: with a handful of seeds a bootstrap has too few distinct
    resamples and gives intervals that are far too narrow; Welch's interval (unequal variances,
    Welch–Satterthwaite degrees of freedom, rounded down) stays honest at n = 2.
    Fewer than 2 values on a side -> (diff, nan, nan).
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean()) if x.size and y.size else float("nan")
    if x.size < 2 or y.size < 2:
        return diff, float("nan"), float("nan")
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se2 = va + vb
    if se2 == 0:
        return diff, diff, diff
    df = se2**2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    half = t_critical(max(1, int(df)), confidence) * math.sqrt(se2)
    return diff, diff - half, diff + half


def significant(lo: float, hi: float) -> bool:
    """True if the interval [lo, hi] excludes 0. NaN bounds (too few samples) are never significant."""
    if math.isnan(lo) or math.isnan(hi):
        return False
    return lo > 0.0 or hi < 0.0


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[float, float]:
    """``{q: q-th percentile}`` with linear interpolation (numpy's default); NaN when empty."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {q: math.nan for q in qs}
    return {q: float(v) for q, v in zip(qs, np.percentile(x, list(qs)))}
