"""Python reward functions: what they are called with.

``reward_fn(prompts, responses, **optional) -> list[float]``, one float per response. ``prompts`` and
``responses`` are the decoded texts (special tokens stripped), as before. A function that declares any of
these keyword parameters (or ``**kwargs``) also gets them, one entry per response, in the same order:

* ``prompt_ids`` — the prompt's token ids as the policy saw them (chat template and special tokens
  included, after ``max_prompt_length`` truncation), a ``list[int]``;
* ``response_ids`` (or TRL's name ``completion_ids``) — the response's token ids, its EOS included when
  it stopped;
* ``prompt_messages`` — the row's chat messages (``list[dict]``) for a ``messages`` / chat ``prompt``
  row, None for a text or ``input_ids`` row;
* ``prompt_texts`` — the prompt as the model saw it, decoded with special tokens kept (the rendered chat
  template);
* ``truncated`` — True when the response hit ``response_length`` without an EOS id;
* every other column of the prompt rows (e.g. ``answer`` for a rule-based reward), as in TRL's GRPO
  reward functions.

A declared parameter without a default that none of these provides is an error before any model loads.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ppomax.config import ConfigError
from ppomax.errors import UserError

FIXED = ("prompt_ids", "response_ids", "completion_ids", "prompt_messages", "prompt_texts", "truncated")
_ROW_KEYS = ("prompt", "input_ids")  # canonical row keys that are not columns passed by name


class RewardFunction:
    """A user's ``reward_fn`` and the keyword arguments its signature asks for (module docstring)."""

    def __init__(self, fn: Callable[..., Sequence[float]]) -> None:
        self.fn = fn
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin or C callable: only the two positional arguments
            params = []
        self.var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if params and len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
            raise ConfigError("reward_fn must take (prompts, responses, ...): two positional parameters")
        self.named = [p for p in positional[2:] if p.kind is p.POSITIONAL_OR_KEYWORD] + \
            [p for p in params if p.kind is p.KEYWORD_ONLY]
        self.names: list[str] = []

    def bind_rows(self, rows: Sequence[dict]) -> None:
        """Decide what to pass from the prompt rows' columns; a required parameter nothing provides is an error
        (called when the prompts are loaded, before any model)."""
        columns = set.intersection(*(set(r) - set(_ROW_KEYS) for r in rows)) if rows else set()
        available = set(FIXED) | columns
        missing = [p.name for p in self.named if p.default is p.empty and p.name not in available]
        if missing:
            raise ConfigError(f"reward_fn requires {', '.join(missing)}, which neither ppomax ({', '.join(FIXED)}) "
                              f"nor every prompt row (columns: {', '.join(sorted(columns)) or 'none'}) provides")
        self.names = sorted(available) if self.var_kw else [p.name for p in self.named if p.name in available]

    def __call__(self, tokenizer: Any, p_ids: torch.Tensor, p_mask: torch.Tensor, resp: torch.Tensor,
                 mask: torch.Tensor, rows: Sequence[dict] | None, truncated: torch.Tensor | None) -> torch.Tensor:
        """Scores (B,) float32 on ``resp``'s device of the batch (p_ids, p_mask (B, P); resp, mask (B, T))."""
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(p_ids, p_mask)]
        response_ids = [ids[m.bool()].tolist() for ids, m in zip(resp, mask)]
        prompts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_ids]
        responses = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
        kwargs = {name: self._argument(name, tokenizer, prompt_ids, response_ids, rows, truncated, len(prompts))
                  for name in self.names}
        out = self.fn(prompts, responses, **kwargs)
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise UserError(f"reward_fn must return a list of numbers, got {type(out).__name__}: {str(out)[:80]}") from None
        if len(values) != len(prompts):
            raise UserError(f"reward_fn returned {len(values)} scores for {len(prompts)} responses")
        return torch.tensor(values, dtype=torch.float32, device=resp.device)

    @staticmethod
    def _argument(name: str, tokenizer: Any, prompt_ids: list, response_ids: list, rows: Sequence[dict] | None,
                  truncated: torch.Tensor | None, n: int) -> list:
        if name == "prompt_ids":
            return prompt_ids
        if name in ("response_ids", "completion_ids"):
            return response_ids
        if name == "prompt_texts":
            return [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
        if name == "truncated":
            return truncated.tolist() if truncated is not None else [None] * n
        if rows is None:  # no rows known for this batch
            return [None] * n
        if name == "prompt_messages":
            return [r["prompt"] if isinstance(r.get("prompt"), list) else None for r in rows]
        return [r.get(name) for r in rows]
