"""The ``hf`` engine's decode loop as a captured CUDA graph over a static KV cache
(``--rollout_cuda_graph``, issue 22).

Why: before this decoder, a decode step of a 0.82 B Llama at batch 64 took 13.7 ms on an H200 (the
project's GPU notes, issue 22), while reading its bf16 weights once takes about 0.4 ms: the step is
bound by launching a few hundred small kernels from Python. A CUDA graph launches them all at once.

One ``generate`` call (B prompts of width P, N new tokens):

1. The prompts are left-padded to P' (P rounded up to ``prompt_bucket``), so that PPO's batches of
   varying prompt width share a few graphs; a real token's outputs do not depend on extra masked
   padding (up to float rounding of the attention sums).
2. The prefill runs eagerly into transformers' ``StaticCache`` of P' + N positions (reset in place;
   its write position is a device tensor, so a replayed step writes the right slot).
3. Token 0 is sampled eagerly from the prefill's logits (``ppomax.ppo.sampling.sample_step``).
4. Tokens 1 … N−1: one captured step per token, replayed: the forward of the last token at its
   position, then ``sample_step`` (temperature, every EOS id, per-row stop, log π_old), all on
   static tensors updated in place; the column being written is a device counter.
5. With ``stop_at_eos`` the host checks after each step whether every row has ended, as the eager
   loop does, so the random stream advances by the same draws.

Random numbers: ``torch.rand`` inside the graph draws from the CUDA generator's graph-safe Philox
state: each replay reads the generator's current offset and advances it by what the captured step
consumed (torch/cuda/graphs.py; at::CUDAGeneratorImpl's capture_prologue / replay_prologue), as the
eager calls would. Autocast's weight-cast cache is off during capture (a cached cast made before
the capture would be freed under the graph; torch.cuda.make_graphed_callables requires the same),
so fp32 weights are cast inside the graph at every step: ``--rollout_bf16_weights`` (engines/hf.py)
removes those casts.

Where a graph cannot be used (no CUDA device, a model whose cache cannot be static, a sharded
policy, a failed capture) the decoder says why once (logger ``ppomax``, WARNING) and runs
``ppomax.ppo.rollout.generate``, today's eager loop. ``capture=False`` runs steps 1–5 without a
graph: the CPU tests compare exactly that code against the eager loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ppomax import compat, sharding
from ppomax.engines.base import Sampling
from ppomax.models import position_ids_from_mask
from ppomax.ppo import rollout
from ppomax.ppo.sampling import DecodeBuffers, finish, sample_step

logger = logging.getLogger("ppomax")


@dataclass
class StaticStep:
    """One decode step's static tensors (and its captured graph) for one (B, P', N, sampling) key."""

    cache: object  # transformers StaticCache of P' + N positions
    cache_kw: dict  # {"cache": cache} or {"past_key_values": cache}: decided once, outside any trace
    attn: torch.Tensor  # (B, P' + N) long: the prompt mask, then ones
    tok_in: torch.Tensor  # (B, 1) long: the token the next step feeds in
    pos: torch.Tensor  # (B, 1) long: its position id
    col: torch.Tensor  # (1,) long: the response column the next step writes
    eos: torch.Tensor | None  # (E,) long
    buf: DecodeBuffers
    graph: object = None  # torch.cuda.CUDAGraph once captured

    def state(self) -> list[torch.Tensor]:
        """Everything a step changes, except the K/V slots beyond the cache position (masked until written)."""
        b = self.buf
        out = [self.tok_in, self.pos, self.col, b.tokens, b.mask, b.finished, b.ended_with_eos]
        out += [layer.cumulative_length for layer in self.cache.layers]
        return out + ([b.logps] if b.logps is not None else [])


class GraphDecoder:
    """Samples like ``rollout.generate`` with each decode step replayed from a captured CUDA graph.

    ``capture``: capture graphs (CUDA only); False runs the same static-cache steps eagerly.
    ``prompt_bucket``: prompt widths are padded up to a multiple of it (fewer graphs to capture).
    ``max_graphs``: captured graphs kept (least recently used dropped; each holds a KV cache).
    ``compile_step``: the step's forward through torch.compile (``--torch_compile``) before capture.
    """

    def __init__(self, capture: bool = True, prompt_bucket: int = 32, max_graphs: int = 4,
                 compile_step: bool = False) -> None:
        self.capture, self.prompt_bucket, self.max_graphs = capture, prompt_bucket, max_graphs
        self.compile_step = compile_step
        self.steps: OrderedDict[tuple, StaticStep] = OrderedDict()
        self.fallback: str | None = None  # why this decoder now always runs the eager loop
        self.told: set[str] = set()
        self.counts = {"captures": 0, "replays": 0, "static_steps": 0, "eager_calls": 0}
        self._pool = None

    def _tell(self, reason: str) -> None:
        if reason not in self.told:  # one warning per reason, not one per rollout
            self.told.add(reason)
            logger.warning("rollout_cuda_graph: %s: decoding with the eager loop", reason)

    def why_not(self, model, device: torch.device) -> str | None:
        """Why this model cannot decode through a captured graph here, or None."""
        if self.fallback:
            return self.fallback
        if self.capture and device.type != "cuda":
            return f"CUDA graphs need a CUDA device, the prompts are on {device.type}"
        if sharding.is_sharded(model):
            return "the policy is sharded (FSDP2); its all-gathers cannot be captured"
        return None

    @torch.no_grad()
    def generate(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, s: Sampling,
                 return_logprobs: bool = False) -> tuple[torch.Tensor, ...]:
        """As ``rollout.generate(model, prompt_ids, prompt_mask, **s, return_logprobs)``."""
        reason = self.why_not(model, prompt_ids.device)
        step = None
        if reason is None:
            step, reason = self._static_step(model, prompt_ids, s, return_logprobs)
        if reason is not None:
            self._tell(reason)
            self.counts["eager_calls"] += 1
            return rollout.generate(model, prompt_ids, prompt_mask, s.max_new_tokens, list(s.eos_token_ids),
                                    s.pad_token_id, s.temperature, s.top_k, s.top_p, stop_at_eos=s.stop_at_eos,
                                    return_logprobs=return_logprobs)
        return self._decode(model, step, prompt_ids, prompt_mask, s)

    # -----------------------------------------------------------------------------------------

    def _key(self, model, device: torch.device, B: int, P: int, s: Sampling, return_logprobs: bool) -> tuple:
        amp = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        # the graph reads the weights at their addresses: new storage (a replaced module) means a new graph
        weights = hash(tuple(p.data_ptr() for p in model.parameters()))
        return (id(model), weights, str(device), B, P, s, return_logprobs, model.training, amp)

    def _static_step(self, model, prompt_ids, s: Sampling, return_logprobs: bool):
        B, P = prompt_ids.shape
        Pb = -(-P // self.prompt_bucket) * self.prompt_bucket
        key = self._key(model, prompt_ids.device, B, Pb, s, return_logprobs)
        if key in self.steps:
            self.steps.move_to_end(key)
            return self.steps[key], None
        cache = rollout.static_kv_cache(model, Pb + s.max_new_tokens)
        if cache is None:
            return None, f"{type(model).__name__} cannot use transformers' StaticCache (sliding-window, hybrid or " \
                         "linear-attention layers, or this transformers has no StaticLayer)"
        while len(self.steps) >= self.max_graphs:
            self.steps.popitem(last=False)
        dev = prompt_ids.device
        attn = torch.ones((B, Pb + s.max_new_tokens), dtype=torch.long, device=dev)
        step = StaticStep(cache, compat.cache_kwargs(model, cache), attn,
                          torch.zeros((B, 1), dtype=torch.long, device=dev), torch.zeros((B, 1), dtype=torch.long, device=dev),
                          torch.zeros(1, dtype=torch.long, device=dev), rollout.eos_tensor(list(s.eos_token_ids), dev),
                          DecodeBuffers.new(B, s.max_new_tokens, s.pad_token_id, dev, return_logprobs))
        self.steps[key] = step
        return step, None

    def _forward(self):
        return rollout.compiled_decode_step() if self.compile_step else rollout.decode_step

    def _step(self, model, st: StaticStep, s: Sampling, check_eos: bool) -> None:
        """One decode step on the static tensors: what the graph captures (steps 4 of the module docstring)."""
        st.pos.add_(1)
        logits = self._forward()(model, st.tok_in, st.attn, st.pos, st.cache_kw)
        st.col.add_(1)
        tok = sample_step(st.buf, logits, st.col, s.temperature, s.top_k, s.top_p, s.pad_token_id, st.eos, check_eos)
        st.tok_in.copy_(tok[:, None])

    def _decode(self, model, st: StaticStep, prompt_ids, prompt_mask, s: Sampling) -> tuple[torch.Tensor, ...]:
        B, P = prompt_ids.shape
        Pb, N = st.attn.shape[1] - s.max_new_tokens, s.max_new_tokens
        check_eos = s.stop_at_eos and st.eos is not None
        ids = torch.nn.functional.pad(prompt_ids, (Pb - P, 0), value=s.pad_token_id)
        mask = torch.nn.functional.pad(prompt_mask, (Pb - P, 0), value=0)
        st.attn[:, :Pb].copy_(mask)
        for layer in st.cache.layers:  # reset in place: the graph holds these tensors
            if layer.is_initialized:
                layer.keys.zero_()
                layer.values.zero_()
                layer.cumulative_length.zero_()
        pos = position_ids_from_mask(mask)
        extra = {"logits_to_keep": 1} if rollout.accepts_logits_to_keep(model) else {}
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **st.cache_kw, use_cache=True, **extra)
        st.buf.reset(s.pad_token_id)
        st.col.zero_()
        st.pos.copy_(pos[:, -1:])
        tok = sample_step(st.buf, out.logits[:, -1, :], st.col, s.temperature, s.top_k, s.top_p, s.pad_token_id,
                          st.eos, check_eos)
        st.tok_in.copy_(tok[:, None])
        del out
        T = N
        if check_eos and bool(st.buf.finished.all()):
            T = 1
        elif N > 1 and self.capture and st.graph is None:
            st.graph = self._capture(model, st, s, check_eos)
        for t in range(1, T):
            if st.graph is not None:
                st.graph.replay()
                self.counts["replays"] += 1
            else:
                self._step(model, st, s, check_eos)
                self.counts["static_steps"] += 1
            if check_eos and bool(st.buf.finished.all()):
                T = t + 1
                break
        return finish(st.buf, T, check_eos, st.eos, copy=True)

    def _capture(self, model, st: StaticStep, s: Sampling, check_eos: bool):
        """Warm up on a side stream (lazy initialisation, torch.compile), restore every state tensor
        and the CUDA random state, then capture one step. None (and a logged reason) on failure: this
        call goes on with the same steps run eagerly, later calls with the eager loop."""
        dev = st.attn.device
        amp = torch.is_autocast_enabled("cuda")
        no_cache = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) if amp
                    else contextlib.nullcontext())
        saved, rng = [t.clone() for t in st.state()], torch.cuda.get_rng_state(dev)
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), no_cache:
                for _ in range(2):
                    self._step(model, st, s, check_eos)
            torch.cuda.current_stream(dev).wait_stream(side)
            for t, v in zip(st.state(), saved):
                t.copy_(v)
            torch.cuda.set_rng_state(rng, dev)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with no_cache, torch.cuda.graph(graph, pool=self._pool, stream=side):
                self._step(model, st, s, check_eos)
            self.counts["captures"] += 1
            return graph
        except Exception as e:  # a host sync or an uncapturable op inside the model's forward, ...
            self.fallback = f"capturing the decode step of {type(model).__name__} failed ({type(e).__name__}: " \
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
            self._tell(self.fallback)
            torch.cuda.synchronize(dev)  # an error that poisons the CUDA context surfaces here, not later
            for t, v in zip(st.state(), saved):
                t.copy_(v)
            torch.cuda.set_rng_state(rng, dev)
            return None

    def close(self) -> None:
        self.steps.clear()
        self._pool = None
