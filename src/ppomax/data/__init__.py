"""Data for the three stage kinds: loading, row validation, tokenization and collation.

Rows come from a JSONL file, a directory written by ``datasets.Dataset.save_to_disk``, a
``datasets.Dataset`` or a Python list. Every row is validated before any compute starts, and a
bad row is reported as ``<file>:<line>: <what is wrong with which field>`` so it can be fixed in
an editor. Canonical rows (what ``load_rows`` returns):

* ``"sft"``:        ``{"prompt": str | list[message], "response": str}``
* ``"preference"``: ``{"prompt": str | list[message], "chosen": str, "rejected": str}``, optionally
  ``"chosen_truncated"`` / ``"rejected_truncated"`` (bool, default false: the side was cut at a length
  cap, so it gets no EOS and the reward model scores its last token, as PPO scores a truncated sample)
* ``"prompt"``:     ``{"prompt": str | list[message], **extra_fields}``, or ``{"input_ids": list[int], ...}``
  for pre-tokenized rows (TRL's PPO datasets; ids checked against the vocabulary)

where a message is ``{"role": str, "content": str}``. A ``list[message]`` prompt is rendered
with the tokenizer's chat template (plus the generation prompt); a ``str`` prompt is tokenized
as is. Responses end with the EOS token unless marked truncated or cut by ``max_length``.

Padding never identifies tokens: pad and EOS may share one id (SmolLM2, the tiny test model),
so every mask and index below is computed from sequence lengths.

The code: :mod:`ppomax.data.rows` (JSONL, row validation, sources) and :mod:`ppomax.data.batches`
(tokenization, collation); import the names from ``ppomax.data``.
"""

from __future__ import annotations

from ppomax.data.batches import (
    IGNORE_INDEX,
    TRUNCATION_MODES,
    LengthStats,
    collate_preference,
    collate_prompts,
    collate_sft,
    encode_prompt,
    encode_response,
    fit_prompt,
    prompt_text,
    row_prompt_ids,
    tokenize_preference,
    tokenize_sft,
)
from ppomax.data.rows import KINDS, Prompt, canonical_row, load_rows, read_jsonl, write_jsonl
from ppomax.errors import DataError

__all__ = [
    "IGNORE_INDEX", "KINDS", "TRUNCATION_MODES", "DataError", "LengthStats", "Prompt", "canonical_row",
    "collate_preference", "collate_prompts", "collate_sft", "encode_prompt", "encode_response", "fit_prompt",
    "load_rows", "prompt_text", "read_jsonl", "row_prompt_ids", "tokenize_preference", "tokenize_sft",
    "write_jsonl",
]
