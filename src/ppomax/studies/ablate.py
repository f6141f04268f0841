"""`ppomax ablate`: PPO-max details switched off one at a time (paper Fig. 5), × seeds.

Every variant trains on the demo's cached task assets (same SFT model and reward model) with
the same budget; seeds change PPO's sampling and data order. Each (variant, seed) run is
evaluated against the SFT policy on held-out prompts. With ``--seeds N > 1`` the report shows
mean ± 95 % t-intervals and marks (*) differences from ``ppo_max`` whose Welch 95 %
interval excludes zero. Runs are resumable: a finished run is skipped, an interrupted one
resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ppomax.config import ConfigError, PPOConfig
from ppomax.studies.config import AblateConfig, DemoConfig
from ppomax.studies.demo import METHODS as DEMO_METHOD_OVERRIDES

# Each PPO-max detail (PPO_MAX.md table, "in ppo_max? = yes") switched off in turn, plus vanilla.
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "ppo_max": {},
    "no_kl_penalty": {"kl_coef": 0.0},
    "no_reward_norm_clip": {"reward_normalize": False, "reward_clip": None},
    "no_value_clip": {"cliprange_value": None},
    "no_critic_pretrain": {"critic_pretrain_steps": 0},
    "critic_from_sft": {"critic_init": "sft"},
    "no_grad_clip": {"max_grad_norm": None},
    "no_adv_whitening": {"whiten_advantages": False},
    "vanilla": {"preset": "vanilla"},
}

# The critic-free estimators (issue #14) as variants: by name in --variants (e.g. "ppo_max;grpo;rloo").
ESTIMATOR_VARIANTS: dict[str, dict[str, Any]] = {
    name: dict(overrides) for name, overrides in DEMO_METHOD_OVERRIDES.items() if name not in DEFAULT_VARIANTS
}
KNOWN_VARIANTS = {**DEFAULT_VARIANTS, **ESTIMATOR_VARIANTS}

METRICS = ("gold_final", "gold_peak", "kl", "perplexity", "length", "win_rate", "explained_variance",
           "ev_early", "value_loss_early", "gold_early")
# Advantage quality early in training (paper Sec. 5.4, the critic pre-training study): the critic's
# explained variance and value loss over the first EARLY PPO iterations, next to the gold they lead to.
EARLY = 30


def parse_variants(spec: str | None) -> dict[str, dict[str, Any]]:
    """'name:field=value,field=value;name2:...' or a YAML file {name: {field: value}}.

    A built-in name with a body adds the body to the built-in overrides ("vanilla:seeds=5"). The
    key ``seeds`` (not a PPOConfig field) sets that variant's number of seeds instead of --seeds.
    """
    from ppomax.config import coerce

    if spec is None:
        return dict(DEFAULT_VARIANTS)
    if spec.endswith((".yaml", ".yml")) and Path(spec).exists():
        from ppomax.config import load_yaml

        raw = load_yaml(spec)
    else:
        raw = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            name, _, body = part.partition(":")
            if name in KNOWN_VARIANTS and not body:  # a built-in variant by name
                raw[name] = KNOWN_VARIANTS[name]
                continue
            if not name or (not body and name not in KNOWN_VARIANTS):
                raise ConfigError(f"AblateConfig.variants: cannot parse {part!r} (expected name:field=value,... or a "
                                  f"built-in name: {', '.join(KNOWN_VARIANTS)})")
            kv = dict(KNOWN_VARIANTS.get(name.strip(), {}))
            for item in filter(None, (x.strip() for x in body.split(","))):
                k, eq, v = item.partition("=")
                if not eq:
                    raise ConfigError(f"AblateConfig.variants: {item!r} in {name!r} is not field=value")
                kv[k.strip()] = v.strip()
            raw[name.strip()] = kv
    out = {}
    for name, kv in raw.items():
        kv = dict(kv or {})
        for k, v in kv.items():
            if k == "seeds":
                n = None if isinstance(v, bool) else str(v).strip()
                if not (n and n.isdigit() and int(n) >= 1):  # no assert: it would vanish under python -O
                    raise ConfigError(f"AblateConfig.variants: {name!r} sets seeds={v!r}; expected an integer ≥ 1")
                kv[k] = int(n)
                continue
            if k not in PPOConfig.__dataclass_fields__:
                raise ConfigError(f"AblateConfig.variants: {name!r} sets unknown PPOConfig field {k!r}")
            kv[k] = coerce(PPOConfig, k, v)
        out[name] = kv
    return out


def scaled_budget(b, factor: float):
    """--budget: the demo budget ``b`` with its PPO iterations and critic pre-training scaled by ``factor``."""
    import dataclasses

    if factor == 1.0:
        return b
    return dataclasses.replace(b, ppo_steps=max(1, round(b.ppo_steps * factor)),
                               critic_pretrain_steps=max(1, round(b.critic_pretrain_steps * factor)))


def run_ablation(cfg: AblateConfig) -> dict[str, Any]:
    import torch

    from ppomax import models as M
    from ppomax.stats import mean_ci, significant, welch_diff_ci
    from ppomax.studies.demo import EvalContext, budget_for, build_assets, ppo_config
    from ppomax.studies.report import mean_curve, write_ablation_report
    from ppomax.studies.runs import final_policy, gold_peak, run_methods
    from ppomax.studies.tasks import reviews
    from ppomax.training import progress

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    M.quiet_transformers()
    variants = parse_variants(cfg.variants)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    demo_cfg = DemoConfig(output_dir=str(out), quick=cfg.quick, seed=cfg.seed, ppo_steps=cfg.ppo_steps,
                          cache_dir=cfg.cache_dir, disable_tqdm=cfg.disable_tqdm)
    b = scaled_budget(budget_for(demo_cfg), cfg.budget)
    assets = build_assets(demo_cfg, b)
    prompts = reviews.prompts(4096, seed=cfg.seed + 10)
    n_seeds = {v: variants[v].pop("seeds", cfg.seeds) for v in variants}
    ctx = None
    results: dict[str, list[dict]] = {}
    curves: dict[str, list[list[dict]]] = {}
    jobs = {(v, s): out / "runs" / v / f"seed{s}" for v in variants for s in range(cfg.seed, cfg.seed + n_seeds[v])}
    cfgs = {}
    for (name, seed), run_dir in jobs.items():
        overrides = dict(variants[name])
        preset = overrides.pop("preset", "ppo_max")
        cfgs[(name, seed)] = ppo_config(preset, run_dir, assets["paths"], b, seed, cfg.disable_tqdm, **overrides)
    print(f"[ablate] {len(variants)} variants, {len(jobs)} runs, {b.ppo_steps} PPO iterations each", flush=True)
    all_rows = run_methods(cfgs, prompts, parallel=cfg.parallel, eta=not cfg.disable_tqdm)
    for (name, seed), run_dir in progress(list(jobs.items()), desc="evaluate", disable=cfg.disable_tqdm):
        rows = all_rows[(name, seed)]
        res_path = run_dir / "eval.json"
        if res_path.exists():
            res = json.loads(res_path.read_text())
        else:
            ctx = ctx or EvalContext(assets["paths"], b, cfg.seed)
            m = ctx.evaluate(final_policy(run_dir))
            res = {"gold_final": m["gold"], "gold_peak": gold_peak(rows), "kl": m["kl"], "perplexity": m["perplexity"],
                   "length": m["length"], "win_rate": m["win_rate_vs_sft"], "win_rate_ci": m["win_rate_ci"]}
            res_path.write_text(json.dumps(res))
        results.setdefault(name, []).append({**res, **curve_stats(rows)})
        curves.setdefault(name, []).append(rows)

    base = "ppo_max" if "ppo_max" in results else next(iter(results))
    table = []
    for name, runs in results.items():
        row: dict[str, Any] = {"variant": name, "n_seeds": len(runs), "significant": {}}
        for k in METRICS:
            vals = [r[k] for r in runs if not math.isnan(r[k])]
            row[k] = mean_ci(vals) if vals else (float("nan"),) * 3
            if k == "win_rate" and len(runs) == 1:  # one seed: the Wilson interval over prompts
                row[k] = (runs[0]["win_rate"], *runs[0]["win_rate_ci"])
            if name != base and len(runs) > 1:
                _, lo, hi = welch_diff_ci(vals, [r[k] for r in results[base]])
                row["significant"][k] = significant(lo, hi)
        table.append(row)
    mean_curves = {n: mean_curve(c) for n, c in curves.items()}
    report = write_ablation_report(out, table, mean_curves, baseline=base, smooth=5 if b.ppo_steps >= 50 else 1,
                                   extra=advantage_quality(mean_curves, out / "plots"))
    (out / "ablation.json").write_text(json.dumps({"rows": table, "runs": results}, indent=2, default=list))
    print(f"ablation report: {report}")
    return {"rows": table, "report": str(report)}


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def curve_stats(rows: list[dict]) -> dict[str, float]:
    """From a run's training rows: the critic's explained variance over its last 10 PPO iterations,
    and explained variance, value loss and training gold over the first EARLY PPO iterations."""
    ppo = [r for r in rows if r.get("phase") == "ppo"]
    early = [r for r in ppo if r.get("ppo_step", 0) <= EARLY]
    get = lambda rs, k: [float(r[k]) for r in rs if k in r]  # noqa: E731
    return {"explained_variance": _mean(get(ppo[-10:], "critic/explained_variance")),
            "ev_early": _mean(get(early, "critic/explained_variance")),
            "value_loss_early": _mean(get(early, "critic/value_loss")), "gold_early": _mean(get(early, "gold/mean"))}


def advantage_quality(curves: dict[str, list[dict]], plot_dir: Path) -> list:
    """Report blocks: explained variance, value loss and gold over the first EARLY PPO iterations
    (``advantage_quality.png``), for the variants with a critic; none when no variant has one."""
    from ppomax.studies.report import Panel, plot_grid

    early = {n: [r for r in rows if r.get("ppo_step", 0) <= EARLY] for n, rows in curves.items()
             if any("critic/explained_variance" in r for r in rows)}
    if not early:
        return []
    panels = (Panel("ev", ("critic/explained_variance",), ("-",), "Critic explained variance", "explained variance"),
              Panel("value_loss", ("critic/value_loss",), ("-",), "Critic value loss", "value loss"),
              Panel("gold", ("gold/mean",), ("-",), "Gold score (judge)", "gold score"))
    plot_dir.mkdir(parents=True, exist_ok=True)
    png = plot_grid(early, plot_dir / "advantage_quality.png", panels,
                    f"Advantage quality over the first {EARLY} PPO iterations (mean over seeds)")
    return [("h", 2, f"Advantage quality, first {EARLY} PPO iterations"),
            ("img", f"plots/{png.name}", "critic explained variance, value loss and gold, first iterations"),
            ("p", "Explained variance 1 − Var(R − V)/Var(R) of the critic on each rollout; ≤ 0 means its values do "
                  "not track the returns and the GAE advantages are mostly noise (paper Sec. 5.4).")]
