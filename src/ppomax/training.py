"""Plumbing shared by the trainers: seeding, device, optimizer/schedule, precision, run directory.

The run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object
per logged step, fixed metric names: docs/metrics.md), TensorBoard events and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppomax.errors import UserError

logger = logging.getLogger("ppomax")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch; ``torch.manual_seed`` seeds the CPU generator and every CUDA
    device's (as transformers' ``set_seed``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_devices() -> list[int]:
    """The CUDA devices whose generators a reseed touches: all visible ones (``torch.manual_seed``
    reseeds every CUDA device), none without CUDA."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def forked_rng(seed: int | None = None):
    """Run the block on its own random streams, seeded with ``seed`` (None: just forked).

    The one rule for every reseed that must not move training's streams (evaluation, sampling
    for a report, building a model from a seed): the Python, NumPy, CPU and every CUDA device's
    generators are saved and restored. Restoring only the CPU generator is not enough, because
    ``torch.manual_seed`` reseeds CUDA too: on a GPU the training rollouts after each evaluation
    would restart from the same random numbers."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=rng_devices(), device_type="cuda"):
        try:
            if seed is not None:
                set_seed(seed)
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# ---------------------------------------------------------------------------------------------
# Device and determinism (one owner each: the device rule here, the process group in distributed.py)
# ---------------------------------------------------------------------------------------------

DEVICE_HELP = ("'auto' (CUDA when there is one, else CPU; under several processes cuda:LOCAL_RANK), 'cpu', "
               "'cuda' or 'cuda:N'")


def check_device(spec: str, field: str = "device") -> None:
    """Refuse a device string this machine cannot give, before any model loads: a malformed one,
    ``cuda`` without CUDA, ``cuda:N`` past the visible GPUs (a ConfigError naming ``field``)."""
    from ppomax.fields import ConfigError

    kind, _, index = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if spec not in ("auto", "cpu", "cuda") and not (kind == "cuda" and index.isdigit()):
        raise ConfigError(f"{field} = {spec!r} is not a device: allowed {DEVICE_HELP}")
    if kind != "cuda":
        return
    if not torch.cuda.is_available():
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU" if hidden is not None and not hidden.strip(",")
               else f"torch {torch.__version__} sees no CUDA GPU" + ("" if torch.version.cuda else " (a CPU-only build)"))
        raise ConfigError(f"{field} = {spec!r} but CUDA is not available: {why}; use --device cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"{field} = {spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device a process trains and samples on. ``local_rank``: this process's index on its node
    when several processes run (then 'auto' and 'cuda' mean cuda:local_rank, as torchrun and
    accelerate lay ranks out); None for one process ('auto' and 'cuda': the current CUDA device,
    cuda:0 unless the caller chose another with ``torch.cuda.set_device``)."""
    check_device(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if ":" in spec:
        if local_rank is not None:
            raise UserError(f"device = {spec!r} puts every process on one GPU; with several processes use "
                            "--device cuda (or auto): process r takes cuda:LOCAL_RANK")
        return torch.device(spec)
    return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)


def default_device() -> torch.device:
    """``resolve_device('auto')`` for one process: the current CUDA device where CUDA is available, else CPU."""
    return resolve_device("auto")


def enable_full_determinism(seed: int) -> None:
    """``--full_determinism``: seed everything and make every kernel deterministic, with the name and
    meaning of transformers' ``enable_full_determinism`` (trainer_utils.py). Process-wide, like theirs.

    - ``torch.use_deterministic_algorithms(True)``: an op without a deterministic kernel raises
      instead of silently varying;
    - ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless set): what cuBLAS needs for deterministic matmuls
      on CUDA >= 10.2 (PyTorch's reproducibility notes; transformers sets ``:16:8``, also valid,
      smaller and slower). It must be set before the first CUDA matmul creates the cuBLAS handle,
      so the stages call this before any model is placed. transformers also sets
      ``CUDA_LAUNCH_BLOCKING=1``, which only older CUDA needed and which serialises every kernel:
      not set here;
    - TF32 off (fp32 matmuls and convolutions in IEEE fp32);
    - cuDNN deterministic, no benchmark autotuning (it may pick a different kernel per run);
    - on a machine with CUDA, attention through SDPA's math backend: the CUDA flash /
      memory-efficient / cuDNN kernels' backward accumulates with atomics (the switches are
      process-wide, so the CPU's flash kernel goes too). Without CUDA they are left on: the CPU
      kernels are deterministic already, and a CPU run gives the same numbers with the flag as
      without (tests/test_devices.py); ``FLASH_ATTENTION_DETERMINISTIC=1`` for the flash-attn
      package, as transformers sets.
    """
    set_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True)
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9: one setting for matmul, cuDNN, oneDNN
        torch.backends.fp32_precision = "ieee"  # (mixing it with the legacy allow_tf32 flags raises)
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if torch.cuda.is_available():
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
            torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_math_sdp(True)


