"""Data parallelism across processes for PPO: ranks, reductions, and gradient all-reduce.

Launch with ``accelerate launch --multi_gpu --num_processes N -m ppomax ppo ...`` (on a CPU-only
machine this starts N gloo processes) or ``torchrun --nproc_per_node N -m ppomax ppo ...``; the
launcher sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` and :func:`setup` joins
the process group. Without those variables everything here is a no-op (world size 1).

Devices and backends (one rule, owned here): each process trains on the device
``training.resolve_device`` gives it (``--device``; 'auto' is cuda:LOCAL_RANK under CUDA, else
CPU), and the process group's backend follows that device: NCCL for CUDA, gloo for CPU (so hidden
GPUs, ``CUDA_VISIBLE_DEVICES=``, or ``--device cpu`` mean CPU and gloo). NCCL accepts only tensors
on the process's GPU, so every collective of ppomax goes through the wrappers below, which place
their tensors on :attr:`Dist.device`. (A mixed ``"cpu:gloo,cuda:nccl"`` group would also take CPU
tensors, but it would route them over TCP with a host sync each time and hide the next tensor
built off the device; one device and one backend keep the rule checkable:
``PPOMAX_CHECK_COLLECTIVES=1`` makes every collective verify it, see :func:`check_collectives`.)

Every rank holds full copies of the models (plain data parallelism, like DDP). The trainer
keeps the reduction exact instead of averaging per-rank means (OpenRLHF's rule, STYLE.md):
each rank divides its token losses by the **global** token count of the mini-batch, and the
gradients are **summed** across ranks, so the update equals the one-process update on the union
of the ranks' batches (tests/test_distributed.py checks this). Advantage whitening uses global
masked moments and the reward-normalisation moments see every rank's scores.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ppomax.errors import UserError

logger = logging.getLogger("ppomax")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # this process's models, and every collective's tensors

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """This process's rank, world size and device; joins the process group when launched with
    ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU). ``device``: the ``--device`` setting.

    Errors (UserError, before any model loads or the group forms): a DeepSpeed launch, a device
    this machine does not have, more processes on this node than visible GPUs."""
    from ppomax.errors import UserError
    from ppomax.training import resolve_device

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # refuse rather than run unsharded
        raise UserError("ppomax shards with PyTorch FSDP2, not a DeepSpeed engine: for ZeRO-2 / ZeRO-3 use "
                        "`--sharding zero2|zero3` or examples/accelerate/fsdp_zero2.yaml / fsdp_zero3.yaml "
                        "(see examples/README.md)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_ADDR"):
            logger.warning("`accelerate launch --cpu` started a single process (multi-CPU needs mpirun); for N "
                           "processes on CPU use `accelerate launch --multi_gpu --num_processes N` (gloo) or torchrun")
        return Dist(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        check_gpus_per_node(local_rank)
    import torch.distributed as dist

    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        import atexit

        atexit.register(shutdown)  # before interpreter teardown, whatever the exit path
    d = Dist(dist.get_rank(), dist.get_world_size(), dev)
    if os.environ.get("PPOMAX_CHECK_COLLECTIVES", "") == "1":
        check_collectives(d)
    logger.info("process group: rank %d of %d (%s) on %s", d.rank, d.world_size, dist.get_backend(), dev)
    return d


def check_gpus_per_node(local_rank: int) -> None:
    """One process per GPU: more processes on this node than visible GPUs is a UserError naming
    both numbers (``torch.cuda.set_device`` would fail with a raw CUDA error, or two ranks would
    share a GPU, which NCCL refuses). ``LOCAL_WORLD_SIZE`` is set by torchrun and accelerate."""
    from ppomax.errors import UserError

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    gpus = torch.cuda.device_count()
    if max(per_node, local_rank + 1) > gpus:
        raise UserError(f"{max(per_node, local_rank + 1)} processes on this node but {gpus} visible GPU(s): launch "
                        f"at most {gpus} (--num_processes / --nproc_per_node {gpus}), or run on CPU with gloo "
                        f"(--device cpu, or CUDA_VISIBLE_DEVICES= to hide the GPUs)")


# The torch.distributed functions that move tensors between ranks (checked by check_collectives).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv")
# Modules of ppomax that may call them directly: these wrappers, and FSDP2's plumbing.
COLLECTIVE_OWNERS = ("distributed.py", "sharding.py")


def collective_tensors(args, kwargs) -> list[torch.Tensor]:
    """The tensors (also inside lists) among a collective's arguments."""
    out = []
    for a in (*args, *kwargs.values()):
        for x in (a if isinstance(a, list | tuple) else (a,)):
            if isinstance(x, torch.Tensor):
                out.append(x)
    return out


