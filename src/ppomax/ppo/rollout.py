"""Rollout: sample responses with the policy, then score them and compute everything PPO needs.

Shapes: B = prompts in the batch, P = prompt length (left-padded), T = response length
(right-padded), V = vocabulary. The full sequence is ``[prompt | response]`` of length P + T;
the logits that predict response token t sit at position P + t − 1.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from ppomax import compat
from ppomax import functional as F
from ppomax.models import position_ids_from_mask
from ppomax.ppo.sampling import DecodeBuffers, finish, sample_step


@dataclass
class Experience:
    """One experience buffer (rollout batch). Every tensor's first dimension is B."""

    prompt_ids: torch.Tensor  # (B, P) long, left-padded prompt tokens
    prompt_mask: torch.Tensor  # (B, P) long, 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) long, right-padded sampled tokens (EOS included)
    mask: torch.Tensor  # (B, T) float, 1 on response tokens up to and including EOS
    truncated: torch.Tensor  # (B,) bool, hit the length cap without EOS
    logprobs: torch.Tensor  # (B, T) log π_old(a_t|s_t) at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(a_t|s_t) at the same temperature
    values: torch.Tensor  # (B, T) V_old(s_t)
    scores: torch.Tensor  # (B,) raw reward-model / reward_fn score r(x, y)
    processed_scores: torch.Tensor | None = None  # (B,) r̃ after normalisation, clipping, missing-EOS penalty
    rewards: torch.Tensor | None = None  # (B, T) shaped token rewards: −η·KL_t (+ r̃ at the last token)
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate to π_ref (the shaping estimator)
    advantages: torch.Tensor | None = None  # (B, T) GAE Â_t
    returns: torch.Tensor | None = None  # (B, T) R_t = Â_t + V_t

    def index(self, idx: torch.Tensor) -> Experience:
        """A sub-batch (e.g. a mini-batch) with the same fields."""
        return Experience(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                             for f in fields(self)})

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.prompt_mask, self.mask.long()], dim=1)


def cat_padded(chunks: list[tuple], pad_id: int) -> list[torch.Tensor]:
    """Concatenate rollout chunks whose prompt (left-padded) / response (right-padded) widths differ."""
    P = max(c[0].shape[1] for c in chunks)
    T = max(c[2].shape[1] for c in chunks)
    out = [[] for _ in range(len(chunks[0]))]
    for c in chunks:
        p_ids, p_mask, resp, mask, trunc, logp, ref_logp, values, scores = c
        lp, rt = P - p_ids.shape[1], T - resp.shape[1]
        out[0].append(torch.nn.functional.pad(p_ids, (lp, 0), value=pad_id))
        out[1].append(torch.nn.functional.pad(p_mask, (lp, 0), value=0))
        out[2].append(torch.nn.functional.pad(resp, (0, rt), value=pad_id))
        for j, x in ((3, mask), (5, logp), (6, ref_logp), (7, values)):
            out[j].append(torch.nn.functional.pad(x, (0, rt), value=0.0))
        out[4].append(trunc)
        out[8].append(scores)
    return [torch.cat(x, dim=0) for x in out]


# ---------------------------------------------------------------------------------------------
# KV caches (the per-step sampling and its bookkeeping: ppomax.ppo.sampling)
# ---------------------------------------------------------------------------------------------


