"""Continue the SmolLM2 study's vanilla PPO run past its budget and evaluate it (docs/real_models.md).

    python examples/smollm2_longer_vanilla.py --study runs/real/full/smollm2 --steps 128 --out runs/real/vanilla128

Copies ``<study>/runs/vanilla`` to ``--out`` (the study's own run is left as it is), resumes it
from its newest checkpoint up to ``--steps`` PPO iterations (the PPO learning rate is constant, so
this equals a run of ``--steps`` iterations), then evaluates the base model and the result on the
study's held-out prompts and writes ``<out>/eval.json``. Rerunning it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="the study's directory (<output_dir>/smollm2)")
    ap.add_argument("--steps", type=int, default=128, help="PPO iterations in all")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0, help="the study's --seed")
    args = ap.parse_args()

    from ppomax import models as M
    from ppomax.checkpoint import list_checkpoints
    from ppomax.ppo.trainer import PPOTrainer
    from ppomax.studies.smollm2_study import FULL, Evaluator, GoldJudge, ppo_config, prompts
    from ppomax.tools.smollm2 import fetch_smollm2

    torch.set_num_threads(1)  # as the study's PPO runs
    M.quiet_transformers()
    if not args.out.exists():
        shutil.copytree(args.study / "runs" / "vanilla", args.out)
        (args.out / "DONE").unlink(missing_ok=True)
    model_dir, rm_dir, judge = fetch_smollm2(), args.study / "assets" / "rm", GoldJudge()
    dev = args.study / "assets" / "dev_prompts.jsonl"  # the study's evaluations during PPO (best/), if it had them
    cfg = ppo_config("vanilla", args.out, model_dir, rm_dir, dataclasses.replace(FULL, ppo_steps=args.steps),
                     args.seed, True, eval_dataset=dev if dev.exists() else None)
    t = time.perf_counter()
    PPOTrainer(dataclasses.replace(cfg, resume_from="latest"), prompts=[{"prompt": c} for c in prompts("train")],
               gold_fn=judge).train()
    print(f"trained to iteration {args.steps} in {time.perf_counter() - t:.0f} s", flush=True)
    ev = Evaluator(model_dir, rm_dir, FULL, args.seed, judge)
    res = {"base": ev.evaluate(None), f"vanilla_{args.steps}": ev.evaluate(list_checkpoints(args.out)[-1] / "policy")}
    (args.out / "eval.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
