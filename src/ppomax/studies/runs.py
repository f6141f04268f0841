"""What the studies share: cached stages, training the methods side by side, and reading a run back.

Used by the demo (:mod:`ppomax.studies.demo`), the ablation (:mod:`ppomax.studies.ablate`) and the
SmolLM2 study (:mod:`ppomax.studies.smollm2_study`); it uses the library like any user would."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ppomax.config import PPOConfig

DONE_MARKER = "ppomax_demo_done.json"  # the name of the first studies' marker: caches made by them stay valid


def is_done(path: Path, key: dict) -> bool:
    """Whether the stage in ``path`` finished with the settings ``key`` (its marker, written last)."""
    marker = path / DONE_MARKER
    return marker.exists() and json.loads(marker.read_text()) == key


def mark_done(path: Path, key: dict) -> None:
    """Record that the stage in ``path`` finished with the settings ``key``: written last."""
    (path / DONE_MARKER).write_text(json.dumps(key))


# ---------------------------------------------------------------------------------------------
# PPO per method
# ---------------------------------------------------------------------------------------------


def run_method(cfg: PPOConfig, prompts: list, gold_fn=None) -> list[dict]:
    """Train one method (resuming from its newest checkpoint if a previous demo was interrupted).
    ``gold_fn``: the judge scoring the training rollouts (default: the reviews task's)."""
    from ppomax.checkpoint import list_checkpoints
    from ppomax.ppo.trainer import PPOTrainer
    from ppomax.studies.report import read_metrics
    from ppomax.studies.tasks import reviews

    out = Path(cfg.output_dir)
    if (out / "DONE").exists():
        return read_metrics(out / "metrics.jsonl")
    if list_checkpoints(out):
        cfg = dataclasses.replace(cfg, resume_from="latest")
    trainer = PPOTrainer(cfg, prompts=prompts, gold_fn=gold_fn or reviews.gold_scores)
    rows = trainer.train()
    (out / "DONE").write_text("ok")
    return read_metrics(out / "metrics.jsonl") if cfg.resume_from else rows


def _run_method_single_thread(cfg: PPOConfig, prompts: list, position: int, gold_fn=None) -> list[dict]:
    # One thread per method: the tiny model gains nothing from more, and a fixed thread count
    # makes the run bit-for-bit reproducible on one machine (float reductions change with it;
    # another CPU type's kernels may still round differently).
    torch.set_num_threads(1)
    from ppomax.models import quiet_transformers

    quiet_transformers()
    os.environ["PPOMAX_TQDM_POSITION"] = str(position)
    return run_method(cfg, prompts, gold_fn)


def run_methods(cfgs: dict, prompts: list, parallel: bool, eta: bool = False, gold_fn=None) -> dict[str, list[dict]]:
    """Train every method, each single-threaded; side by side in worker processes if ``parallel``.
    ``eta``: a progress bar over the runs with the time left (ppomax ablate's many runs).
    ``gold_fn``: the judge of the training rollouts (default: the reviews task's; picklable)."""
    from ppomax.training import progress

    # below the workers' own bars (positions 0 and 1)
    bar = progress(total=len(cfgs), desc="runs", disable=not eta or len(cfgs) < 2, position=min(len(cfgs), 2))
    try:
        if not parallel or len(cfgs) == 1 or (os.cpu_count() or 1) < 2:
            threads = torch.get_num_threads()
            try:
                out = {}
                for m, c in cfgs.items():
                    out[m] = _run_method_single_thread(c, prompts, 0, gold_fn)
                    bar.update(1)
                return out
            finally:
                torch.set_num_threads(threads)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from ppomax.training import exit_with_parent

        workers = min(len(cfgs), os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {m: pool.submit(_run_method_single_thread, c, prompts, i % workers, gold_fn)
                       for i, (m, c) in enumerate(cfgs.items())}
            for f in futures.values():
                f.add_done_callback(lambda _: bar.update(1))
            return {m: f.result() for m, f in futures.items()}
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Reading a run back
# ---------------------------------------------------------------------------------------------


def gold_peak(rows: list[dict], window: int = 5) -> float:
    """Best moving-average (window 5) gold during PPO: robust to one lucky batch."""
    g = [r["gold/mean"] for r in rows if r.get("phase") == "ppo" and "gold/mean" in r]
    if not g:
        return float("nan")
    w = min(window, len(g))
    return max(sum(g[i : i + w]) / w for i in range(len(g) - w + 1))


def best_policy(run_dir: Path) -> Path | None:
    """The policy of the checkpoint ``best/best.json`` names (best/ may keep an older one too), or None."""
    from ppomax.ppo.best import best_checkpoint

    ckpt = best_checkpoint(run_dir)
    return ckpt / "policy" if ckpt is not None else None


def final_policy(run_dir: Path) -> Path:
    """The policy of the run's newest checkpoint."""
    from ppomax.checkpoint import list_checkpoints

    return list_checkpoints(run_dir)[-1] / "policy"


def stage_samples(path: Path) -> list[dict]:
    """Sample generations at the start, middle and end of PPO from samples.jsonl."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") == "ppo"]
    if not rows:
        return []
    steps = sorted({r["ppo_step"] for r in rows})
    picks = {"start": steps[0], "middle": steps[len(steps) // 2], "end": steps[-1]}
    return [{**r, "stage": stage, "step": r["ppo_step"]} for stage, st in picks.items() for r in rows if r["ppo_step"] == st][:12]
