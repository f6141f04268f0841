"""Seconds per PPO iteration and memory of each advantage estimator on the demo's task and model.

Every method trains with the demo's settings (ppomax.studies.demo.method_config: the same responses per
iteration, mini-batches and epochs; grpo / rloo with k = 4 samples of 16 prompts instead of 64
prompts) from the demo's cached SFT model and reward model. Each run is its own subprocess with
one thread, so its peak RSS (ru_maxrss) is its own; runs alternate over the methods, round after
round, so drift in machine load hits every method alike. Reported: the median s/iter over the
measured PPO iterations of all rounds (critic pre-training excluded: it is not a PPO iteration),
the ratio to ppo_max in the same run, peak RSS, and the trained state (weights + gradients +
AdamW moments of the policy and, where there is one, the critic), which is what a critic-free
estimator saves.

    python benchmarks/estimator_cost.py [--quick] [--iters 8] [--rounds 2] [--json out.json]

The assets come from `ppomax demo`'s cache (runs/demo/assets, built if missing: ~3 minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("ppo_max", "vanilla", "grpo", "dr_grpo", "rloo", "reinforce_pp")


def child(method: str, assets: str, iters: int, quick: bool, out: str) -> None:
    import resource

    import torch

    from ppomax.ppo.trainer import PPOTrainer
    from ppomax.studies.config import DemoConfig
    from ppomax.studies.demo import budget_for, method_config
    from ppomax.studies.tasks import reviews

    torch.set_num_threads(1)
    b = budget_for(DemoConfig(quick=quick))
    paths = json.loads(assets)
    cfg = method_config(method, Path(out), paths, b, seed=0, disable_tqdm=True)
    import dataclasses

    cfg = dataclasses.replace(cfg, max_steps=iters + 1, critic_pretrain_steps=min(cfg.critic_pretrain_steps, 1),
                              report_to="none", save_steps=10**6, eval_steps=None, metric_for_best_model=None,
                              eval_dataset=None)
    tr = PPOTrainer(cfg, prompts=reviews.prompts(1024, seed=10))
    for _ in range(cfg.critic_pretrain_steps):  # not timed: critic pre-training is not a PPO iteration
        tr.iteration += 1
        tr.step(train_policy=False)
    times = []
    for _ in range(iters + 1):  # the first PPO iteration warms up
        tr.iteration += 1
        times.append(tr.step()["time/iteration"])
    state = 0
    for model in (tr.policy, tr.critic):
        if model is not None:  # weights + gradients + two AdamW moments, fp32
            state += 4 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"method": method, "s_per_iter": times[1:], "peak_rss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "trained_state_mb": state / 2**20, "critic": tr.critic is not None}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the demo's quick assets and budget")
    ap.add_argument("--iters", type=int, default=8, help="measured PPO iterations per run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all methods (alternating)")
    ap.add_argument("--assets", default=None, help="demo asset cache (default: runs/demo/assets)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        method, assets, iters, out = args._child
        child(method, assets, int(iters), args.quick, out)
        return

    from ppomax.studies.config import DemoConfig
    from ppomax.studies.demo import budget_for, build_assets

    demo = DemoConfig(quick=args.quick, cache_dir=args.assets, disable_tqdm=True)
    paths = build_assets(demo, budget_for(demo))["paths"]
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--_child", method, json.dumps(paths), str(args.iters), tmp]
                cmd += ["--quick"] if args.quick else []
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[method].append(json.loads(line))
            print(f"round {r + 1}: {method} {statistics.median(results[method][-1]['s_per_iter']):.3f} s/iter",
                  flush=True)
    base = statistics.median(t for run in results["ppo_max"] for t in run["s_per_iter"])
    rows = []
    print("\nmethod         s/iter   vs ppo_max   peak RSS MB   trained state MB   critic")
    for method, runs in results.items():
        s = statistics.median(t for run in runs for t in run["s_per_iter"])
        rss = max(run["peak_rss_mb"] for run in runs)
        row = {"method": method, "s_per_iter": s, "ratio_to_ppo_max": s / base, "peak_rss_mb": rss,
               "trained_state_mb": runs[0]["trained_state_mb"], "critic": runs[0]["critic"]}
        rows.append(row)
        print(f"{method:<13} {s:7.3f}   {s / base:10.2f}   {rss:11.0f}   {row['trained_state_mb']:16.2f}   "
              f"{'yes' if row['critic'] else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
