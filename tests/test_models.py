"""Tests for ppomax.models: tiny model, loading, scalar-head model, position ids."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from ppomax.data import collate_prompts
from ppomax.models import (
    HEAD_MARKER,
    HEAD_WEIGHTS,
    ScalarHeadModel,
    build_tiny_model,
    gather_last,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_tiny_model_builds_and_reloads(tiny_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tiny_dir))
    tokenizer = load_tokenizer(tiny_dir)
    model = load_causal_lm(tiny_dir)
    # <|endoftext|> is bos, eos and pad at once, as in SmolLM2.
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.chat_template is not None
    text = "The kitten chased a piece of string, then 42 more! Ünïcode too."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips any text
    assert max(ids) < model.config.vocab_size == 512
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()


def test_tiny_model_is_seeded_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_causal_lm(build_tiny_model(tmp_path / "a", num_layers=1, hidden_size=32, seed=1))
    assert torch.equal(torch.rand(3), expected)
    b = load_causal_lm(build_tiny_model(tmp_path / "b", num_layers=1, hidden_size=32, seed=1))
    c = load_causal_lm(build_tiny_model(tmp_path / "c", num_layers=1, hidden_size=32, seed=2))
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_scalar_head_save_and_reload_gives_identical_scores(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = ScalarHeadModel.from_causal_lm(tiny_dir).eval()
    model.metadata = {"reward_mean": 0.5}
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # (B, T) first row left-padded
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        scores = model(input_ids, attention_mask)
    assert scores.shape == (2, 5) and scores.dtype == torch.float32

    out = tmp_path / "rm"
    model.save_pretrained(out, tokenizer=load_tokenizer(tiny_dir))
    assert {HEAD_WEIGHTS, HEAD_MARKER, "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    reloaded = ScalarHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids, attention_mask), scores)
    assert reloaded.metadata == {"reward_mean": 0.5}
    assert load_tokenizer(out).pad_token_id == 0

    os.remove(out / HEAD_WEIGHTS)
    with pytest.raises(ValueError, match=f"no {HEAD_WEIGHTS}"):
        ScalarHeadModel.from_pretrained(out)
    with pytest.raises(ValueError, match="nor an AutoModelForSequenceClassification checkpoint.*train one with `ppomax rm`"):
        ScalarHeadModel.from_pretrained(tiny_dir)


def test_from_causal_lm_shares_backbone_weights_and_head_init(tiny_dir):
    lm = load_causal_lm(tiny_dir)
    torch.manual_seed(0)
    rm = ScalarHeadModel.from_causal_lm(tiny_dir)
    backbone = rm.backbone.state_dict()
    lm_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    assert backbone.keys() == lm_state.keys()
    assert all(torch.equal(backbone[k], lm_state[k]) for k in backbone)
    assert rm.config.hidden_size == 64
    # Head: zero bias, std 1/sqrt(hidden+1) = 1/sqrt(65) ≈ 0.124 (64 samples: loose but meaningful).
    assert torch.equal(rm.v_head.bias, torch.zeros(1))
    assert 0.07 < rm.v_head.weight.std().item() < 0.18
    torch.manual_seed(0)
    assert torch.equal(ScalarHeadModel.from_causal_lm(tiny_dir).v_head.weight, rm.v_head.weight)


def test_scalar_head_last_score_is_invariant_to_left_padding(tiny_dir):
    torch.manual_seed(0)
    model = ScalarHeadModel.from_causal_lm(tiny_dir).eval()
    batch = collate_prompts([[5, 6, 7, 8], [9, 10]], pad_id=0)  # (2, 4) left-padded
    with torch.no_grad():
        padded = model(batch["input_ids"], batch["attention_mask"])[:, -1]
        alone = model(torch.tensor([[9, 10]]), torch.ones(1, 2, dtype=torch.long))[:, -1]
    torch.testing.assert_close(padded[1:], alone, atol=1e-5, rtol=0)


def test_position_ids_and_gather_last():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    scores = torch.arange(10.0).view(2, 5)
    assert gather_last(scores, torch.tensor([4, 1])).tolist() == [4.0, 6.0]


def _generation_logprob_gap(model, prompts: list[list[int]], pass_position_ids: bool) -> float:
    """Max |log π(a_t)| difference between generate's logits and one full forward."""
    batch = collate_prompts(prompts, pad_id=0)  # (B, P) left-padded
    P = batch["input_ids"].shape[1]
    torch.manual_seed(0)
    out = model.generate(
        **batch, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    sequences = out.sequences  # (B, P + T)
    actions = sequences[:, P:]  # (B, T)
    # generate keeps attention_mask = 1 for every generated token (eos_token_id=None: no stopping).
    mask = torch.cat([batch["attention_mask"], torch.ones_like(actions)], dim=1)  # (B, P + T)
    position_ids = position_ids_from_mask(mask) if pass_position_ids else None
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(-1, actions[..., None])  # (B, T, 1)
    logp_gen = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, actions[..., None])
    return (logp - logp_gen).abs().max().item()


def test_forward_with_position_ids_matches_generation(tiny_dir):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # different lengths → left padding
    llama = load_causal_lm(tiny_dir).eval()
    assert _generation_logprob_gap(llama, prompts, pass_position_ids=True) < 1e-4

    # RoPE (Llama) is invariant to shifting all positions, so it cannot show why position ids
    # matter; absolute position embeddings (GPT-2) can: without them the forward disagrees.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)
    gpt2 = GPT2LMHeadModel(config).eval()
    assert _generation_logprob_gap(gpt2, prompts, pass_position_ids=True) < 1e-4
    assert _generation_logprob_gap(gpt2, prompts, pass_position_ids=False) > 1e-2


def test_missing_paths_give_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope: no such model directory"):
        load_causal_lm(missing)
    with pytest.raises(FileNotFoundError, match="nope: no such tokenizer directory"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        ScalarHeadModel.from_causal_lm(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a model directory \\(no config.json\\)"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty: could not load a tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_without_pad_falls_back_to_eos(tiny_dir, tmp_path, caplog):
    tokenizer = load_tokenizer(tiny_dir)
    tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["pad_token"]
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="ppomax"):
        reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token == "<|endoftext|>"
    assert "no pad token" in caplog.text
