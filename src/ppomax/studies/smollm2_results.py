"""The SmolLM2 study's results: every run's final and best checkpoints evaluated on the held-out
prompts, means over seeds, the pre-registered targets (:mod:`ppomax.studies.smollm2_targets`), the plots,
``summary.json`` and ``report.md``. The driver is :func:`ppomax.studies.smollm2_study.run_smollm2_study`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ppomax.studies.report import Panel

# The best checkpoint's numbers shown beside the final one's (report: "Best checkpoint vs final").
BEST_KEYS = ("gold", "rm_reward", "kl", "win_rate_vs_base", "distinct_2", "template_share")
# eval/* during PPO, on the dev prompts: when the collapse starts (issue #24).
EVAL_PANELS = (
    Panel("eval_gold", ("eval/gold",), ("-",), "Gold (set-level term included), dev prompts", "gold"),
    Panel("eval_rm_reward", ("eval/rm_reward",), ("-",), "RM reward, dev prompts", "RM score"),
    Panel("eval_kl", ("eval/kl",), ("-",), "KL to the base per response, dev prompts", "KL (nats / response)"),
    Panel("eval_distinct_2", ("eval/distinct_2",), ("-",), "distinct-2 across responses", "distinct bigrams / bigrams"),
    Panel("eval_self_similarity", ("eval/self_similarity",), ("-",), "Self-similarity across responses",
          "mean pairwise overlap"),
    Panel("eval_template_share", ("eval/template_share",), ("-",), "Template share (first 4 words)", "share"),
)


def ppo_step(run_dir: Path, checkpoint: Path) -> int:
    """The PPO iteration of a checkpoint (its name counts critic pre-training iterations too)."""
    from ppomax.studies.report import read_metrics

    iteration = int(checkpoint.name.rsplit("-", 1)[-1])
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    return next((int(r["ppo_step"]) for r in rows if r.get("step") == iteration and "ppo_step" in r), iteration)


def evaluate_runs(ev, out: Path, names: Mapping[tuple[str, int], str], gold_peaks: Mapping[str, float],
                  n_dev_prompts: int) -> dict[str, Any]:
    """Evaluate the base and every run's final and best checkpoint (``ev``: a study Evaluator).

    Writes ``eval/base.jsonl`` and, per run, ``eval/<run>.jsonl`` (final) and ``eval/<run>_best.jsonl``.
    ``names``: (method, seed) -> run name under ``runs/``; ``gold_peaks``: run name -> peak of its
    training gold (5-iteration mean). Returns ``methods`` (means over seeds), per-prompt ``gold`` per
    method and seed, and ``dev_base`` (the base on the dev prompts)."""
    from ppomax.checkpoint import list_checkpoints
    from ppomax.ppo.best import best_checkpoint

    base, base_gold = ev.run(None, out / "eval" / "base.jsonl")
    per_seed: dict[str, dict[int, dict]] = {}
    gold: dict[str, dict[int, dict[str, list[float]]]] = {}
    for (method, seed), name in names.items():
        run = out / "runs" / name
        final = list_checkpoints(run)[-1]
        fm, fg = ev.run(final / "policy", out / "eval" / f"{name}.jsonl")
        best = best_checkpoint(run)
        if best is None or best.name == final.name:  # the same weights and seed: the same samples
            best, bm, bg = final, fm, fg
            shutil.copyfile(out / "eval" / f"{name}.jsonl", out / "eval" / f"{name}_best.jsonl")
        else:
            bm, bg = ev.run(best / "policy", out / "eval" / f"{name}_best.jsonl")
        per_seed.setdefault(method, {})[seed] = {
            **fm, "gold_peak": round(gold_peaks[name], 4), "gold_best": bm["gold"], "best_step": ppo_step(run, best),
            "best": {k: bm[k] for k in BEST_KEYS}}
        gold.setdefault(method, {})[seed] = {"final": fg, "best": bg}
    methods = {"base": base, **{m: mean_over_seeds(per_seed[m], gold[m], base_gold) for m in per_seed}}
    return {"methods": methods, "gold": gold, "dev_base": ev.dev_baseline(n_dev_prompts)}


def mean_over_seeds(per_seed: Mapping[int, Mapping[str, Any]], gold: Mapping[int, Mapping[str, list[float]]],
                    base_gold: list[float]) -> dict[str, Any]:
    """One seed: its metrics. Several: the mean of every number, the win rate over all seeds' responses
    (each paired with the base's answer to its prompt) and ``seeds``: each seed's own metrics."""
    from ppomax.evaluate import Baseline

    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    if len(seeds) == 1:
        return dict(first)

    def mean(values: list) -> float:
        return round(sum(values) / len(values), 4)

    out: dict[str, Any] = {k: mean([per_seed[s][k] for s in seeds]) for k, v in first.items()
                           if isinstance(v, int | float) and not isinstance(v, bool) and k != "best_step"}
    vs = Baseline(base_gold * len(seeds), "base").versus([g for s in seeds for g in gold[s]["final"]])
    wr, ci = vs["win_rate_vs_base"], vs["win_rate_ci"]
    out.update(win_rate_vs_base=round(wr, 4), win_rate_ci=[round(x, 4) for x in ci],
               best_step=[per_seed[s]["best_step"] for s in seeds],
               best={k: mean([per_seed[s]["best"][k] for s in seeds]) for k in BEST_KEYS},
               seeds={str(s): per_seed[s] for s in seeds})
    return {k: out[k] for k in [*first, "seeds"]}  # the first seed's column order


def training_curves(runs: Mapping[str, list[dict]], names: Mapping[tuple[str, int], str]) -> dict[str, list[dict]]:
    """Metric rows per method for the plots: the run's own (one seed) or the step-wise seed mean."""
    from ppomax.studies.report import mean_curve

    by_method: dict[str, list[list[dict]]] = {}
    for (method, _), name in names.items():
        by_method.setdefault(method, []).append(runs[name])
    return {m: rows[0] if len(rows) == 1 else mean_curve(rows) for m, rows in by_method.items()}


def write_study_report(out: Path, results: Mapping[str, Any], info: Mapping[str, Any],
                       curves: Mapping[str, list[dict]], samples: Mapping[str, list[dict]], judge) -> dict[str, Any]:
    """Check the targets, plot, write ``summary.json`` and ``report.md`` / ``.html``; return the summary."""
    from ppomax.studies.report import plot_curves, plot_grid, write_report
    from ppomax.studies.smollm2_targets import check_targets, stability_line

    def fmt(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else "–"

    methods, b, seeds = results["methods"], info["budget"], info["seeds"]
    ok, checks, details = check_targets(methods, results["gold"])
    tax_line = stability_line(details["stability_tax"])
    summary: dict[str, Any] = {
        "methods": methods, "targets_met": ok, "targets": checks, **details,
        "judge": {"formula": judge.__doc__.splitlines()[0], "similarity_weight": judge.similarity_weight,
                  "set": "one policy's responses to the held-out prompts at a time (eval/*: to the dev prompts)"},
        "dev_base": results["dev_base"], **info,
    }
    plots = plot_curves(curves, out / "plots", baselines={"gold": methods["base"]["gold"]},
                        smooth=5 if b["ppo_steps"] >= 50 else 1, baseline_label="base")
    dev = results["dev_base"]
    eval_plot = plot_grid(curves, out / "plots" / "eval_overview.png", EVAL_PANELS,
                          f"Evaluations during PPO on {b['n_dev_prompts']} dev prompts (dashed: the base)",
                          baselines={p.name: dev.get(p.keys[0].split("/", 1)[1]) for p in EVAL_PANELS},
                          baseline_label="base")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    one_seed = len(seeds) == 1
    notes = [
        *(f"Target (pre-registered in docs/real_models.md): {c}" for c in checks),
        tax_line + " (a measurement of the paper's claim, not a target)",
        f"Seeds: {', '.join(map(str, seeds))}" + (" — with one seed the seed-to-seed spread is unknown: vanilla's drop "
                                                  "from its peak is judged against sampling noise only (--seeds N "
                                                  "for more)." if one_seed else "; numbers are means over the seeds."),
        f"Gold judge: {judge.__doc__.splitlines()[0]} The similarity is the mean Jaccard overlap of a response's word "
        f"1- and 2-grams with each response to another prompt in the same set: one policy's {b['n_eval_prompts']} "
        f"held-out responses (the table), or its {b['n_dev_prompts']} dev responses (eval/* during PPO). The "
        f"reward model's pairs were labelled by the per-response part only (a labeller sees one prompt's two "
        f"answers): {info['pairs']['pairs']} pairs of SmolLM2's own samples, Bradley-Terry β = {b['pair_beta']}, "
        f"held-out pair accuracy {fmt(info['reward_model']['eval_accuracy'])}.",
        f"Evaluation: {b['n_eval_prompts']} held-out prompts on topics never trained on, one sample each at "
        f"temperature {b['temperature']}; KL is Σ_t log π − log π_base per response; the win rate counts ties as ½ "
        f"(95 % Wilson interval). gold_best: the best checkpoint by eval/gold on the dev prompts during training "
        f"(--metric_for_best_model gold), evaluated on the held-out prompts; gold_peak: the best 5-iteration mean of "
        f"the training batches' gold. Every response: eval/<run>.jsonl and eval/<run>_best.jsonl.",
        "Both methods: the same seed, prompts and budget; LoRA r = 8 (q, k, v, o) on the policy, π_ref = the "
        "policy with its adapters disabled, LoRA on the critic (PPO-max: initialised from the reward model).",
    ]
    report = write_report(out, "ppomax demo: PPO-max vs vanilla PPO on SmolLM2-135M-Instruct", summary,
                          [*plots[:1], eval_plot, *plots[1:]], samples, notes)
    print("[demo smollm2] " + "\n[demo smollm2] ".join([*checks, tax_line]), flush=True)
    secs = info.get("seconds", math.nan)
    print(f"[demo smollm2] {secs:.0f} s; report: {report}", flush=True)
    return summary
