"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``checkpoint-<step>`` in the run directory holding:

- one sub-directory per model (HF format, safetensors),
- ``optimizer-<name>.pt`` (optimizer state; loaded with ``weights_only=True``, so no pickle),
- ``state.json`` (step, scheduler states, running moments, KL controller, data position,
  Python/NumPy RNG states, anything the trainer adds),
- ``rng.safetensors`` (torch CPU / CUDA generator states),
- ``MANIFEST.json`` (size and sha256 of every file above),
- ``COMPLETE`` (written last).

It is written into a temporary sibling directory (``.tmp-checkpoint-<step>-*``) and renamed into
place, so a crash (even ``kill -9``) during a save leaves the previous checkpoint untouched and no
half-written one that looks complete; the next save removes such leftovers. A save that fails
(disk full, I/O error) removes its temporary directory and raises a :class:`CheckpointError`
that names the checkpoint, the part being written and the cause. Old checkpoints are
deleted marker-first, so a crash mid-deletion never leaves a "complete" checkpoint with missing
files. One process writes a run directory at a time. Loading refuses anything but
safetensors/JSON/weights-only tensors (docs/reliability.md).

COMPLETE only says that the writer finished; a file can still be damaged afterwards (a copy cut
short, a disk error, a file zero-filled after a power loss, a hand edit). So resuming checks the
manifest first: every file present, with its size and its sha256 (read at disk speed, in
parallel threads; a cheaper size-only check would miss a zero-filled or flipped region).
``--resume_from latest`` then falls back to the newest checkpoint that passes; an explicitly named
checkpoint that fails is an error, never silently replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ppomax.errors import UserError

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "MANIFEST.json"
# What a failing write raises: OSError (open/write/fsync/rename, ENOSPC), RuntimeError (torch.save's
# stream writer), SafetensorError (safetensors' writer, also inside save_pretrained).
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
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
    part = "its temporary directory"  # what is being written, for the error message
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=run_dir))
        for name, model in models.items():
            part = f"{name}/"
            model.save_pretrained(tmp / name)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / name)
        for name, opt in optimizers.items():
            part = f"optimizer-{name}.pt"
            torch.save(opt.state_dict(), tmp / part)
        part = "rng.safetensors"
        js_rng, tensor_rng = rng_state()
        save_file({**tensor_rng, **(rank_rng or {})}, tmp / "rng.safetensors")
        part = "state.json"
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            json.dump({"step": step, "rng": js_rng, **state}, fh)
        part = MANIFEST
        write_manifest(tmp)
        part = "COMPLETE"
        (tmp / "COMPLETE").write_text(str(step))
        part = "its files to disk (fsync)"
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        part = f"{final.name} (renaming it into place)"
        if final.exists():  # re-saving the same step (e.g. after a rollback): replace atomically
            old = run_dir / f".old-checkpoint-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, _WRITE_ERRORS):  # disk full, I/O error: say so plainly (the CLI prints UserErrors)
            raise _write_error(run_dir, final, part, e) from e
        raise
    if save_total_limit is not None:
        protected = {final.resolve(), *(Path(k).resolve() for k in keep)}
        for old in list_checkpoints(run_dir)[:-save_total_limit]:
            if old.resolve() not in protected:
                remove_checkpoint(old)
    return final