def check_collective_call(name: str, tensors: list[torch.Tensor], d: Dist, caller: str) -> None:
    """NCCL's rule, checked on any backend: every tensor of a collective is on the process's device,
    and no ppomax module outside distributed.py / sharding.py calls torch.distributed directly."""
    package = os.sep + "ppomax" + os.sep
    if package in caller and not caller.endswith(tuple(os.sep + m for m in COLLECTIVE_OWNERS)):
        raise RuntimeError(f"{caller} calls torch.distributed.{name} directly; ppomax's collectives go through "
                           "ppomax.distributed, whose wrappers place tensors on the process's device")
    for t in tensors:
        if t.device != d.device:
            raise RuntimeError(f"torch.distributed.{name} got a tensor on {t.device} (called from {caller}); this "
                               f"process's device is {d.device}, and NCCL accepts tensors on it only")


def check_collectives(d: Dist) -> None:
    """Make every torch.distributed collective of this process check :func:`check_collective_call`
    (``PPOMAX_CHECK_COLLECTIVES=1``; the two-process tests set it, so CI catches on CPU a
    collective that a GPU run would see fail)."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "_ppomax_checked", False):
            continue

        @functools.wraps(fn)
        def checked(*args, _fn=fn, _name=name, **kwargs):
            frame = sys._getframe(1)
            check_collective_call(_name, collective_tensors(args, kwargs), d, frame.f_code.co_filename)
            return _fn(*args, **kwargs)

        checked._ppomax_checked = True
        setattr(dist, name, checked)


def cpu_launch_processes(parent_args: list[str] | None = None) -> int | None:
    """N when this process was started by ``accelerate launch --cpu --num_processes N`` (N > 1).

    accelerate runs such a launch as one plain process unless mpirun is configured; it sets
    ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR`` but no ``WORLD_SIZE``, and N is only in the
    launcher's own command line (its parent process here, read from /proc on Linux).
    """
    env = os.environ
    if env.get("WORLD_SIZE") or env.get("ACCELERATE_USE_CPU", "").lower() != "true" or not env.get("MASTER_ADDR"):
        return None
    args = parent_args
    if args is None:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
                args = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            return None
    if not any(os.path.basename(a).startswith("accelerate") or a.endswith("accelerate.commands.launch") for a in args):
        return None
    n = None
    for i, a in enumerate(args):
        if a in ("--num_processes", "--num-processes") and i + 1 < len(args):
            n = args[i + 1]
        elif a.startswith(("--num_processes=", "--num-processes=")):
            n = a.split("=", 1)[1]
    return int(n) if n is not None and n.isdigit() and int(n) > 1 else None


def shutdown() -> None:
    """Destroy the process group while the interpreter is fully alive. Left to interpreter
    teardown, gloo's worker threads (still referenced by FSDP's device mesh) can abort the
    process ("terminate called without an active exception"). Safe to call more than once."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # drop models, meshes and pending work that reference the group first
        dist.destroy_process_group()


def _dist():
    import torch.distributed as dist

    return dist


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``x`` over ranks, on ``d.device`` (a new tensor; ``x`` itself on one process)."""
    if not d.enabled:
        return x
    y = x.detach().to(d.device, copy=True)
    _dist().all_reduce(y)
    return y


def all_gather(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0 (rank order), on ``d.device``."""
    if not d.enabled:
        return x
    x = x.detach().to(d.device).contiguous()
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    _dist().all_gather(parts, x)
    return torch.cat(parts, dim=0)


def reduce_floats(values: dict[str, float], d: Dist, op: str = "mean") -> dict[str, float]:
    """Sum, mean or max of each float over ranks (every rank must pass the same keys in the same order)."""
    if not d.enabled or not values:
        return values
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=d.device)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX if op == "max" else _dist().ReduceOp.SUM)
    if op == "mean":
        t /= d.world_size
    return dict(zip(keys, t.tolist()))


def all_true(ok: bool, d: Dist) -> bool:
    """True when ``ok`` holds on every rank (decisions that must agree, or collectives would hang)."""
    if not d.enabled:
        return ok
    t = torch.tensor([0.0 if ok else 1.0], device=d.device)
    _dist().all_reduce(t)
    return t.item() == 0


def any_rank(flag: bool, d: Dist) -> bool:
    """True when ``flag`` holds on some rank."""
    return not all_true(not flag, d)


def sum_gradients(params, d: Dist) -> None:
    """All-reduce (sum) the gradients of ``params`` in one flat buffer on ``d.device``.

    A gradient missing on a rank counts as 0; one missing on every rank stays None (as on one
    process, so AdamW skips that parameter).
    """
    if not d.enabled:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=d.device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().to(d.device)
                      for p in params] + [has_grad])
    _dist().all_reduce(flat)
    offset = 0
    present = flat[-len(params):].tolist()  # one host sync, not one per parameter
    for i, p in enumerate(params):
        n = p.numel()
        if present[i] > 0:
            p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype).clone()
        offset += n


def broadcast_parameters(module: torch.nn.Module, d: Dist) -> None:
    """Copy rank 0's trainable parameters to every rank (fresh heads and LoRA matrices are random).
    The module must be on ``d.device`` already (NCCL broadcasts in place)."""
    if not d.enabled:
        return
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                _dist().broadcast(p.data, src=0)


