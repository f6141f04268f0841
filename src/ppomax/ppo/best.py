"""The best checkpoint (``--metric_for_best_model``): which eval metrics may name it and in which
direction, the tracker of the best value so far, and ``best/`` on disk.

With ``--metric_for_best_model`` (names as in transformers' TrainingArguments; ``gold`` and
``eval/gold`` both work), the checkpoint with the best value so far is kept in
``<output_dir>/best/checkpoint-N``, and ``best/best.json`` names it. It lives apart from the periodic
checkpoints: their rotation and the collapse guard's rollback target never delete it, and it
never deletes them. ``--load_best_model_at_end`` loads the checkpoint ``best.json`` names.

The tracker (:class:`BestTracker`, saved in every checkpoint's state), ``best/`` and the run's branch
agree at every moment (docs/reliability.md "The best checkpoint"):

- the eval values are averaged over ranks before the decision, so every rank decides alike and
  ``save_best``'s collectives run on all ranks or none; a NaN value never improves;
- the tracker takes a value only for weights that stay: not in an iteration that the collapse guard
  rolls back or stops, and before that iteration's periodic checkpoint, which thus records it;
- ``best.json`` is written atomically after its checkpoint is complete; an older best checkpoint
  that a periodic checkpoint on disk still records is kept (a resume from there needs it);
- on every start (:func:`reconcile_best`) ``best/`` is brought in line with the loaded tracker:
  checkpoints from an abandoned future (step > the resumed iteration) are removed, a best that a
  crash kept from being written is restored from the periodic checkpoint of its step.

Writing ``best/`` (``save_best``) and the evaluations that feed the tracker are in
:mod:`ppomax.ppo.evaluation`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ppomax import checkpoint as ckpt_lib
from ppomax import distributed as dist_lib

logger = logging.getLogger("ppomax")

EVAL_METRICS = ("rm_reward", "gold", "kl", "length", "truncated", "perplexity")
LOWER_IS_BETTER = ("kl", "truncated")
# No safe default direction (docs/options.md): on the policy's own samples a falling perplexity and a
# growing length are collapse signs (docs/metrics.md), and the other direction favours an untrained or
# degenerate policy. PPOConfig asks for --greater_is_better with these.
NEEDS_DIRECTION = ("length", "perplexity")


def metric_key(name: str) -> str:
    """'gold', 'eval/gold' or 'eval_gold' -> 'gold'."""
    for prefix in ("eval/", "eval_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def greater_is_better(metric: str, setting: bool | None) -> bool:
    """The setting, or by default: higher is better except for kl and truncated (length and perplexity
    have no default: :data:`NEEDS_DIRECTION`)."""
    if setting is not None:
        return setting
    if metric_key(metric) in NEEDS_DIRECTION:
        raise ValueError(f"metric_for_best_model = {metric!r} needs greater_is_better set explicitly")
    return metric_key(metric) not in LOWER_IS_BETTER


def check_best_model_settings(cfg) -> None:
    """PPOConfig's checks of ``metric_for_best_model`` (a ConfigError naming the field, before any model loads)."""
    from ppomax.fields import check

    n, m, key = type(cfg).__name__, cfg.metric_for_best_model, metric_key(cfg.metric_for_best_model)
    check(key in EVAL_METRICS, f"{n}.metric_for_best_model = {m!r} is not an eval metric: allowed "
          f"{', '.join(EVAL_METRICS)} (optionally as eval/<name>)")
    check(cfg.greater_is_better is not None or key not in NEEDS_DIRECTION,
          f"{n}.metric_for_best_model = {m!r} needs an explicit --greater_is_better true|false: on the policy's own "
          f"samples a falling perplexity and a growing length are collapse signs (docs/metrics.md), and the other "
          f"direction favours an untrained or degenerate policy, so there is no safe default (docs/options.md)")
    check(cfg.eval_steps is not None, f"{n}.metric_for_best_model needs --eval_steps N (evaluations to compare)")