def _preallocated_kv_cache(model, max_len: int):
    """A ``DynamicCache`` whose layers write into tensors preallocated for ``max_len`` positions.

    The stock ``DynamicLayer`` grows by ``torch.cat`` every step (a full copy of every layer's K/V
    per token, ~25 % of CPU generation time for a small model); these layers copy only the new
    token and hand attention a view of the filled part, so the attention inputs are the same
    values. Returns None (the caller lets the model make its own cache) when the installed
    transformers lacks this API or the model's cache is not plain full attention (sliding window,
    hybrid, linear attention, ...).
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=model.config)
    except Exception:  # older/newer transformers, or a config the cache cannot read
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None

    class _PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.dtype, self.device = key_states.dtype, key_states.device
                B, H, _, dk = key_states.shape
                self._k = key_states.new_empty((B, H, max_len, dk))
                self._v = value_states.new_empty((B, H, max_len, value_states.shape[-1]))
                self._len = 0
                self.is_initialized = True
            n, s = key_states.shape[-2], self._len
            self._k[:, :, s : s + n].copy_(key_states)
            self._v[:, :, s : s + n].copy_(value_states)
            self._len = s + n
            self.keys, self.values = self._k[:, :, : s + n], self._v[:, :, : s + n]
            return self.keys, self.values

    cache.layers = [_PreallocatedLayer() for _ in cache.layers]
    return cache


# ---------------------------------------------------------------------------------------------
# torch.compile (issue #5): opt-in through PPOConfig.torch_compile
# ---------------------------------------------------------------------------------------------


# torch.compile's options for everything ppomax compiles (the decode step and the rollout / training
# forwards). Empty: inductor, default mode. tests/test_compile.py sets fullgraph=True with the eager
# backend, so any graph break fails CI.
COMPILE_OPTIONS: dict = {}


def maybe_compile(fn, enabled: bool):
    """``fn`` itself, or ``fn`` through ``torch.compile`` (torch.compile, issue #5). Compilation is lazy
    (on the first call) and per input signature: a model, train/eval mode, grad mode, autocast and the
    input shapes; a second set of shapes recompiles once with dynamic sizes (dynamo's automatic dynamic
    shapes), so batches whose prompt / response lengths vary cost two compiles, not one per length.

    What depends on the model's class (does its forward take ``logits_to_keep``) is read here, outside
    the traced function, and passed in as a constant: dynamo cannot call ``inspect`` on a module
    argument (torch 2.11 raised ``AsPythonConstantNotImplementedError`` on ``assume_constant_result``).
    """
    if not enabled:
        return fn
    compiled = torch.compile(fn, **COMPILE_OPTIONS)
    takes_flag = "takes_logits_to_keep" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        if takes_flag:
            kwargs.setdefault("takes_logits_to_keep", accepts_logits_to_keep(model))
        return compiled(model, *args, **kwargs)

    return call


def static_kv_cache(model, max_len: int):
    """transformers' ``StaticCache`` for ``max_len`` positions, or None when this transformers or this
    model cannot use one (the caller then decodes eagerly with the preallocated dynamic cache).

    A static cache keeps every decode step's shapes fixed (keys and values always ``max_len`` long,
    the not yet written positions masked out by the causal mask), which is what a compiled decode
    step and a captured CUDA graph (``ppomax.engines.graph_decode``) need: one graph for the whole
    response instead of one per context length.
    """
    try:
        from transformers.cache_utils import StaticCache, StaticLayer

        cache = StaticCache(config=model.config, max_cache_len=max_len)
    except Exception:  # older/newer transformers, or a config the cache cannot read
        return None
    if not cache.layers or any(type(layer) is not StaticLayer for layer in cache.layers):
        return None  # sliding-window / hybrid caches: not worth the risk
    layer_cls = _casting_static_layer(StaticLayer)
    cache.layers = [layer_cls(max_cache_len=max_len) for _ in cache.layers]
    return cache


@functools.cache  # one class: the compiled step guards on the cache layers' type
def _casting_static_layer(static_layer: type) -> type:
    class _CastingStaticLayer(static_layer):
        # StaticLayer allocates keys and values in the keys' dtype; under autocast the keys come out of
        # RoPE in fp32 and the values in bf16 (and a compiled step may differ from the eager prefill):
        # store everything in the cache's dtype, as the eager path's copy_ does.
        def update(self, key_states, value_states, *args, **kwargs):
            dtype = self.keys.dtype if self.is_initialized else key_states.dtype
            return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)

    return _CastingStaticLayer


def decode_step(model, tok, attn, pos, cache_kw: dict):
    """One decode step: next-token logits (B, V) for tokens (B, 1) at positions ``pos`` (B, 1).

    ``cache_kw``: ``compat.cache_kwargs(model, cache)``, built by the caller outside any compiled
    function (``cache=`` or ``past_key_values=``, whichever this model's forward takes).
    """
    return model(input_ids=tok, attention_mask=attn, position_ids=pos, **cache_kw, use_cache=True).logits[:, -1, :]


_compiled_steps: dict = {}


def compiled_decode_step():
    """``decode_step`` through torch.compile with COMPILE_OPTIONS (one compiled function per options)."""
    key = tuple(sorted(COMPILE_OPTIONS.items()))
    if key not in _compiled_steps:
        _compiled_steps[key] = torch.compile(decode_step, **COMPILE_OPTIONS)
    return _compiled_steps[key]


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (LM head on the last N positions only).
    Reads the forward's signature: not for calling inside a compiled function (see ``maybe_compile``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers pass kwargs on
    return _forward_takes(type(base), "logits_to_keep")


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    try:  # wrappers without a forward (e.g. a callable that disables LoRA adapters) just say no
        return name in inspect.signature(cls.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def eos_tensor(ids: int | Sequence[int] | None, device) -> torch.Tensor | None:
    """EOS id(s) as a 1-D long tensor (for ``sampling.is_eos``), or None when there is none."""
    if ids is None:
        return None
    ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_at_eos: bool = True,
    return_logprobs: bool = False,
    compile: bool = False,
) -> tuple[torch.Tensor, ...]:
    """KV-cache sampling loop over a left-padded prompt batch.

    ``eos_token_id``: one id or several (chat models end a turn and the text with different ids,
    listed in ``generation_config.eos_token_id``; ``ppomax.models.eos_token_ids`` collects them):
    a response ends at the first of any of them.

    Returns (response_ids (B, T) right-padded with pad, mask (B, T) float, truncated (B,) bool:
    no EOS among the sampled tokens),
    and with ``return_logprobs`` also log π(a_t|s_t) (B, T) of the sampled tokens under the full
    temperature-scaled softmax of the sampling logits (what ``response_logprobs`` computes with a
    second forward; equal to float rounding: ~1e-6 in fp32, ~1e-2 under bf16 autocast).
    Written out instead of ``model.generate`` so that sampling and the PPO log-probs use one
    distribution (temperature-scaled softmax) and position ids match the training forward.
    Per-token work is kept to the model call and the sampling (``ppomax.ppo.sampling.sample_step``,
    which the CUDA-graph decoder runs too): the attention mask and the KV cache are preallocated (no
    per-step ``torch.cat``), the prefill computes logits for the last position only, and without
    ``stop_at_eos`` there is no per-step finished check.

    ``compile=True`` (torch.compile, issue #5) runs the decode steps through ``torch.compile`` with
    transformers' static KV cache (fixed shapes: one graph per prompt + response length, then one
    dynamic graph); the prefill and the sampling stay eager, so the random stream and the sampled
    tokens are those of the eager path up to float rounding of the logits (~1e-6 in fp32). Models
    whose cache cannot be static (sliding window, hybrid, ...) decode eagerly.
    """
    B, P = prompt_ids.shape
    device = prompt_ids.device
    # The full [prompt | response] mask up front; step t sees the view attn[:, : P + t + 1].
    attn = torch.cat([prompt_mask, prompt_mask.new_ones((B, max_new_tokens))], dim=1)
    pos = position_ids_from_mask(prompt_mask)
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    past = static_kv_cache(model, P + max_new_tokens) if compile else None
    # static cache: every step sees the full mask (the unwritten positions are causally masked)
    static_step = compiled_decode_step() if past is not None else None
    if past is None:
        past = _preallocated_kv_cache(model, P + max_new_tokens)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, **compat.cache_kwargs(model, past),
                use_cache=True, **extra)
    past = compat.output_cache(out)
    next_logits = out.logits[:, -1, :]
    last_pos = pos[:, -1:]
    buf = DecodeBuffers.new(B, max_new_tokens, pad_token_id, device, return_logprobs)
    cols = torch.arange(max_new_tokens, device=device)
    eos = eos_tensor(eos_token_id, device)
    check_eos = stop_at_eos and eos is not None
    T = max_new_tokens
    for t in range(max_new_tokens):
        tok = sample_step(buf, next_logits, cols[t : t + 1], temperature, top_k, top_p, pad_token_id, eos, check_eos)
        if check_eos and bool(buf.finished.all()):
            T = t + 1
            break
        if t == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        if static_step is not None:
            next_logits = static_step(model, tok[:, None], attn, last_pos, compat.cache_kwargs(model, past))
            continue
        out = model(input_ids=tok[:, None], attention_mask=attn[:, : P + t + 1], position_ids=last_pos,
                    **compat.cache_kwargs(model, past), use_cache=True)
        past = compat.output_cache(out)
        next_logits = out.logits[:, -1, :]
    return finish(buf, T, check_eos, eos)


# ---------------------------------------------------------------------------------------------
# Forward passes over [prompt | response]
# ---------------------------------------------------------------------------------------------


def response_logits(model, prompt_ids, prompt_mask, response_ids, mask,
                    takes_logits_to_keep: bool | None = None) -> torch.Tensor:
    """Logits (B, T, V) predicting each response token (positions P−1 … P+T−2 of the sequence).

    ``takes_logits_to_keep``: whether the model's forward takes ``logits_to_keep`` (None: ask it;
    compiled callers decide outside the trace, see ``maybe_compile``)."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, mask.long()], dim=1)
    T = response_ids.shape[1]
    # The LM head runs on the last T + 1 positions only (P−1 … P+T−1), not on the prompt: with a
    # large vocabulary it is a third of a small model's forward and backward.
    if takes_logits_to_keep is None:
        takes_logits_to_keep = accepts_logits_to_keep(model)
    extra = {"logits_to_keep": T + 1} if takes_logits_to_keep else {}
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False,
                **extra)
    return out.logits[:, -(T + 1) : -1, :]


