"""Data parallelism across processes for PPO: ranks, reductions, and gradient all-reduce.

Launch with ``accelerate launch --multi_gpu --num_processes N -m ppomax ppo ...`` (on a CPU-only
machine this starts N gloo processes) or ``torchrun --nproc_per_node N -m ppomax ppo ...``; the
launcher sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` and :func:`setup` joins the process group
(gloo on CPU, nccl on GPUs). Without those variables everything here is a no-op (world size 1).

Every rank holds full copies of the models (plain data parallelism, like DDP). The trainer
keeps the reduction exact instead of averaging per-rank means (OpenRLHF's rule, STYLE.md):
each rank divides its token losses by the **global** token count of the mini-batch, and the
gradients are **summed** across ranks, so the update equals the one-process update on the union
of the ranks' batches (tests/test_distributed.py checks this). Advantage whitening uses global
masked moments and the reward-normalisation moments see every rank's scores.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("ppomax")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """Join the process group if launched with ``WORLD_SIZE > 1``; return this process's rank."""
    from ppomax.errors import UserError

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # refuse rather than run unsharded
        raise UserError("ppomax shards with PyTorch FSDP2, not a DeepSpeed engine: for ZeRO-2 / ZeRO-3 use "
                        "`--sharding zero2|zero3` or examples/accelerate/fsdp_zero2.yaml / fsdp_zero3.yaml "
                        "(see examples/README.md)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_ADDR"):
            logger.warning("`accelerate launch --cpu` started a single process (multi-CPU needs mpirun); for N "
                           "processes on CPU use `accelerate launch --multi_gpu --num_processes N` (gloo) or torchrun")
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        import atexit

        atexit.register(shutdown)  # before interpreter teardown, whatever the exit path
    d = Dist(dist.get_rank(), dist.get_world_size())
    logger.info("process group: rank %d of %d (%s)", d.rank, d.world_size, dist.get_backend())
    return d


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
    """Sum of ``x`` over ranks (a new tensor; ``x`` itself on one process)."""
    if not d.enabled:
        return x
    y = x.detach().clone()
    _dist().all_reduce(y)
    return y


def all_gather(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0 (rank order)."""
    if not d.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    _dist().all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def reduce_floats(values: dict[str, float], d: Dist, op: str = "mean") -> dict[str, float]:
    """Sum, mean or max of each float over ranks (every rank must pass the same keys in the same order)."""
    if not d.enabled or not values:
        return values
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX if op == "max" else _dist().ReduceOp.SUM)
    if op == "mean":
        t /= d.world_size
    return dict(zip(keys, t.tolist()))


def sum_gradients(params, d: Dist) -> None:
    """All-reduce (sum) the gradients of ``params`` in one flat buffer.

    A gradient missing on a rank counts as 0; one missing on every rank stays None (as on one
    process, so AdamW skips that parameter).
    """
    if not d.enabled:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [has_grad.to(params[0].device)])
    _dist().all_reduce(flat)
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if flat[-len(params) + i] > 0:
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def broadcast_parameters(module: torch.nn.Module, d: Dist) -> None:
    """Copy rank 0's trainable parameters to every rank (fresh heads and LoRA matrices are random)."""
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
    t = torch.tensor([s, -s], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    if t[0].item() != -t[1].item():
        from ppomax.errors import UserError

        raise UserError(f"the processes start from different {what} weights; build the models from the same "
                        "seed on every rank")


def gather_rng_states(d: Dist) -> dict[str, torch.Tensor]:
    """Every rank's torch generator states, for rank 0 to store (``torch_cpu_rank<r>``, and
    ``torch_cuda_rank<r>`` for the rank's current GPU), so that a resumed multi-process run
    continues each rank's sampling stream exactly. Collective; {} on one process."""
    if not d.enabled:
        return {}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    out = {}
    states = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state()
    for name, st in states.items():
        for r, x in enumerate(all_gather(st.to(device).unsqueeze(0), d)):
            if r > 0:
                out[f"{name}_rank{r}"] = x.cpu()
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
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
