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
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ppomax.errors import UserError

logger = logging.getLogger("ppomax")

KINDS = ("sft", "preference", "prompt")
TRUNCATION_MODES = ("left", "drop")
IGNORE_INDEX = -100  # label value ignored by the LM loss (torch cross_entropy default)
_MAX_LOGGED_SKIPS = 5  # skipped rows whose reason is logged; the rest are only counted

Prompt = str | list[dict[str, Any]]


class DataError(UserError, ValueError):
    """A data source or row is unusable; the message names the file, line and field."""


class _BadRow(Exception):
    """Internal: one row failed validation (message without the location prefix)."""


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------
def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line number, parsed object or _BadRow) for non-blank lines of ``path``.

    Lines are decoded one by one so that one invalid UTF-8 line is one bad row, not a crash.
    """
    with open(path, "rb") as f:
        data = f.read()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, _BadRow(f"invalid UTF-8 at byte {e.start}")
            continue
        if lineno == 1:
            line = line.lstrip("\ufeff")  # editors on Windows like to add a BOM
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, _BadRow(f"malformed JSON: {e.msg} (column {e.colno})")


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Read a JSONL file (blank lines ignored); raise DataError naming ``path:line`` if broken."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows = []
    for lineno, obj in _iter_jsonl(path):
        if isinstance(obj, _BadRow):
            raise DataError(f"{path}:{lineno}: {obj}")
        rows.append(obj)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Write ``rows`` as JSONL atomically: a temp file in the same directory, then os.replace.

    A crash mid-write therefore leaves either the old file or the new one, never half a file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Row validation
# --------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(row: dict, field: str) -> Any:
    """A field's value; absent and null are both "missing" (Arrow fills absent keys with None)."""
    value = row.get(field)
    if value is None:
        raise _BadRow(f"field '{field}' is missing")
    return value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _BadRow(f"field '{field}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise _BadRow(f"field '{field}' is empty")
    return value


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    """Validate a chat conversation; returns copies with null keys dropped."""
    if not isinstance(value, list):
        raise _BadRow(f"field '{field}' must be a list of messages, got {_type_name(value)}")
    if not value:
        raise _BadRow(f"field '{field}' is empty")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise _BadRow(f"field '{where}' must be an object with 'role' and 'content'")
        msg = {k: v for k, v in msg.items() if v is not None}
        for key in ("role", "content"):
            if key not in msg:
                raise _BadRow(f"field '{where}.{key}' is missing")
            _text(msg[key], f"{where}.{key}")
        out.append(msg)
    return out


def _prompt(row: dict, field: str = "prompt") -> Prompt:
    value = _get(row, field)
    return _text(value, field) if not isinstance(value, list) else _messages(value, field)


def _split_last_assistant(messages: list[dict], field: str) -> tuple[list[dict], str]:
    """(prompt conversation, final assistant content) of a full conversation."""
    if messages[-1]["role"] != "assistant":
        raise _BadRow(f"field '{field}' must end with an 'assistant' message")
    if len(messages) < 2:
        raise _BadRow(f"field '{field}' has no prompt messages before the assistant message")
    return messages[:-1], messages[-1]["content"]


def _completion(value: Any, field: str) -> str:
    """A completion next to an explicit prompt: a string, or TRL's conversational form
    ``[{"role": "assistant", "content": ...}]``."""
    if not isinstance(value, list):
        return _text(value, field)
    messages = _messages(value, field)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise _BadRow(f"field '{field}' must be a string or a single 'assistant' message")
    return messages[0]["content"]


def _canonical_sft(row: dict) -> dict:
    if row.get("messages") is not None:
        prompt, response = _split_last_assistant(_messages(row["messages"], "messages"), "messages")
        return {"prompt": prompt, "response": response}
    return {"prompt": _prompt(row), "response": _text(_get(row, "response"), "response")}


def _canonical_preference(row: dict) -> dict:
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    if row.get("prompt") is not None:  # explicit prompt: completions are strings or one message
        prompt = _prompt(row)
        chosen, rejected = _completion(chosen, "chosen"), _completion(rejected, "rejected")
    elif isinstance(chosen, list) or isinstance(rejected, list):  # implicit prompt: shared prefix
        prompt, chosen = _split_last_assistant(_messages(chosen, "chosen"), "chosen")
        prefix, rejected = _split_last_assistant(_messages(rejected, "rejected"), "rejected")
        if prefix != prompt:
            raise _BadRow("fields 'chosen' and 'rejected' do not share the same prompt messages")
    else:
        raise _BadRow("field 'prompt' is missing")
    if chosen.strip() == rejected.strip():
        # A tie carries no preference signal: the pairwise loss would only add noise.
        raise _BadRow("fields 'chosen' and 'rejected' are identical")
    flags = {f: False if row.get(f) is None else row[f] for f in ("chosen_truncated", "rejected_truncated")}
    for f, v in flags.items():
        if not isinstance(v, bool):
            raise _BadRow(f"field '{f}' must be true or false, got {_type_name(v)}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **{f: True for f, v in flags.items() if v}}


def _token_ids(value: Any, field: str, vocab_size: int | None) -> list[int]:
    """A pre-tokenized prompt (TRL's PPO datasets): a non-empty list of ids in [0, vocab_size)."""
    if hasattr(value, "tolist"):  # a numpy array or tensor (datasets' numpy / torch formats)
        value = value.tolist()
    if not isinstance(value, list):
        raise _BadRow(f"field '{field}' must be a list of token ids, got {_type_name(value)}")
    if not value:
        raise _BadRow(f"field '{field}' is empty")
    bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, int)), None)
    if bad is not None:
        raise _BadRow(f"field '{field}' must hold integers, got {_type_name(bad)} {bad!r}")
    out_of_range = next((v for v in value if v < 0 or (vocab_size is not None and v >= vocab_size)), None)
    if out_of_range is not None:
        raise _BadRow(f"field '{field}' holds token id {out_of_range}, outside the tokenizer's vocabulary "
                      f"[0, {vocab_size if vocab_size is not None else '…'})")
    return value