def seed_run(seed: int, full_determinism: bool = False) -> None:
    """A stage's start: :func:`enable_full_determinism` when asked (``--full_determinism``), else
    :func:`set_seed` (transformers' Trainer makes the same choice)."""
    (enable_full_determinism if full_determinism else set_seed)(seed)


def autocast(device: torch.device, bf16: bool, fp16: bool):
    """Mixed-precision context for forward passes; master weights and losses stay fp32."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def make_optimizer(params, lr: float, weight_decay: float, betas: tuple[float, float],
                   fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable ``params``. ``fused``: PyTorch's one-kernel AdamW where the device
    supports it (CPU and CUDA; the same update up to float rounding, ~3× faster than the
    per-tensor loop on CPU, where it is not the default)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters")
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, **({"fused": True} if fused else {}))


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak LR at a step: linear warm-up, then cosine / linear decay or constant."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_scheduler(optimizer, kind: str, warmup_ratio: float, total_steps: int):
    warmup = int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total_steps))


def scheduler_state(scheduler) -> dict[str, Any]:
    """JSON-safe scheduler state (the lambdas are rebuilt from the config)."""
    sd = scheduler.state_dict()
    return {k: v for k, v in sd.items() if k != "lr_lambdas"}


def load_scheduler_state(scheduler, state: dict[str, Any]) -> None:
    sd = scheduler.state_dict()
    sd.update(state)
    scheduler.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# Run directory and metrics
# ---------------------------------------------------------------------------------------------

# Fields a resumed run may change: where it writes and how it runs, not what it computes (a run
# that crashed on cuda:0 resumes on cuda:1, or on CPU).
_RUN_FIELDS_IGNORED = {
    "output_dir", "resume_from", "overwrite_output_dir", "disable_tqdm", "max_steps", "save_steps",
    "logging_steps", "report_to", "save_total_limit", "device", "full_determinism",
    "run_name", "push_to_hub", "hub_model_id", "hub_private_repo",  # where results go, not what is trained
}


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_dict.items() if k not in _RUN_FIELDS_IGNORED}


def prepare_output_dir(cfg: Any, stage: str) -> Path:
    """Create ``cfg.output_dir`` and write the resolved config, refusing to mix two runs.

    An output directory that already holds a *different* run (other stage or other settings),
    or checkpoints of this same run, is refused unless ``overwrite_output_dir`` is set or the
    run resumes from it.
    """
    import yaml

    out = Path(cfg.output_dir)
    values = dataclasses.asdict(cfg)
    existing = out / "config.yaml"
    if existing.exists() and not getattr(cfg, "overwrite_output_dir", False):
        try:
            old = yaml.safe_load(existing.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            old = {}
        old_cfg = dict(old.get("config") or {})
        for f in dataclasses.fields(cfg):  # a field added since the run started counts as its default
            if f.name not in old_cfg and f.default is not dataclasses.MISSING:
                old_cfg[f.name] = f.default
        same = old.get("stage") == stage and _comparable(old_cfg) == _comparable(values)
        if not same and not getattr(cfg, "resume_from", None):
            raise UserError(
                f"{out} already holds a different run ({old.get('stage', '?')}); use another --output_dir, "
                "--overwrite_output_dir to replace it, or --resume_from to continue it"
            )
        if same and not getattr(cfg, "resume_from", None):
            from ppomax.checkpoint import list_checkpoints

            ckpts = list_checkpoints(out)
            if ckpts:  # starting over would overwrite its metrics and checkpoints
                raise UserError(
                    f"{out} already holds checkpoints of this run (newest: {ckpts[-1].name}); "
                    "--resume_from latest continues it, --overwrite_output_dir starts it over"
                )
        if not same and getattr(cfg, "resume_from", None):
            changed = sorted(
                k for k in set(_comparable(old_cfg)) | set(_comparable(values))
                if old_cfg.get(k) != values.get(k)
            )
            raise UserError(f"cannot resume {out}: its config differs in {', '.join(changed)}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump({"stage": stage, "config": values}, sort_keys=False), encoding="utf-8")
    os.replace(tmp, existing)
    return out


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Keep the rows of a JSONL log with ``"step" <= step`` (atomically); drop the rest.

    On resume from the checkpoint of ``step``, rows written after it (by the run that crashed)
    would otherwise be counted twice; a half-written last line from a crash is dropped too.
    """
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written line from a crash
        if isinstance(row, dict) and row.get("step", -1) <= step:
            keep.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


