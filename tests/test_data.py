"""Tests for ppomax.data: row validation with file:line errors, tokenization, collation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ppomax.data import (
    IGNORE_INDEX,
    DataError,
    collate_preference,
    collate_prompts,
    collate_sft,
    encode_prompt,
    encode_response,
    fit_prompt,
    load_rows,
    prompt_text,
    read_jsonl,
    tokenize_preference,
    tokenize_sft,
    write_jsonl,
)
from ppomax.models import build_tiny_model, load_tokenizer

GOOD_PREF = {"prompt": "Is the soup good?", "chosen": "Yes, very.", "rejected": "No."}
CHAT = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_model(tmp_path_factory.mktemp("tiny")))


def _write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# ------------------------------------------------------------------------- bad rows
BAD_ROWS = [
    # (kind, raw line 3, expected message after "file:3: ")
    ("preference", b'{"prompt": "a", "chosen": ', "malformed JSON"),
    ("preference", b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}', "invalid UTF-8"),
    ("preference", b"[1, 2]", "expected an object, got list"),
    ("preference", b'{"prompt": "a", "rejected": "b"}', "field 'chosen' is missing"),
    ("preference", b'{"prompt": "a", "chosen": null, "rejected": "b"}', "field 'chosen' is missing"),
    (
        "preference",
        b'{"prompt": "a", "chosen": 3, "rejected": "b"}',
        "field 'chosen' must be a string, got int",
    ),
    ("preference", b'{"prompt": "a", "chosen": "x", "rejected": "  \\n"}', "field 'rejected' is empty"),
    (
        "preference",
        b'{"prompt": "a", "chosen": "same", "rejected": "same"}',
        "'chosen' and 'rejected' are identical",
    ),
    ("preference", b'{"chosen": "x", "rejected": "y"}', "field 'prompt' is missing"),
    ("preference", b'{"prompt": "a", "chosen": "x", "rejected": "y", "chosen_truncated": 1}',
     "field 'chosen_truncated' must be true or false, got int"),
    (
        "preference",
        b'{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],'
        b' "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}',
        "do not share the same prompt messages",
    ),
    ("sft", b'{"prompt": "a"}', "field 'response' is missing"),
    ("sft", b'{"prompt": ["a"], "response": "b"}', "field 'prompt[0]' must be an object"),
    (
        "sft",
        b'{"messages": [{"role": "user", "content": "a"}]}',
        "field 'messages' must end with an 'assistant'",
    ),
    (
        "sft",
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}',
        "field 'messages[1].content' is missing",
    ),
    ("prompt", b'{"prompt": 5}', "field 'prompt' must be a string, got int"),
    ("prompt", b'"just a string"', "expected an object, got str"),
]


@pytest.mark.parametrize(("kind", "line", "expected"), BAD_ROWS)
def test_bad_row_names_file_line_and_field(tmp_path, kind, line, expected):
    good = {"preference": GOOD_PREF, "sft": {"prompt": "a", "response": "b"}, "prompt": {"prompt": "a"}}[kind]
    path = _write_lines(tmp_path / "train.jsonl", [json.dumps(good).encode(), b"", line])
    with pytest.raises(DataError) as info:
        load_rows(path, kind)
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message  # line 2 is blank but still counted
    assert expected in message


def test_skip_bad_rows_counts_and_all_bad_is_an_error(tmp_path):
    path = _write_lines(
        tmp_path / "pref.jsonl",
        [json.dumps(GOOD_PREF).encode(), b"{oops", b"", b'{"prompt": "a"}', json.dumps(GOOD_PREF).encode()],
    )
    rows, skipped = load_rows(path, "preference", skip_bad_rows=True)
    assert (len(rows), skipped) == (2, 2)
    assert rows[0] == GOOD_PREF

    only_bad = _write_lines(tmp_path / "bad.jsonl", [b"{oops", b"[]"])
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable preference rows \(2 bad rows skipped\)"):
        load_rows(only_bad, "preference", skip_bad_rows=True)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no usable sft rows"):
        load_rows(str(tmp_path / "empty.jsonl"), "sft")
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"), "sft")


def test_in_memory_rows_name_the_row():
    with pytest.raises(DataError, match=r"^row 2: field 'response' is missing"):
        load_rows([{"prompt": "a", "response": "b"}, {"prompt": "a"}], "sft")
    rows, skipped = load_rows(["Tell me a story.", {"prompt": "Hi", "task_id": 7}], "prompt")
    assert skipped == 0
    assert rows == [{"prompt": "Tell me a story."}, {"prompt": "Hi", "task_id": 7}]  # extras kept


# ------------------------------------------------------------------------- sources and formats
def test_datasets_dir_dataset_and_datasetdict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([GOOD_PREF, {**GOOD_PREF, "chosen": None}])
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds: row 2: field 'chosen' is missing"):
        load_rows(str(tmp_path / "ds"), "preference")
    rows, skipped = load_rows(str(tmp_path / "ds"), "preference", skip_bad_rows=True)
    assert rows == [GOOD_PREF] and skipped == 1

    datasets.DatasetDict({"train": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd"), "preference")[0] == [GOOD_PREF]
    datasets.DatasetDict({"test": ds.select([0])}).save_to_disk(str(tmp_path / "dd_test"))
    with pytest.raises(DataError, match=r"splits \['test'\]"):
        load_rows(str(tmp_path / "dd_test"), "preference")
    assert load_rows(ds.select([0]), "preference")[0] == [GOOD_PREF]
    assert load_rows(datasets.DatasetDict({"train": ds.select([0])}), "preference")[0] == [GOOD_PREF]


def test_messages_forms_become_canonical():
    convo = [{"role": "system", "content": "Be brief."}, *CHAT]
    rows, _ = load_rows([{"messages": [*convo, {"role": "assistant", "content": "Hello!"}]}], "sft")
    assert rows == [{"prompt": convo, "response": "Hello!"}]

    implicit = {
        "chosen": [*CHAT, {"role": "assistant", "content": "Hello!"}],
        "rejected": [*CHAT, {"role": "assistant", "content": "Go away."}],
    }
    explicit = {
        "prompt": CHAT,
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": "Go away.",
    }
    rows, _ = load_rows([implicit, explicit], "preference")
    assert rows == [{"prompt": CHAT, "chosen": "Hello!", "rejected": "Go away."}] * 2

    rows, _ = load_rows([{"messages": CHAT, "id": 3}], "prompt")
    assert rows == [{"prompt": CHAT, "id": 3}]
    with pytest.raises(DataError, match="ends with an 'assistant' message"):
        load_rows([{"messages": implicit["chosen"]}], "prompt")


def test_read_write_jsonl_roundtrip_is_atomic(tmp_path):
    rows = [{"a": "ünïcode"}, {"b": [1, 2]}]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert os.listdir(tmp_path / "sub") == ["out.jsonl"]  # no temp file left behind
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON"):
        read_jsonl(tmp_path / "broken.jsonl")


# ------------------------------------------------------------------------- tokenization
def test_chat_template_is_applied(tokenizer):
    ids = encode_prompt(tokenizer, CHAT)
    text = prompt_text(tokenizer, CHAT)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_text(tokenizer, "plain") == "plain"
    assert encode_response(tokenizer, "Hello")[-1] == tokenizer.eos_token_id

    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(DataError, match="no chat template"):
            encode_prompt(tokenizer, CHAT)
        assert encode_prompt(tokenizer, "Hi there") == tokenizer("Hi there")["input_ids"]
    finally:
        tokenizer.chat_template = template


def test_fit_prompt_modes():
    assert fit_prompt([1, 2, 3, 4, 5], 3, "left") == [3, 4, 5]
    assert fit_prompt([1, 2, 3, 4, 5], 3, "drop") is None
    assert fit_prompt([1, 2], 3, "drop") == [1, 2]
    with pytest.raises(ValueError, match="truncation mode"):
        fit_prompt([1], 3, "right")


def test_tokenize_sft_counts_truncation_and_drops(tokenizer):
    long_prompt = "The farmer counted his sheep twice because the first count seemed too high."
    rows = [
        {"prompt": "Hi", "response": "Hello there."},
        {"prompt": long_prompt, "response": "Ok."},
        {"prompt": "Hi", "response": "A very long answer that goes on and on about sheep and fields."},
    ]
    long_ids = encode_prompt(tokenizer, long_prompt)
    assert len(long_ids) > 8

    examples, stats = tokenize_sft(
        rows, tokenizer, max_length=12, max_prompt_length=8, truncation_mode="left"
    )
    assert (stats.examples, stats.truncated_prompts, stats.dropped_prompts, stats.truncated_responses) == (
        3,
        1,
        0,
        1,
    )
    assert examples[1]["prompt_ids"] == long_ids[-8:]  # the end of the prompt is kept
    assert examples[0]["response_ids"][-1] == tokenizer.eos_token_id
    cut = examples[2]
    assert len(cut["prompt_ids"]) + len(cut["response_ids"]) == 12
    assert (
        cut["response_ids"] == encode_response(tokenizer, rows[2]["response"])[: 12 - len(cut["prompt_ids"])]
    )

    examples, stats = tokenize_sft(
        rows, tokenizer, max_length=12, max_prompt_length=8, truncation_mode="drop"
    )
    assert (stats.examples, stats.dropped_prompts, stats.truncated_prompts) == (2, 1, 0)
    with pytest.raises(DataError, match="all 1 rows were dropped"):
        tokenize_sft(rows[1:2], tokenizer, max_length=12, max_prompt_length=8, truncation_mode="drop")
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_sft(rows, tokenizer, max_length=8, max_prompt_length=8)


def test_tokenize_preference_drops_pairs_identical_after_truncation(tokenizer):
    rows = [
        {
            "prompt": "Hi",
            "chosen": "The river was calm and slow today.",
            "rejected": "The river was calm and cold.",
        },
        {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."},
    ]
    examples, stats = tokenize_preference(rows, tokenizer, max_length=10, max_prompt_length=2)
    assert stats.dropped_pairs == 1 and stats.truncated_responses == 2 and stats.examples == 1
    assert examples[0]["chosen_ids"] == encode_response(tokenizer, "Yes.")  # untouched pair kept


def test_a_pair_side_marked_truncated_gets_no_eos(tokenizer):
    """Issue #24: a side cut at a length cap is scored without EOS, as PPO scores a truncated sample;
    before, every side got EOS appended (61 % of the SmolLM2 study's pair samples were cut)."""
    eos = tokenizer.eos_token_id
    rows, _ = load_rows([{**GOOD_PREF, "chosen_truncated": True, "rejected_truncated": None},
                         {**GOOD_PREF, "rejected_truncated": True}], "preference")
    assert rows == [{**GOOD_PREF, "chosen_truncated": True}, {**GOOD_PREF, "rejected_truncated": True}]
    (a, b), _ = tokenize_preference(rows, tokenizer, max_length=64, max_prompt_length=32)
    words = tokenizer(GOOD_PREF["chosen"], add_special_tokens=False)["input_ids"]
    assert a["chosen_ids"] == words == encode_response(tokenizer, GOOD_PREF["chosen"], eos=False)
    assert a["rejected_ids"][-1] == eos and b["chosen_ids"] == words + [eos] and b["rejected_ids"][-1] != eos


# ------------------------------------------------------------------------- collation
EOS = 0  # the tiny model's eos, which is also its pad


def test_collate_preference_last_index_when_pad_is_eos():
    # Every response ends with EOS == pad; chosen and rejected lengths differ.
    examples = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, EOS], "rejected_ids": [8, 9, 10, EOS]},
        {"prompt_ids": [11], "chosen_ids": [12, 13, 14, 15, EOS], "rejected_ids": [EOS]},
    ]
    batch = collate_preference(examples, pad_id=EOS)
    lengths = [4, 6, 6, 2]  # chosen 0, chosen 1, rejected 0, rejected 1
    assert batch["input_ids"].shape == (4, 6)
    assert batch["last_index"].tolist() == [n - 1 for n in lengths]
    assert batch["input_ids"][0].tolist() == [5, 6, 7, EOS, EOS, EOS]
    assert batch["input_ids"][3].tolist() == [11, EOS, EOS, EOS, EOS, EOS]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    # The real last token is the EOS that ends the response, even with pad EOS after it.
    rows = torch.arange(4)
    assert (batch["input_ids"][rows, batch["last_index"]] == EOS).all()
    assert (batch["attention_mask"][rows, batch["last_index"]] == 1).all()
    # Labels: -100 on prompt and padding, ids on response tokens (including the final EOS).
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, EOS, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["labels"][3].tolist() == [IGNORE_INDEX, EOS] + [IGNORE_INDEX] * 4


def test_collate_sft_labels_mask_prompt_and_padding():
    examples = [
        {"prompt_ids": [5, 6, 7], "response_ids": [8, EOS]},
        {"prompt_ids": [9], "response_ids": [EOS]},
    ]
    batch = collate_sft(examples, pad_id=EOS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, EOS], [9, EOS, EOS, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, EOS], [-100, EOS, -100, -100, -100]]


def test_collate_prompts_left_pads():
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=EOS)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [EOS, EOS, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