# Causal LMs whose forward is exactly ``lm_head(<decoder>(...).last_hidden_state)`` with a plain
# ``nn.Linear`` head (transformers 5.24's modeling code, read for each): the attribute holding the
# decoder. Anything else (softcapped or scaled logits: Gemma 2, Cohere; unknown classes) runs the
# full causal LM.
_HEAD_ON_HIDDEN = {
    ("transformers.models.llama.modeling_llama", "LlamaForCausalLM"): "model",  # SmolLM2 too
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"): "model",
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM"): "model",
    ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM"): "model",
    ("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel"): "transformer",
}


def _decoder_and_head(model):
    """(decoder, lm_head) when log π can be computed from the decoder's last hidden states with
    :func:`ppomax.functional.chunked_logprobs` and equal the full forward's, else None.

    None (the plain path) for: a trace by torch.compile (``maybe_compile``: dynamo would have to
    trace a Python chunk loop inside a custom autograd Function; the compiled graph fuses the head
    its own way), a peft wrapper other than LoRA, a class not in ``_HEAD_ON_HIDDEN`` (this also
    catches FSDP2's ``FSDP<Name>`` classes and DDP-style wrappers, whose forward does work that
    calling the decoder would skip), softcapped / scaled logits, a head that is not a plain
    ``nn.Linear`` (LoRA or ``modules_to_save`` on the head, quantised layers), a weight that is not
    a plain parameter (DTensor shards), and forward hooks on the model or the head (accelerate
    offloading, user hooks), which calling ``lm_head.weight`` directly would bypass. A model
    wrapped by ``torch.compile(model)`` is an ``OptimizedModule``, not in the table either. Tied
    embeddings need nothing special: both paths read the same ``lm_head.weight``, and autograd
    adds the head's and the embedding's gradients into it alike.
    """
    if torch.compiler.is_compiling():
        return None
    from ppomax.models import is_peft_model

    base = model
    if is_peft_model(model):
        cfg = model.active_peft_config
        if str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA" or cfg.is_prompt_learning:
            return None
        base = model.get_base_model()
    attr = _HEAD_ON_HIDDEN.get((type(base).__module__, type(base).__qualname__))
    if attr is None:
        return None
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        return None
    head, decoder = base.get_output_embeddings(), getattr(base, attr, None)
    if type(head) is not torch.nn.Linear or decoder is None or type(head.weight) is not torch.nn.Parameter:
        return None
    for m in {id(x): x for x in (model, base, head)}.values():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return None
    return decoder, head


