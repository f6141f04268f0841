"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``checkpoint-<step>`` in the run directory holding:

- one sub-directory per model (HF format, safetensors),
- ``optimizer-<name>.pt`` (optimizer state; loaded with ``weights_only=True``, so no pickle),
- ``state.json`` (step, scheduler states, running moments, KL controller, data position,
  Python/NumPy RNG states, anything the trainer adds),
- ``rng.safetensors`` (torch CPU / CUDA generator states),
- ``COMPLETE`` (written last).

It is written into a temporary sibling directory (``.tmp-checkpoint-<step>-*``) and renamed into
place, so a crash (even ``kill -9``) during a save leaves the previous checkpoint untouched and no
half-written one that looks complete; the next save removes such leftovers. Old checkpoints are
deleted marker-first, so a crash mid-deletion never leaves a "complete" checkpoint with missing
files. One process writes a run directory at a time. Loading refuses anything but
safetensors/JSON/weights-only tensors (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ppomax.errors import UserError

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
logger = logging.getLogger("ppomax")


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, unsafe or does not match the run."""


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every RNG that training touches."""
    py = random.getstate()
    np_state = np.random.get_state()
    js = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return js, tensors


def set_rng_state(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    models: dict[str, Any],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    tokenizer: Any = None,
    save_total_limit: int | None = 2,
    keep: tuple[str | Path, ...] = (),
    rank_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically; return its path.

    ``models`` maps a name to anything with ``save_pretrained(dir)``; ``state`` must be
    JSON-serialisable (the trainer's counters, moments, scheduler states, ...). Rotation
    (``save_total_limit``) never deletes the new checkpoint nor those in ``keep`` (e.g. the
    collapse guard's last healthy checkpoint). ``rank_rng``: the other ranks' torch generator
    states of a multi-process run (``torch_cpu_rank<r>``, ...), stored next to this process's.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".tmp-checkpoint-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=run_dir))
    try:
        for name, model in models.items():
            model.save_pretrained(tmp / name)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / name)
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"optimizer-{name}.pt")
        js_rng, tensor_rng = rng_state()
        save_file({**tensor_rng, **(rank_rng or {})}, tmp / "rng.safetensors")
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            json.dump({"step": step, "rng": js_rng, **state}, fh)
        (tmp / "COMPLETE").write_text(str(step))
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. after a rollback): replace atomically
            old = run_dir / f".old-checkpoint-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit is not None:
        protected = {final.resolve(), *(Path(k).resolve() for k in keep)}
        for old in list_checkpoints(run_dir)[:-save_total_limit]:
            if old.resolve() not in protected:
                remove_checkpoint(old)
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint, its COMPLETE marker first: a crash mid-way leaves an incomplete one."""
    (path / "COMPLETE").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def discard_after(run_dir: str | Path, step: int) -> None:
    """Resuming at ``step`` abandons later checkpoints of the run (their metrics rows are dropped
    too); remove them so that ``--resume_from latest`` never jumps back to the abandoned future."""
    for p in list_checkpoints(run_dir):
        if int(_CKPT_RE.match(p.name).group(1)) > step:
            logger.warning("resuming at step %d: removing the later checkpoint %s", step, p)
            remove_checkpoint(p)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (temp and incomplete ones ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / "COMPLETE").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(run_dir: str | Path | None, resume_from: str) -> Path | None:
    """``resume_from`` = a checkpoint dir, a run dir (its newest checkpoint) or 'latest'.

    'latest' with no complete checkpoint in ``run_dir`` yet returns None (start from scratch,
    logged), so one command line serves a job's first start and every restart after a kill.
    """
    if resume_from == "latest":
        if run_dir is None:
            raise CheckpointError("--resume_from latest needs --output_dir")
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            logger.warning("--resume_from latest: no complete checkpoint in %s yet; starting from scratch", run_dir)
            return None
        return ckpts[-1]
    p = Path(resume_from)
    if not p.exists():
        raise CheckpointError(f"--resume_from {resume_from}: no such directory")
    if (p / "COMPLETE").exists():
        return p
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"--resume_from {resume_from}: not a complete ppomax checkpoint (no COMPLETE marker)")


def load_state(ckpt: str | Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (RNG included, not yet applied)."""
    ckpt = Path(ckpt)
    refuse_pickles(ckpt)
    with open(ckpt / "state.json", encoding="utf-8") as fh:
        return json.load(fh)


def restore_rng(ckpt: str | Path, state: dict[str, Any], rank: int = 0) -> bool:
    """Restore the RNGs; rank r > 0 of a multi-process run takes its own torch generator states
    when the checkpoint has them. Returns False when a rank > 0 found none (older checkpoint)."""
    tensors = load_file(Path(ckpt) / "rng.safetensors")
    set_rng_state(state["rng"], tensors)
    if rank == 0:
        return True
    own = {k[: -len(f"_rank{rank}")]: v for k, v in tensors.items() if k.endswith(f"_rank{rank}")}
    if "torch_cpu" not in own:
        return False
    torch.set_rng_state(own["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in own:
        torch.cuda.set_rng_state(own["torch_cuda"])
    return True


def load_optimizer(ckpt: str | Path, name: str, optimizer: torch.optim.Optimizer, model: Any = None) -> None:
    """Restore an optimizer. States saved by a sharded run are keyed by parameter name and need
    ``model`` (they load into any number of processes); plain ones load into unsharded models."""
    from ppomax import sharding

    path = Path(ckpt) / f"optimizer-{name}.pt"
    if not path.exists():
        raise CheckpointError(f"{ckpt}: missing optimizer state {path.name}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary pickled objects
        raise CheckpointError(f"{path}: refused to load (not a plain tensor state: {e})") from None
    by_name = any(isinstance(p, str) for g in sd.get("param_groups", []) for p in g.get("params", []))
    try:
        if by_name:
            if model is None:
                raise ValueError("a parameter-name keyed state needs the model")
            sharding.load_optimizer_state(model, optimizer, sd)
        elif sharding.is_sharded(model):
            raise ValueError("it was saved by an unsharded run; resume it with --sharding none")
        else:
            optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not match this model ({e})") from None


_PICKLE_SUFFIXES = {".bin", ".pkl", ".pickle", ".pth", ".ckpt"}


def refuse_pickles(directory: str | Path) -> None:
    """Refuse checkpoint directories that carry pickle files we would have to unpickle.

    ppomax writes safetensors, JSON and weights-only ``.pt`` optimizer states; a ``.bin`` or
    ``.pkl`` in a checkpoint is not ours and is never loaded (arbitrary code on unpickling).
    """
    for p in Path(directory).rglob("*"):
        if p.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{p}: pickle-format file in a checkpoint; ppomax only loads safetensors/JSON "
                "(convert the weights to safetensors)"
            )
