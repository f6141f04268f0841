"""The few transformers / peft API names that differ across the tested range (pyproject).

transformers renamed the KV-cache argument and output field ``past_key_values`` to ``cache`` and
``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old names warn
and go away: ``deprecate_kwarg(..., "5.40.0")`` on the forwards, "will be removed in v6" on the
checkpointing alias, see transformers/utils/generic.py and modeling_utils.py). ppomax must also
run on transformers 5.19, the newest vLLM 0.32 accepts, which only has the old names. Each helper
asks the model (or the output) which name it has, never the version string: a model class from
remote code can lag behind the library it runs on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
from typing import Any


def _base(model: Any) -> Any:
    # peft's PeftModel.forward takes **kwargs and passes them on: the base model's forward
    # declares the names it accepts.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    try:  # inspect.signature follows the __wrapped__ of transformers' deprecate_kwarg decorators
        return frozenset(inspect.signature(cls.forward).parameters)
    except (AttributeError, TypeError, ValueError):  # a callable wrapper without a forward
        return frozenset()


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else frozenset()


@functools.cache
def _library_says_cache() -> bool:
    """Whether the installed transformers calls the KV cache ``cache`` (its causal-LM output field)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" in _field_names(CausalLMOutputWithPast)


def takes_cache_kwarg(model: Any) -> bool:
    """True when the model's forward takes the KV cache as ``cache``, False for ``past_key_values``.

    A forward that names neither (``**kwargs``: remote code, a wrapper) gets the installed
    transformers' name, which its inner modules will be called with. Reads the forward's signature:
    call it outside any torch.compile'd function and pass the answer in (``cache_kwargs``); dynamo
    cannot treat a module argument as a constant (torch 2.11: ``AsPythonConstantNotImplementedError``).
    """
    return _takes_cache_kwarg(type(_base(model)))


@functools.cache
def _takes_cache_kwarg(cls: type) -> bool:
    params = _forward_params(cls)
    if "cache" in params:
        return True
    if "past_key_values" in params:
        return False
    return _library_says_cache()


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that passes ``cache`` (a transformers ``Cache`` or None) to ``model``.

    Build it outside a compiled function and pass the dict in (``ppomax.ppo.rollout.decode_step``)."""
    return {"cache": cache} if takes_cache_kwarg(model) else {"past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The KV cache of a model output, read by its field name: on newer transformers
    ``out.past_key_values`` is a property that logs a deprecation notice before returning ``out.cache``."""
    names = _field_names(type(out))
    if "cache" in names or ("past_key_values" not in names and hasattr(out, "cache")):
        return out.cache
    return out.past_key_values


def enable_activation_checkpointing(model: Any) -> None:
    """Turn on activation (gradient) checkpointing: recompute each block's activations in the backward.

    ``activation_checkpointing_enable`` where the model has it (peft wrappers forward the attribute
    to their base model), else the older ``gradient_checkpointing_enable``. Both default to the
    non-reentrant ``torch.utils.checkpoint`` and make the input embeddings require grad, which a
    LoRA model with frozen embeddings needs for gradients to reach the adapters.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        enable = model.gradient_checkpointing_enable
    enable()


@contextlib.contextmanager
def quiet_peft_checkpointing_probe():
    """Around peft's PeftModel construction: peft (0.21) reads ``model.is_gradient_checkpointing``,
    which newer transformers deprecate for ``is_activation_checkpointing`` (FutureWarning). The call is
    inside peft, so only peft can change it; this hides exactly that warning and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