def _response_hidden(decoder, prompt_ids, prompt_mask, response_ids, mask) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H) at the positions predicting each response token
    (P−1 … P+T−2), with the inputs and position ids of :func:`response_logits`."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, mask.long()], dim=1)
    out = decoder(input_ids=input_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    return out.last_hidden_state[:, P - 1 : P + T - 1]


def response_logprobs(model, exp_or_parts, temperature: float, with_entropy: bool = False, entropy_grad: bool = True,
                      chunked: bool = True, takes_logits_to_keep: bool | None = None):
    """log π(a_t|s_t) (B, T) at ``temperature`` (and the entropy (B, T) if asked).

    ``entropy_grad=False`` computes the entropy as a detached statistic (no full-vocabulary
    softmax kept for the backward pass), for when no entropy bonus enters the loss.

    ``chunked`` (issue #13): for the architectures of ``_HEAD_ON_HIDDEN`` (see
    ``_decoder_and_head``) the LM head runs inside :func:`ppomax.functional.chunked_logprobs` on
    the decoder's hidden states, so neither this forward nor its backward keeps the (B, T, V)
    logits; the values and gradients equal the plain path's to float rounding. ``chunked=False``
    (and every other model) runs the full causal LM and the log-softmax on its logits.
    ``takes_logits_to_keep``: as in ``response_logits`` (``maybe_compile`` passes it in).
    """
    prompt_ids, prompt_mask, response_ids, mask = exp_or_parts
    found = _decoder_and_head(model) if chunked else None
    if found is not None:
        decoder, head = found
        hidden = _response_hidden(decoder, prompt_ids, prompt_mask, response_ids, mask)
        out = F.chunked_logprobs(hidden, head.weight, response_ids, temperature, bias=head.bias,
                                 with_entropy=with_entropy)
        if with_entropy and not entropy_grad:
            return out[0], out[1].detach()
        return out
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, mask, takes_logits_to_keep) / temperature
    logp = F.logprobs_from_logits(logits, response_ids)
    if with_entropy:
        if entropy_grad:
            return logp, F.entropy_from_logits(logits)
        with torch.no_grad():
            return logp, F.entropy_from_logits(logits.detach())
    return logp


def response_values(critic, prompt_ids, prompt_mask, response_ids, mask) -> torch.Tensor:
    """V(s_t) (B, T): the critic's score at the position that predicts response token t."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, mask.long()], dim=1)
    v = critic(input_ids=input_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn))
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    return v[:, P - 1 : P + T - 1]


def reward_model_scores(reward_model, prompt_ids, prompt_mask, response_ids, mask) -> torch.Tensor:
    """r(x, y) (B,): the reward model's score at the last response token (paper Sec. 4)."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, mask.long()], dim=1)
    s = reward_model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn))
    last = prompt_ids.shape[1] + F.last_token_index(mask)
    return s[torch.arange(s.shape[0], device=s.device), last]