class RankMetrics:
    """Metrics of a rank other than 0: kept in memory (for the return value), never written."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))

    def close(self) -> None:
        pass


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (+ TensorBoard / wandb / trackio).

    On resume, rows past the resumed step are dropped first, so no step is counted twice. ``report_to`` is a
    comma-separated list (hf_args.report_integrations: checked, and a missing package refused, when the
    config is built); wandb and trackio get ``run_name`` (default: the output dir's name) and ``config``.
    """

    def __init__(self, out_dir: str | Path, report_to: str = "none", resume_step: int | None = None,
                 run_name: str | None = None, config: dict | None = None) -> None:
        from ppomax.hf_args import report_integrations

        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self.rows: list[dict[str, Any]] = []
        self._tb = self._wandb = self._trackio = None
        integrations = report_integrations(report_to, "report_to")
        name = run_name or Path(out_dir).resolve().name
        if "tensorboard" in integrations:
            from torch.utils.tensorboard import SummaryWriter

            # Resumed: the events of steps after the resumed one (logged before a crash) are purged, as
            # metrics.jsonl's rows are: SummaryWriter's purge_step writes a restart marker, and TensorBoard
            # hides the earlier events at steps >= it, so each step shows once.
            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step is not None else None)
        if "wandb" in integrations:  # the project from WANDB_PROJECT, as transformers' WandbCallback
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ppomax"), name=name, config=config,
                                     dir=str(out_dir), resume="allow" if resume_step is not None else None)
        if "trackio" in integrations:  # trackio.init / log / finish mirror wandb's (transformers' TrackioCallback)
            import trackio

            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "ppomax"), name=name, config=config,
                         resume="allow" if resume_step is not None else "never")
            self._trackio = trackio

    def _truncate_after(self, step: int) -> None:
        truncate_jsonl(self.path, step)

    def log(self, row: dict[str, Any]) -> None:
        row = {k: (float(v) if isinstance(v, torch.Tensor | np.floating) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        step = row.get("step", 0)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step" and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._trackio is not None:
            self._trackio.log(numbers, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()


def progress(iterable=None, total: int | None = None, desc: str = "", disable: bool = False, initial: int = 0,
             position: int | None = None):
    from tqdm.auto import tqdm

    # Parallel demo workers each draw their bar on their own line (PPOMAX_TQDM_POSITION).
    position = int(os.environ.get("PPOMAX_TQDM_POSITION", "0")) if position is None else position
    return tqdm(iterable, total=total, desc=desc, disable=disable, initial=initial, dynamic_ncols=True,
                leave=True, position=position)


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """In a worker process: exit as soon as ``parent`` (the pid that started it) is gone.

    Use as ``ProcessPoolExecutor(initializer=exit_with_parent, initargs=(os.getpid(),))``: the pid
    is passed, not read here, because a parent killed while the worker was still importing would
    already have been replaced by init.

    A demo or ablate killed with SIGTERM/SIGKILL cannot shut its ProcessPoolExecutor down, and
    the orphaned workers would train on; a rerun would then resume the same run directory while
    they still write checkpoints into it. A daemon thread watches the parent's pid instead.
    """
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)  # no cleanup: the parent's run is gone, the newest complete checkpoint is intact

    threading.Thread(target=watch, name="ppomax-exit-with-parent", daemon=True).start()


def __getattr__(name: str) -> Any:  # reduce_and_clip, grad_norm: moved to ppomax.gradients
    from ppomax import aliases

    return aliases.moved_name(__name__, name)