class BestTracker:
    """The best value of ``eval/<metric>`` seen so far and its iteration (saved in the run state)."""

    def __init__(self, metric: str, greater: bool) -> None:
        self.key, self.greater = f"eval/{metric_key(metric)}", greater
        self.value: float | None = None
        self.step: int | None = None

    def improves(self, value: float) -> bool:
        """True when ``value`` beats the best so far. A NaN (or inf) never improves, and a non-finite best
        (a state written before NaNs were refused) is no best at all, so it cannot freeze the tracker."""
        if not math.isfinite(value):
            return False
        if self.value is None or not math.isfinite(self.value):
            return True
        return value > self.value if self.greater else value < self.value

    def commit(self, value: float, step: int) -> None:
        """Take ``value`` of iteration ``step`` as the best; :meth:`revert` undoes it (a refused save)."""
        self.before = self.state_dict()
        self.value, self.step = value, step

    def revert(self) -> None:
        self.load_state_dict(self.before)

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "step": self.step}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.value, self.step = (state.get("value"), state.get("step")) if state else (None, None)


def write_best_json(tr, path: Path) -> None:
    info = {"metric": tr.best.key, "value": tr.best.value, "step": tr.best.step, "checkpoint": path.name,
            "greater_is_better": tr.best.greater}
    ckpt_lib.write_json_atomic(tr.out / "best" / "best.json", info)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``<run_dir>/best/best.json`` names, when it is complete; else None."""
    best = Path(run_dir) / "best"
    try:
        name = json.loads((best / "best.json").read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = best / str(name)
    return path if (path / "COMPLETE").exists() else None


def _recorded_best_steps(run_dir: Path) -> set[int]:
    """The best steps that the periodic checkpoints of ``run_dir`` record in their state."""
    steps = set()
    for ckpt in ckpt_lib.list_checkpoints(run_dir):
        try:
            best = json.loads((ckpt / "state.json").read_text(encoding="utf-8")).get("best") or {}
        except (OSError, ValueError):
            continue
        if best.get("step") is not None:
            steps.add(int(best["step"]))
    return steps


def prune_best(tr) -> None:
    """Rank 0: remove the best checkpoints that are neither the tracker's nor recorded by a periodic
    checkpoint on disk (a resume from that one restores its tracker and needs its best)."""
    keep = _recorded_best_steps(tr.out) | ({tr.best.step} if tr.best.step is not None else set())
    for ckpt in ckpt_lib.list_checkpoints(tr.out / "best"):
        if ckpt_lib.checkpoint_step(ckpt) not in keep:
            ckpt_lib.remove_checkpoint(ckpt)


def reconcile_best(tr, resumed: Path | None) -> None:
    """At the start of ``train`` (after a resume from ``resumed``, or from scratch): make ``best/`` agree
    with the loaded tracker. Collective (every rank ends with the same tracker)."""
    best_dir, lost = tr.out / "best", 0.0
    if tr.dist.is_main:
        for ckpt in ckpt_lib.list_checkpoints(best_dir):  # an abandoned future: this branch never reached it
            if ckpt_lib.checkpoint_step(ckpt) > tr.iteration:
                logger.warning("starting at step %d: removing the later best checkpoint %s", tr.iteration, ckpt)
                ckpt_lib.remove_checkpoint(ckpt)
        s = tr.best.step
        path = best_dir / f"checkpoint-{s}"
        if s is not None and not (path / "COMPLETE").exists():
            # a crash between the periodic save of step s and save_best, or a best since replaced: the
            # periodic checkpoint of step s holds the same state (written from it just before save_best)
            src = resumed if resumed is not None and resumed.name == path.name else tr.out / path.name
            if (src / "COMPLETE").exists():
                logger.warning("best checkpoint of step %d missing: restoring it from %s", s, src)
                ckpt_lib.copy_checkpoint(src, best_dir)
            else:
                logger.warning("the best checkpoint of step %d (%s = %s) is no longer on disk (nor a periodic "
                               "checkpoint of that step); best/ starts over from the next evaluation", s,
                               tr.best.key, tr.best.value)
                lost = 1.0
        if s is not None and not lost:
            write_best_json(tr, path)  # names the tracker's best (a crash may have left the previous one)
        else:
            (best_dir / "best.json").unlink(missing_ok=True)
    if dist_lib.reduce_floats({"lost": lost}, tr.dist, "max")["lost"]:  # rank 0's decision, on every rank
        tr.best.load_state_dict(None)
    if tr.dist.is_main:
        prune_best(tr)
    dist_lib.barrier(tr.dist)
