"""The SmolLM2 study's targets (issue #24), checked on its evaluation; stated in docs/real_models.md
before the full run ("pre-registered"): change them only with a new pre-registration.

Every number is on the 128 held-out prompts ("the report's prompts"), one policy's responses at a
time. "Peak" is a run's best checkpoint, picked during training by ``eval/gold`` on the separate dev
prompts (``--metric_for_best_model gold``) and then evaluated on the report's prompts, so the
prompts that pick it never grade it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

KL_BOUND = 10.0  # PPO-max's KL to the base, nats per response
KEEP_DISTINCT = 0.8  # PPO-max keeps distinct-2 ≥ 0.8 × the base's
COLLAPSE_DISTINCT = 0.5  # vanilla's distinct-2 ≤ 0.5 × the base's
KL_RATIO = 3.0  # vanilla's KL ≥ 3 × PPO-max's

PerSeedGold = Mapping[int, Mapping[str, Sequence[float]]]  # seed -> {"best": per-prompt gold, "final": ...}


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x)


def gold_drop(per_seed: PerSeedGold) -> dict[str, Any]:
    """Vanilla's drop from its own peak, judged against its seed-to-seed spread.

    drop = mean over seeds of (mean gold of the best checkpoint − mean gold of the final one).
    - ≥ 2 seeds: spread = max − min over seeds of the final mean gold; holds if drop > spread.
    - 1 seed: the spread is unknown. The drop is judged against sampling noise instead: it holds if
      the 95 % Student-t interval of the per-prompt drops (best_i − final_i, paired by prompt) lies
      above 0. This misses training noise, so it is weaker evidence than ≥ 2 seeds.
    A best checkpoint that is the final one has drop 0: the target fails.
    """
    from ppomax.stats import mean_ci

    seeds = sorted(per_seed)
    peaks = [_mean(per_seed[s]["best"]) for s in seeds]
    finals = [_mean(per_seed[s]["final"]) for s in seeds]
    drop = _mean([p - f for p, f in zip(peaks, finals)])
    out: dict[str, Any] = {"seeds": seeds, "peak": _mean(peaks), "final": _mean(finals), "drop": drop}
    if len(seeds) >= 2:
        out["spread"] = max(finals) - min(finals)
        out["holds"] = drop > out["spread"]
        out["rule"] = f"{len(seeds)} seeds: drop > seed-to-seed spread (max − min of the final gold) {out['spread']:.3f}"
    else:
        d = [b - f for b, f in zip(per_seed[seeds[0]]["best"], per_seed[seeds[0]]["final"])]
        _, lo, hi = mean_ci(d)
        out.update(spread=None, ci=[lo, hi], holds=bool(lo > 0))  # NaN (one prompt) compares False
        out["rule"] = (f"one seed: the seed-to-seed spread is unknown, so the drop is judged against sampling "
                       f"noise: 95 % interval of the per-prompt drop [{lo:.3f}, {hi:.3f}] above 0")
    return out


def stability_tax(vanilla: PerSeedGold, ppo_max: PerSeedGold) -> dict[str, Any]:
    """Vanilla's best gold − PPO-max's best gold (the paper: stability without giving up quality).

    The interval is the 95 % Student-t interval of the per-prompt differences, paired by prompt and
    seed. The paper's claim holds here unless the interval lies above 0."""
    from ppomax.stats import mean_ci

    seeds = sorted(set(vanilla) & set(ppo_max))
    d = [v - p for s in seeds for v, p in zip(vanilla[s]["best"], ppo_max[s]["best"])]
    value, lo, hi = mean_ci(d)
    return {"value": value, "ci": [lo, hi], "claim_holds": not lo > 0}


def check_targets(methods: Mapping[str, Mapping[str, Any]], gold: Mapping[str, PerSeedGold]
                  ) -> tuple[bool, list[str], dict[str, Any]]:
    """(all targets met, one "✔ …" / "✘ …" line per target, details: the drop and the stability tax).

    ``methods``: base / ppo_max / vanilla metrics (means over seeds), ``gold``: per method, seed ->
    per-prompt gold of the best and the final checkpoint."""
    base, pm, va = methods["base"], methods["ppo_max"], methods["vanilla"]
    drop = gold_drop(gold["vanilla"])
    checks = [
        (f"PPO-max's gold is above the base's ({pm['gold']:.3f} vs {base['gold']:.3f})", pm["gold"] > base["gold"]),
        (f"PPO-max's win rate vs the base has its 95 % interval above 0.5 ({pm['win_rate_ci'][0]:.3f}, "
         f"{pm['win_rate_ci'][1]:.3f})", pm["win_rate_ci"][0] > 0.5),
        (f"PPO-max's KL stays bounded (≤ {KL_BOUND:g} nats per response): {pm['kl']:.2f}", pm["kl"] <= KL_BOUND),
        (f"PPO-max keeps its diversity: distinct-2 ≥ {KEEP_DISTINCT:g}× the base's ({pm['distinct_2']:.3f} vs "
         f"{base['distinct_2']:.3f})", pm["distinct_2"] >= KEEP_DISTINCT * base["distinct_2"]),
        (f"vanilla's RM reward rose above the base's ({va['rm_reward']:.2f} vs {base['rm_reward']:.2f})",
         va["rm_reward"] > base["rm_reward"]),
        (f"vanilla's gold ends below its own peak by more than its seed-to-seed spread (best {drop['peak']:.3f} → "
         f"final {drop['final']:.3f}, drop {drop['drop']:.3f}; {drop['rule']})", drop["holds"]),
        (f"vanilla collapses: distinct-2 ≤ {COLLAPSE_DISTINCT:g}× the base's ({va['distinct_2']:.3f} vs "
         f"{base['distinct_2']:.3f})", va["distinct_2"] <= COLLAPSE_DISTINCT * base["distinct_2"]),
        (f"vanilla's KL is at least {KL_RATIO:g}× PPO-max's ({va['kl']:.2f} vs {pm['kl']:.2f})",
         va["kl"] >= KL_RATIO * max(pm["kl"], 1e-6)),
    ]
    tax = stability_tax(gold["vanilla"], gold["ppo_max"])
    lines = [f"{'✔' if ok else '✘'} {text}" for text, ok in checks]
    return all(ok for _, ok in checks), lines, {"vanilla_gold_drop": drop, "stability_tax": tax}


def stability_line(tax: Mapping[str, Any]) -> str:
    """The report's line on the paper's claim (a measurement, not one of the targets)."""
    lo, hi = tax["ci"]
    verdict = ("no measurable quality given up for stability" if tax["claim_holds"]
               else "PPO-max's stability cost quality here")
    fmt = (lambda x: f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else "–")  # noqa: E731
    return (f"{'✔' if tax['claim_holds'] else '✘'} stability tax (vanilla's best gold − PPO-max's best gold): "
            f"{fmt(tax['value'])} [95 % interval {fmt(lo)}, {fmt(hi)}]: {verdict}")
