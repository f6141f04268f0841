"""Sharded data parallelism (ZeRO-2 / ZeRO-3 style) with PyTorch FSDP2 (``fully_shard``).

``--sharding none`` (default) keeps a full copy of every model on each rank (distributed.py).
``zero2`` and ``zero3`` shard parameters, gradients and optimizer state across ranks:

=========  ==========================================  ==============================================
mode       trained models (policy, critic; SFT / RM)   frozen models (π_ref, reward model)
=========  ==========================================  ==============================================
``zero2``  sharded at rest; kept whole from forward to  full copy on every rank (ZeRO-2 never shards
           backward (FSDP ``SHARD_GRAD_OP``)            what has no gradients or optimizer state)
``zero3``  re-sharded after every forward (FSDP         sharded too, gathered layer by layer for each
           ``FULL_SHARD``): least memory                 forward
=========  ==========================================  ==============================================

Each transformer block is its own FSDP unit (the classes named in the model's
``_no_split_modules``, as accelerate's auto-wrap policy uses), then the root (embeddings, final
norm, LM / scalar head). The trainers keep the exact reduction of distributed.py: token losses
are divided by the global token count and FSDP's reduce-scatter **sums** gradients (divide
factor 1), so a sharded step equals the one-process step (tests/test_sharding.py).

Checkpoints stay the ordinary ones: the full state dicts are gathered to rank 0, which writes
the same safetensors directories as an unsharded run; optimizer states are saved keyed by
parameter name, so a sharded run resumes with any number of processes (or one). GPUs: launch with
``accelerate launch --config_file examples/accelerate/fsdp_zero3.yaml`` (read here from the
``FSDP_*`` environment accelerate sets) or ``torchrun ... --sharding zero3``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ppomax.errors import UserError

logger = logging.getLogger("ppomax")

MODES = ("none", "zero2", "zero3")

# accelerate's FSDP sharding strategies (names and the integers of its older configs) -> mode
_ACCELERATE_STRATEGY = {"FULL_SHARD": "zero3", "1": "zero3", "SHARD_GRAD_OP": "zero2", "2": "zero2",
                        "NO_SHARD": "none", "3": "none"}


def resolve_mode(requested: str, world_size: int) -> str:
    """The sharding mode to use: ``requested``, or the one an ``accelerate launch`` FSDP config set.

    (A DeepSpeed launch is refused earlier, by distributed.setup, with the FSDP equivalent.)
    """
    env = os.environ
    mode = requested
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and requested == "none":
        if env.get("FSDP_VERSION", "1") == "2" and "FSDP_RESHARD_AFTER_FORWARD" in env:
            mode = "zero3" if env["FSDP_RESHARD_AFTER_FORWARD"].lower() == "true" else "zero2"
        else:
            strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
            if strategy not in _ACCELERATE_STRATEGY:
                raise UserError(f"accelerate FSDP sharding strategy {strategy} is not supported by ppomax "
                                f"(use FULL_SHARD or SHARD_GRAD_OP)")
            mode = _ACCELERATE_STRATEGY[strategy]
        if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            raise UserError("accelerate FSDP config: fsdp_offload_params is not supported by ppomax; set it to false")
        logger.info("accelerate FSDP config: sharding = %s", mode)
    if mode not in MODES:
        raise UserError(f"sharding = {mode!r} is invalid: allowed {', '.join(MODES)}")
    if mode != "none" and world_size == 1:
        logger.info("sharding = %s with one process: nothing to shard, running unsharded", mode)
        return "none"
    return mode


def _layer_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shards(mode: str, trainable: bool) -> bool:
    """Whether ``mode`` shards a trained (policy, critic) or frozen (π_ref, reward) model."""
    return mode == "zero3" or (mode == "zero2" and trainable)


def shard(model: nn.Module, mode: str, trainable: bool, device: torch.device | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (blocks, then the root); a no-op unless :func:`shards`.

    Call it on the model still on the host (FSDP2 moves each unit to the device as it shards it,
    so a GPU never holds the whole model) and before building the optimizer. ``device``: the
    process's device (distributed.Dist.device); FSDP2's own default is CUDA whenever it exists,
    which ``--device cpu`` on a GPU machine must not get."""
    if not shards(mode, trainable):
        return model
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if device is not None else None

    classes = _layer_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if not blocks:
        logger.warning("%s: no transformer block classes found (_no_split_modules); sharding it as one unit",
                       type(model).__name__)
    reshard = mode == "zero3"
    # ScalarHeadModel returns its (B, T) scores as a view (squeeze); FSDP2 warns that an in-place op
    # on it would skip a hook. ppomax only slices, indexes and multiplies them out of place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in ("hidden_states", "score_hidden", "lm_logits"):  # ScalarHeadModel entry points besides forward
        if callable(getattr(model, name, None)) and (name != "lm_logits" or hasattr(model, "lm_head_for_training")):
            register_fsdp_forward_method(model, name)
    release_host_memory()
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)  # sum over ranks: losses are already global token means
        m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        m._ppomax_reshard = reshard  # restored by gathered()
    return model


