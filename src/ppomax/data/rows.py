"""Rows: JSONL reading and writing, validation of every row into its canonical form, and the sources
rows come from (a JSONL file, a ``datasets`` directory or Hub id, a ``datasets.Dataset``, a list).
The package docstring (:mod:`ppomax.data`) gives the canonical rows."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ppomax.errors import DataError

logger = logging.getLogger("ppomax")

KINDS = ("sft", "preference", "prompt")
_MAX_LOGGED_SKIPS = 5  # skipped rows whose reason is logged; the rest are only counted

Prompt = str | list[dict[str, Any]]


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
