"""Tokenization (prompts, responses, length limits) and collation into padded batches.

Padding never identifies tokens: pad and EOS may share one id (SmolLM2, the tiny test model), so
every mask and index below is computed from sequence lengths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ppomax.data.rows import Prompt
from ppomax.errors import DataError

TRUNCATION_MODES = ("left", "drop")
IGNORE_INDEX = -100  # label value ignored by the LM loss (torch cross_entropy default)

# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
def _require_chat_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the data has chat messages but the tokenizer has no chat template; set "
            "tokenizer.chat_template or give prompts as plain strings"
        )


def _as_id_list(encoded: Any) -> list[int]:
    """Normalise tokenizer output (list, BatchEncoding/dict, tensor) to a flat list of ints."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        (encoded,) = encoded
    return [int(i) for i in encoded]


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: plain text with the tokenizer's special tokens (e.g. BOS), or a
    conversation rendered by the chat template with the assistant generation prompt appended."""
    if isinstance(prompt, str):
        return _as_id_list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    _require_chat_template(tokenizer)
    # transformers 5 returns a BatchEncoding here unless return_dict=False.
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    return _as_id_list(ids)


def encode_response(tokenizer: Any, response: str, eos: bool = True) -> list[int]:
    """Token ids of a response, terminated by EOS so the policy learns to stop (``eos=False``: a
    response that was cut at a length cap, which has none)."""
    return _as_id_list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id] * eos


def row_prompt_ids(tokenizer: Any, row: dict) -> list[int]:
    """Token ids of a canonical prompt row: its ``input_ids`` as given, or its prompt encoded."""
    return list(row["input_ids"]) if "prompt" not in row else encode_prompt(tokenizer, row["prompt"])


def prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt as the model sees it, as text (for reward functions that score strings)."""
    if isinstance(prompt, str):
        return prompt
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def fit_prompt(ids: list[int], max_prompt_length: int, mode: str = "left") -> list[int] | None:
    """Fit prompt ids into ``max_prompt_length``: "left" keeps the last tokens (the end of a
    prompt, next to where the answer starts, matters most); "drop" returns None instead."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation mode must be one of {TRUNCATION_MODES}, got {mode!r}")
    if len(ids) <= max_prompt_length:
        return ids
    return ids[-max_prompt_length:] if mode == "left" else None


@dataclass
class LengthStats:
    """What tokenization did to fit the length limits (callers log these)."""

    examples: int = 0  # examples kept
    truncated_prompts: int = 0  # prompts left-truncated to max_prompt_length
    dropped_prompts: int = 0  # rows dropped because the prompt was too long (mode "drop")
    truncated_responses: int = 0  # responses cut to fit max_length (they then lack EOS)
    dropped_pairs: int = 0  # preference pairs whose chosen == rejected after truncation

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length so that responses get at least one token, "
            f"got max_prompt_length={max_prompt_length}, max_length={max_length}"
        )


def _fit_prompt_counted(
    tokenizer: Any, prompt: Prompt, max_prompt_length: int, mode: str, stats: LengthStats
) -> list[int] | None:
    ids = encode_prompt(tokenizer, prompt)
    fitted = fit_prompt(ids, max_prompt_length, mode)
    if fitted is None:
        stats.dropped_prompts += 1
    elif len(fitted) < len(ids):
        stats.truncated_prompts += 1
    return fitted


def _fit_response(ids: list[int], budget: int, stats: LengthStats) -> list[int]:
    if len(ids) > budget:
        stats.truncated_responses += 1
        return ids[:budget]
    return ids


def _nothing_left(n_rows: int, stats: LengthStats, max_prompt_length: int) -> DataError:
    return DataError(
        f"all {n_rows} rows were dropped while fitting lengths ({stats.as_dict()}); "
        f"raise max_prompt_length (now {max_prompt_length}) or use truncation mode 'left'"
    )


def tokenize_sft(
    rows: Sequence[dict],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "left",
) -> tuple[list[dict[str, list[int]]], LengthStats]:
    """Canonical SFT rows → ``{"prompt_ids", "response_ids"}`` with prompt+response ≤ max_length."""
    _check_lengths(max_length, max_prompt_length)
    stats, examples = LengthStats(), []
    for row in rows:
        prompt_ids = _fit_prompt_counted(tokenizer, row["prompt"], max_prompt_length, truncation_mode, stats)
        if prompt_ids is None:
            continue
        budget = max_length - len(prompt_ids)
        response_ids = _fit_response(encode_response(tokenizer, row["response"]), budget, stats)
        examples.append({"prompt_ids": prompt_ids, "response_ids": response_ids})
    stats.examples = len(examples)
    if not examples:
        raise _nothing_left(len(rows), stats, max_prompt_length)
    return examples, stats


def tokenize_preference(
    rows: Sequence[dict],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "left",
) -> tuple[list[dict[str, list[int]]], LengthStats]:
    """Canonical preference rows → ``{"prompt_ids", "chosen_ids", "rejected_ids"}``.

    Pairs that become identical once cut to ``max_length`` are dropped (``dropped_pairs``):
    they would carry no preference signal.
    """
    _check_lengths(max_length, max_prompt_length)
    stats, examples = LengthStats(), []
    for row in rows:
        prompt_ids = _fit_prompt_counted(tokenizer, row["prompt"], max_prompt_length, truncation_mode, stats)
        if prompt_ids is None:
            continue
        budget = max_length - len(prompt_ids)
        # A side cut at a length cap gets no EOS: PPO scores its truncated samples at their last token too.
        chosen_ids = _fit_response(encode_response(tokenizer, row["chosen"], not row.get("chosen_truncated")),
                                   budget, stats)
        rejected_ids = _fit_response(encode_response(tokenizer, row["rejected"], not row.get("rejected_truncated")),
                                     budget, stats)
        if chosen_ids == rejected_ids:
            stats.dropped_pairs += 1
            continue
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    stats.examples = len(examples)
    if not examples:
        raise _nothing_left(len(rows), stats, max_prompt_length)
    return examples, stats


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------
def _right_pad(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """prompt+response per row, right-padded; labels only on response tokens."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    B, L = len(lengths), max(lengths)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((B, L), dtype=torch.long)  # (B, L) 1 = real token
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)  # (B, L) -100 = no loss
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :n] = 1
        # Labels by position, not by id: pad may equal EOS and the response's EOS must count.
        labels[i, len(p) : n] = input_ids[i, len(p) : n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_sft(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """SFT batch: ``input_ids``, ``attention_mask``, ``labels``, all (B, L), right-padded.

    ``labels`` equal ``input_ids`` on response tokens and -100 on prompt and padding, so the
    loss is the response NLL only (the model still attends to the prompt).
    """
    return _right_pad([e["prompt_ids"] for e in examples], [e["response_ids"] for e in examples], pad_id)


def collate_preference(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference batch of 2B sequences: the B chosen first, then the B rejected.

    Returns ``input_ids`` (2B, L), ``attention_mask`` (2B, L), ``labels`` (2B, L) (-100 on
    prompt and padding; the first B rows feed the optional LM loss on chosen) and
    ``last_index`` (2B,), the position of each sequence's last real token where the reward is
    read. It is computed from lengths, never by searching for pad: pad may equal EOS.
    """
    prompts = [e["prompt_ids"] for e in examples] * 2
    responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    batch = _right_pad(prompts, responses, pad_id)
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)], dtype=torch.long)
    batch["last_index"] = lengths - 1  # (2B,)
    return batch


def collate_prompts(prompt_id_lists: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts for generation, LEFT-padded so every row's next token is at position P.

    Returns ``input_ids`` (B, P) and ``attention_mask`` (B, P). Pair forwards over these with
    ``ppomax.models.position_ids_from_mask`` so positions match ``generate``.
    """
    B, P = len(prompt_id_lists), max(len(p) for p in prompt_id_lists)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((B, P), dtype=torch.long)  # (B, P)
    for i, ids in enumerate(prompt_id_lists):
        if ids:
            input_ids[i, P - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, P - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