def _write_error(run_dir: Path, final: Path, part: str, e: BaseException) -> CheckpointError:
    """The message of a failed save: which checkpoint, which part, why, and what is left."""
    full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e) or "StorageFull" in str(e)
    intact = list_checkpoints(run_dir)
    left = (f"the newest complete checkpoint {intact[-1]} is intact" if intact
            else "there is no earlier complete checkpoint")
    todo = "free disk space" if full else "fix the cause"
    return CheckpointError(
        f"could not write checkpoint {final} (while writing {part}): {type(e).__name__}: {e}"
        f"{' (disk full)' if full else ''}. The partial checkpoint was removed and {left}; {todo}, then "
        f"continue with --resume_from latest"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    # hashlib releases the GIL on large buffers: one thread per file keeps several cores busy
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(ckpt: Path) -> None:
    """``MANIFEST.json``: size and sha256 of every file in ``ckpt`` (before COMPLETE is written)."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in (MANIFEST, "COMPLETE"))
    entries = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": h}
               for p, h in zip(files, _sha256_all(files))}
    with open(ckpt / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump({"format": 1, "files": entries}, fh, indent=1)


def verify_checkpoint(ckpt: str | Path) -> None:
    """Raise a CheckpointError naming the first file of ``ckpt`` that is missing, has another
    size, or other bytes than the manifest says. Checkpoints of older ppomax versions have no
    manifest: they are accepted unverified (logged)."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST
    if not mpath.exists():
        logger.info("%s has no %s (an older ppomax wrote it): its files are not verified", ckpt, MANIFEST)
        return
    try:
        with open(mpath, encoding="utf-8") as fh:
            entries = json.load(fh)["files"]
        expected = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{mpath}: unreadable checkpoint manifest ({type(e).__name__}: {e})") from None
    root = ckpt.resolve()
    for rel, (size, _) in expected.items():  # sizes first: cheap, and they catch truncation
        p = ckpt / rel
        if not p.resolve().is_relative_to(root):
            raise CheckpointError(f"{mpath}: lists a file outside the checkpoint ({rel})")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing from the checkpoint (listed in {MANIFEST})")
        if p.stat().st_size != size:
            raise CheckpointError(f"{p}: truncated or overwritten ({p.stat().st_size} bytes; {size} were written)")
    rels = sorted(expected)
    for rel, digest in zip(rels, _sha256_all([ckpt / r for r in rels])):
        if digest != expected[rel][1]:
            raise CheckpointError(f"{ckpt / rel}: corrupt (its sha256 differs from the one written with it)")


def checkpoint_step(path: str | Path) -> int:
    """N of a ``checkpoint-N`` directory."""
    m = _CKPT_RE.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint-N directory")
    return int(m.group(1))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a fsynced temporary file and a rename: a reader (or a run
    resumed after a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def copy_checkpoint(src: str | Path, run_dir: str | Path) -> Path:
    """Copy the complete checkpoint ``src`` to ``run_dir/<its name>`` the way :func:`save_checkpoint` writes
    one: into a temporary sibling, fsynced, renamed into place (an existing one is replaced)."""
    src, run_dir = Path(src), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / src.name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{src.name}-", dir=run_dir))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    Every candidate is verified against its manifest (:func:`verify_checkpoint`): 'latest' and a
    run dir fall back to the newest checkpoint that passes (a warning names the bad file and the
    one used); a checkpoint named explicitly must pass itself.
    """
    if resume_from == "latest":
        if run_dir is None:
            raise CheckpointError("--resume_from latest needs --output_dir")
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            logger.warning("--resume_from latest: no complete checkpoint in %s yet; starting from scratch", run_dir)
            return None
        return _newest_intact(ckpts, resume_from)
    p = Path(resume_from)
    if not p.exists():
        raise CheckpointError(f"--resume_from {resume_from}: no such directory")
    if (p / "COMPLETE").exists():
        try:
            verify_checkpoint(p)
        except CheckpointError as e:  # named explicitly: never silently another one
            raise CheckpointError(f"--resume_from {resume_from}: damaged checkpoint: {e}") from None
        return p
    ckpts = list_checkpoints(p)
    if ckpts:
        return _newest_intact(ckpts, resume_from)
    raise CheckpointError(f"--resume_from {resume_from}: not a complete ppomax checkpoint (no COMPLETE marker)")


def _newest_intact(ckpts: list[Path], resume_from: str) -> Path:
    """The newest of ``ckpts`` (oldest first) that passes verification."""
    bad: list[str] = []
    for ckpt in reversed(ckpts):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            logger.warning("--resume_from %s: skipping the damaged checkpoint %s: %s", resume_from, ckpt.name, e)
            bad.append(str(e))
            continue
        if bad:
            logger.warning("--resume_from %s: resuming from %s, the newest intact checkpoint (skipped %d damaged "
                           "newer one(s): %s)", resume_from, ckpt, len(bad), "; ".join(bad))
        return ckpt
    raise CheckpointError(f"--resume_from {resume_from}: no intact checkpoint left in {ckpts[0].parent}: "
                          + "; ".join(bad))


def load_state(ckpt: str | Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (RNG included, not yet applied)."""
    ckpt = Path(ckpt)
    refuse_pickles(ckpt)
    path = ckpt / "state.json"
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: e.g. an unverified older checkpoint
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


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