def check_identical(module: torch.nn.Module, d: Dist, what: str) -> None:
    """Refuse to start when ranks hold different trainable weights (sharding has no broadcast step:
    every rank must build the same model, e.g. from the same seed)."""
    if not d.enabled:
        return
    s = sum(float(p.detach().double().sum()) for p in module.parameters() if p.requires_grad)
    t = torch.tensor([s, -s], dtype=torch.float64, device=d.device)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    if t[0].item() != -t[1].item():
        from ppomax.errors import UserError

        raise UserError(f"the processes start from different {what} weights; build the models from the same "
                        "seed on every rank")


def gather_rng_states(d: Dist) -> dict[str, torch.Tensor]:
    """Every rank's torch generator states, for rank 0 to store (``torch_cpu_rank<r>``, and
    ``torch_cuda_rank<r>`` for the rank's GPU), so that a resumed multi-process run continues each
    rank's sampling stream exactly. Collective; {} on one process."""
    if not d.enabled:
        return {}
    out = {}
    states = {"torch_cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(d.device)
    for name, st in states.items():
        for r, x in enumerate(all_gather(st.unsqueeze(0), d)):
            if r > 0:
                out[f"{name}_rank{r}"] = x.cpu()
    return out


def broadcast_text(text: str, d: Dist) -> str:
    """Rank 0's ``text`` on every rank (the others pass anything): its UTF-8 bytes in a uint8 tensor on
    ``d.device``, after their count, so nothing is pickled. Collective: every rank waits for rank 0."""
    if not d.enabled:
        return text
    data = text.encode("utf-8") if d.is_main else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=d.device)
    _dist().broadcast(n, src=0)
    if n.item() == 0:
        return ""
    buf = (torch.tensor(list(data), dtype=torch.uint8, device=d.device) if d.is_main
           else torch.empty(int(n.item()), dtype=torch.uint8, device=d.device))
    _dist().broadcast(buf, src=0)
    return bytes(buf.tolist()).decode("utf-8")


def gather_json(obj: Any, d: Dist) -> list:
    """Every rank's JSON-serialisable ``obj``, in rank order, on every rank: its UTF-8 JSON in a uint8
    tensor on ``d.device``, padded to the longest rank's, so nothing is pickled. Collective."""
    if not d.enabled:
        return [obj]
    data = json.dumps(obj).encode("utf-8")
    n = all_gather(torch.tensor([len(data)], dtype=torch.int64, device=d.device), d).tolist()
    buf = torch.zeros(max(n), dtype=torch.uint8, device=d.device)
    buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=d.device)
    parts = all_gather(buf[None], d).cpu()
    return [json.loads(parts[r, : n[r]].numpy().tobytes().decode("utf-8")) for r in range(d.world_size)]


class MainRankError(UserError):
    """Work that rank 0 did for every rank (writing a checkpoint, checking one) failed there: raised on the
    other ranks with rank 0's message."""


def run_on_main(fn, d: Dist):
    """``fn()`` on rank 0 while the other ranks wait; every rank returns once rank 0 has finished (rank 0
    with ``fn``'s result, the others with None).

    When ``fn`` raises on rank 0, every rank raises: rank 0 its own error, the others a
    :class:`MainRankError` with the same message (a non-UserError's is prefixed with its type). Without
    this, rank 0 would leave and the others would wait at their next collective until the process
    group timed out (30 minutes under gloo)."""
    if not d.enabled:
        return fn()
    result, error, message = None, None, ""
    if d.is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
            message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            message = message or type(e).__name__  # never empty: "" means success below
    message = broadcast_text(message, d)  # the others wait here, as at a barrier, until rank 0 is done
    if error is not None:
        raise error
    if message:
        raise MainRankError(message)
    return result


def barrier(d: Dist) -> None:
    if not d.enabled:
        return
    if d.device.type == "cuda":  # NCCL's barrier runs on a device: name it rather than let it guess
        _dist().barrier(device_ids=[d.device.index])
    else:
        _dist().barrier()


def whiten(x: torch.Tensor, mask: torch.Tensor, d: Dist, eps: float = 1e-8) -> torch.Tensor:
    """``functional.whiten`` with the masked mean and (Bessel-corrected) variance over all ranks."""
    from ppomax import functional as F

    if not d.enabled:
        return F.whiten(x, mask, eps=eps)
    s = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]).double(), d)
    mean = (s[0] / s[1].clamp(min=1.0)).to(x.dtype)
    sq = all_reduce_sum((((x - mean) ** 2) * mask).sum().double().reshape(1), d)[0]
    n = s[1]
    var = (sq / n.clamp(min=1.0)) * (n / (n - 1) if n > 1 else 1.0)
    return (x - mean) * torch.rsqrt(var.to(x.dtype) + eps) * mask
