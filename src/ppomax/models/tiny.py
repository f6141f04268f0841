"""A tiny random Llama with a byte-level BPE tokenizer trained on built-in text, for tests and smoke runs
(``ppomax tiny-model``). Nothing is downloaded."""

from __future__ import annotations

import os
from collections.abc import Sequence


def _corpus_lines(corpus: Sequence[str] | str | os.PathLike | None) -> list[str]:
    if corpus is None:
        from importlib.resources import files

        text = files("ppomax").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
        return [line for line in text.splitlines() if line.strip()]
    if isinstance(corpus, (str, os.PathLike)):
        with open(corpus, encoding="utf-8") as f:
            return [line for line in f.read().splitlines() if line.strip()]
    return list(corpus)


def build_tiny_model(
    output_dir: str | os.PathLike,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    seed: int = 0,
    corpus: Sequence[str] | str | os.PathLike | None = None,
) -> str:
    """Write a random tiny Llama + byte-level BPE tokenizer to ``output_dir`` (for tests/demos).

    The tokenizer is trained on ``corpus`` (lines of text, a text file path, or the built-in
    English corpus when None), with ``<|endoftext|>`` as bos = eos = pad (like SmolLM2, so the
    pad == eos code paths are exercised) and a ChatML template. Global RNG state is untouched.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ppomax.models.loading import CHAT_TOKENS, CHATML_TEMPLATE, EOS_TOKEN, save_causal_lm
    from ppomax.training import forked_rng

    if hidden_size % num_heads:
        raise ValueError(f"num_heads = {num_heads} must divide hidden_size = {hidden_size}")
    n_special = 1 + len(CHAT_TOKENS)
    if vocab_size < 256 + n_special + 1:
        raise ValueError(f"vocab_size must be at least {256 + n_special + 1} (bytes + special tokens)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, *CHAT_TOKENS],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus_lines(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),  # saved as "extra_special_tokens" in v5
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )
    eos_id = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    with forked_rng(seed):  # the caller's streams (CUDA's too: manual_seed reseeds it) stay where they were
        model = LlamaForCausalLM(config)
    save_causal_lm(model, tokenizer, output_dir)
    return os.fspath(output_dir)