def _canonical_prompt(row: Any, vocab_size: int | None = None) -> dict:
    if isinstance(row, str):  # bare strings are accepted from Python lists only (checked by caller)
        return {"prompt": _text(row, "prompt")}
    if row.get("prompt") is None and row.get("messages") is None and row.get("input_ids") is not None:
        # TRL's PPO format: already tokenized; the ids are used as they are (no special tokens added)
        extra = {k: v for k, v in row.items() if k not in ("input_ids", "attention_mask")}
        return {**extra, "input_ids": _token_ids(row["input_ids"], "input_ids", vocab_size)}
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    if row.get("messages") is not None and row.get("prompt") is None:
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] == "assistant":
            raise _BadRow(
                "field 'messages' ends with an 'assistant' message; a prompt must end with the turn "
                "the policy answers"
            )
        return {**extra, "prompt": messages}
    return {**extra, "prompt": _prompt(row)}


_CANONICAL = {"sft": _canonical_sft, "preference": _canonical_preference, "prompt": _canonical_prompt}


def canonical_row(row: Any, kind: str, allow_str: bool = False, vocab_size: int | None = None) -> dict:
    """Validate one row of ``kind`` and return its canonical form; raises _BadRow. ``vocab_size`` bounds
    the ids of pre-tokenized prompt rows."""
    if allow_str and kind == "prompt" and isinstance(row, str):
        return _canonical_prompt(row)
    if not isinstance(row, dict):
        raise _BadRow(f"expected an object, got {_type_name(row)}")
    return _canonical_prompt(row, vocab_size) if kind == "prompt" else _CANONICAL[kind](row)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def _numbered_rows(source: Any) -> tuple[str, Iterator[tuple[int, Any]], Callable[[int], str], bool]:
    """(source name, iterator of (1-based number, row or _BadRow), location formatter, whether
    bare strings are accepted as prompt rows).

    Locations read ``path:line`` for JSONL, ``dir: row n`` for a saved dataset and ``row n``
    for in-memory data.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        from ppomax import hub

        if hub.looks_like_hub_id(path.partition(":")[0]):  # 'org/name[:split]': datasets.load_dataset
            return path, enumerate(hub.load_dataset(path), start=1), lambda n: f"{path}: row {n}", False
        if os.path.isdir(path):
            return path, enumerate(_load_dataset_dir(path), start=1), lambda n: f"{path}: row {n}", False
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file or directory")
        return path, _iter_jsonl(path), lambda n: f"{path}:{n}", False
    in_memory = lambda n: f"row {n}"  # noqa: E731
    if isinstance(source, (list, tuple)):
        return "in-memory data", enumerate(source, start=1), in_memory, True
    import datasets  # heavy: imported only when a datasets object may be involved

    if isinstance(source, datasets.DatasetDict):
        return "DatasetDict", enumerate(_pick_split(source, "DatasetDict"), start=1), in_memory, False
    if isinstance(source, datasets.Dataset):
        return "Dataset", enumerate(source, start=1), in_memory, False
    raise DataError(
        f"unsupported data source of type {type(source).__name__}: expected a JSONL path, a "
        "save_to_disk directory, a datasets.Dataset or a list of dicts"
    )


def _pick_split(dataset_dict: Any, name: str) -> Any:
    if "train" in dataset_dict:
        return dataset_dict["train"]
    raise DataError(
        f"{name} holds a DatasetDict with splits {sorted(dataset_dict)} and no 'train' split; "
        "pass one split (the split's sub-directory, or dataset_dict[split])"
    )


def _load_dataset_dir(path: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({e})") from e
    return _pick_split(loaded, path) if isinstance(loaded, datasets.DatasetDict) else loaded


def load_rows(source: Any, kind: str, skip_bad_rows: bool = False, vocab_size: int | None = None) -> tuple[list[dict], int]:
    """Load and validate every row of ``source`` for a stage ``kind``.

    Args:
        source: JSONL path, ``save_to_disk`` directory (a DatasetDict there must have a "train"
            split), ``datasets.Dataset``, or a list of dicts (or of strings for ``"prompt"``).
        kind: "sft", "preference" or "prompt" (row formats in the module docstring).
        skip_bad_rows: skip and count bad rows instead of raising on the first one.

    Returns:
        (canonical rows, number of rows skipped). The caller logs the count.

    Raises:
        DataError: a bad row (``file:line: field 'x' ...``) or no valid rows at all.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name, numbered, locate, allow_str = _numbered_rows(source)
    rows: list[dict] = []
    skipped = 0
    for number, row in numbered:
        try:
            if isinstance(row, _BadRow):
                raise row
            rows.append(canonical_row(row, kind, allow_str=allow_str, vocab_size=vocab_size))
        except _BadRow as e:
            message = f"{locate(number)}: {e}"
            if not skip_bad_rows:
                raise DataError(message) from None
            skipped += 1
            if skipped <= _MAX_LOGGED_SKIPS:
                logger.warning("skipping bad row: %s", message)
    if not rows:
        detail = f" ({skipped} bad rows skipped)" if skipped else ""
        raise DataError(f"{name}: no usable {kind} rows{detail}")
    return rows, skipped


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