def is_skeleton(model: nn.Module | None) -> bool:
    """True when the model was built on the meta device (models.skeleton_loading)."""
    return model is not None and any(p.is_meta for p in model.parameters())


def fill_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """After :func:`shard`: every rank's shards (and buffers) from rank 0's full copy. Collective.

    ``full_state`` is rank 0's ``state_dict()`` taken before sharding (None on the other ranks,
    whose model is a meta-device skeleton). Buffers that are not in a state dict (RoPE's
    ``inv_freq``) are broadcast as well."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if full_state is None:
        model.to_empty(device=device)
    set_model_state_dict(model, full_state or {}, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=False))
    for _, buf in model.named_buffers():
        if not hasattr(buf, "to_local"):
            dist.broadcast(buf, src=0)


def release_host_memory() -> None:
    """Hand the freed full-size host copies back to the OS (glibc keeps freed pages otherwise, so
    the process would look as large as before sharding)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module | None) -> bool:
    if model is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def class_name(model: nn.Module) -> str:
    """The model's own class name (FSDP2 swaps in a subclass named ``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c.__name__ for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Keep a sharded model's parameters whole for a sequence of forwards (generation: one
    all-gather for the whole decode instead of one per layer per token); re-shard afterwards."""
    mods = fsdp_modules(model)
    if not mods:
        yield
        return
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(_reshard_default(m))


def _reshard_default(m) -> bool:
    return bool(getattr(m, "_ppomax_reshard", True))


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Global L2 norm of the gradients (over every rank's shards), clipped to ``max_norm`` when set."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sq = torch.stack([local(g).detach().float().pow(2).sum() for g in grads]).sum()
    if any(hasattr(g, "to_local") for g in grads):
        import torch.distributed as dist

        dist.all_reduce(sq)
    total = sq.sqrt()
    if max_norm is not None and torch.isfinite(total):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for g in grads:
            local(g).mul_(coef.to(g.dtype))
    return float(total)


def all_finite(model: nn.Module) -> bool:
    """True when every trained parameter of this rank's shards is finite (the caller reduces over ranks).

    Frozen parameters (a LoRA base) are skipped: no update touches them, and scanning 135M frozen
    weights cost ~0.4 s per model per iteration on one CPU thread (SmolLM2 benchmark, issue #13)."""
    flags = [torch.isfinite(local(p)).all() for p in model.parameters() if p.requires_grad]
    return not flags or bool(torch.stack(flags).all())


# ---------------------------------------------------------------------------------------------
# Checkpoints: full state dicts on rank 0, loaded into shards on every rank
# ---------------------------------------------------------------------------------------------


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on rank 0 (other ranks get {}). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Scatter a full state dict (present on every rank) into the model's shards; returns
    (missing, unexpected) keys like ``load_state_dict(strict=False)``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    res = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(res.missing_keys), list(res.unexpected_keys)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, whole, on rank 0. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed optimizer state (written by :func:`optimizer_state`) into any layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


class GatheredModel:
    """A sharded model's weights gathered for ``checkpoint.save_checkpoint`` (rank 0 writes)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.state = model, full_state_dict(model)
        seen: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:  # a tied weight (LM head = embeddings) is written once, as from_pretrained expects
                self.state.pop(name, None)
            seen.add(id(p))

    def save_pretrained(self, directory, **kwargs) -> None:
        self.model.save_pretrained(directory, state_dict=self.state, **kwargs)


class GatheredOptimizer:
    """A sharded optimizer's state gathered, keyed by parameter name (see :func:`optimizer_state`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.state = optimizer_state(model, optimizer)

    def state_dict(self) -> dict:
        return self.state
