"""No deprecated transformers / torch / peft API on ppomax's paths (issue #11, item 8).

Each stage runs one real step (SFT, reward model, PPO with LoRA and activation checkpointing,
``evaluate.sample_responses``) inside ``no_deprecations()``, which fails on any deprecation
notice: Python warnings (transformers' ``deprecate_kwarg`` and checkpointing aliases raise
FutureWarning, torch and peft use warnings too) and the libraries' log records (transformers'
``logger.warning_once``, e.g. "`past_key_values`/`cache_params` are deprecated"). A deprecated
call works today and breaks on the release that removes it, so the range in pyproject stays
honest only if none is left. The ``compat`` tests below also cover the older-transformers
branches (``past_key_values`` / ``gradient_checkpointing_enable``) with stand-in classes.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from transformers.utils import logging as hf_logging  # also installs logging.Logger.warning_once

from ppomax import compat
from ppomax import models as M
from ppomax.config import PPOConfig, RewardConfig, SFTConfig
from ppomax.data import write_jsonl

DEPRECATED = re.compile("deprecat", re.IGNORECASE)
LOGGERS = ("transformers", "peft", "accelerate", "torch")
PROMPTS = ["hello there", "the cat sat", "a dog ran", "say words"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def no_deprecations():
    """Fail if the body triggers a deprecation warning or a logged deprecation notice."""
    # transformers' Logger.warning_once is a functools.lru_cache on (logger, message)
    # (transformers/utils/logging.py): a notice already shown in this process, e.g. by another
    # test, would be silent here. Clearing it makes every notice fire again.
    logging.Logger.warning_once.cache_clear()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # a test that lowered it to ERROR must not hide warnings here
    handler = _Records()
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # no "once per location" registry hiding a repeat
            yield
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    found = [f"{w.category.__name__} ({w.filename}:{w.lineno}): {w.message}" for w in caught
             if issubclass(w.category, (DeprecationWarning, FutureWarning, UserWarning))
             and DEPRECATED.search(str(w.message))]
    found += [f"log {r.name}: {r.getMessage()}" for r in handler.records if DEPRECATED.search(r.getMessage())]
    assert not found, "deprecated API used:\n" + "\n".join(dict.fromkeys(found))


def checkpointing_on(model) -> bool:
    """Whether any transformer block of ``model`` recomputes its activations in the backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return M.build_tiny_model(tmp_path_factory.mktemp("dep") / "tiny", num_layers=2, hidden_size=32, num_heads=2)


# ---------------------------------------------------------------------------------------------
# The check itself can fail
# ---------------------------------------------------------------------------------------------


def test_the_check_sees_a_warning_once_notice_already_shown_earlier():
    logger = logging.getLogger("transformers.ppomax_test")
    logger.warning_once("`old_name` is deprecated (test notice)")  # fills the once-cache
    with pytest.raises(AssertionError, match="old_name"):
        with no_deprecations():
            logger.warning_once("`old_name` is deprecated (test notice)")


def test_the_check_sees_a_future_warning():
    with pytest.raises(AssertionError, match="FutureWarning.*old_kwarg"):
        with no_deprecations():
            warnings.warn("`old_kwarg` is deprecated", FutureWarning, stacklevel=1)


def test_the_check_ignores_other_warnings():
    with no_deprecations():
        warnings.warn("a plain user warning", UserWarning, stacklevel=1)


# ---------------------------------------------------------------------------------------------
# One step of every stage
# ---------------------------------------------------------------------------------------------


def test_sft_step_uses_no_deprecated_api(tiny, tmp_path):
    from ppomax.sft import train_sft

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "say", "response": " the cat"}] * 8)
    cfg = SFTConfig(model_name_or_path=tiny, dataset=str(tmp_path / "sft.jsonl"), output_dir=str(tmp_path / "sft"),
                    max_steps=1, per_device_train_batch_size=4, eval_split=0.25, save_steps=1, report_to="none",
                    disable_tqdm=True, gradient_checkpointing=True)
    with no_deprecations():
        res = train_sft(cfg)
    assert checkpointing_on(res["model"])


def test_rm_step_uses_no_deprecated_api(tiny, tmp_path):
    from ppomax.reward import train_reward_model

    write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "rate", "chosen": " good", "rejected": " bad"}] * 8)
    cfg = RewardConfig(model_name_or_path=tiny, dataset=str(tmp_path / "pref.jsonl"), output_dir=str(tmp_path / "rm"),
                       max_steps=1, per_device_train_batch_size=4, eval_split=0.25, save_steps=1, report_to="none",
                       disable_tqdm=True, gradient_checkpointing=True)
    with no_deprecations():
        res = train_reward_model(cfg)
    assert isinstance(res["model"], M.ScalarHeadModel) and checkpointing_on(res["model"])


def test_ppo_step_with_lora_and_checkpointing_uses_no_deprecated_api(tiny, tmp_path):
    pytest.importorskip("peft")
    from ppomax.ppo.trainer import PPOTrainer

    cfg = PPOConfig.from_preset(
        "ppo_max", model_name_or_path=tiny, output_dir=str(tmp_path / "ppo"), critic_init="sft", max_steps=1,
        critic_pretrain_steps=0, rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2,
        response_length=6, report_to="none", disable_tqdm=True, use_peft=True, critic_use_peft=True,
        gradient_checkpointing=True, save_steps=1, seed=3)
    with no_deprecations():
        trainer = PPOTrainer(cfg, prompts=PROMPTS, reward_fn=lambda p, r: [float(len(x)) for x in r])
        before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" in n}
        trainer.train()
    assert M.is_peft_model(trainer.policy) and checkpointing_on(trainer.policy) and checkpointing_on(trainer.critic)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters() if "lora_" in n)


def test_eval_sampling_uses_no_deprecated_api(tiny, tmp_path):
    from ppomax.evaluate import sample_responses

    tokenizer = M.load_tokenizer(tiny)
    policy, ref = M.load_causal_lm(tiny), M.load_causal_lm(tiny)
    rm = M.ScalarHeadModel.from_causal_lm(tiny)
    with no_deprecations():
        out = sample_responses(policy, tokenizer, [[5, 6, 7], [8, 9]], 5, ref_policy=ref, reward_model=rm)
    assert len(out["responses"]) == 2 and len(out["rm"]) == 2
    assert out["kl"] == [0.0, 0.0]  # the reference is the same weights: log π − log π_ref = 0 exactly


# ---------------------------------------------------------------------------------------------
# compat: the current API where the model has it, the older one otherwise
# ---------------------------------------------------------------------------------------------


class _OldForward(torch.nn.Module):  # a model as transformers < 5.20 writes it
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return input_ids


class _NewForward(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


class _Wrapper(torch.nn.Module):  # a peft-style wrapper: forward(**kwargs), the names are on the base
    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_base_model(self):
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


def test_cache_kwargs_follows_the_base_models_forward():
    c = object()
    assert compat.cache_kwargs(_OldForward(), c) == {"past_key_values": c}
    assert compat.cache_kwargs(_NewForward(), c) == {"cache": c}
    assert compat.cache_kwargs(_Wrapper(_OldForward()), c) == {"past_key_values": c}
    assert compat.cache_kwargs(_Wrapper(_NewForward()), c) == {"cache": c}


def test_cache_kwargs_of_the_installed_transformers_matches_the_forward(tiny):
    import inspect

    model = M.load_causal_lm(tiny)
    (name,) = compat.cache_kwargs(model, None)
    assert name in inspect.signature(type(model).forward).parameters


def test_output_cache_reads_either_field_name():
    @dataclass
    class Old:
        logits: object = None
        past_key_values: object = None

    @dataclass
    class New:
        logits: object = None
        cache: object = None

    c = object()
    assert compat.output_cache(Old(past_key_values=c)) is c
    assert compat.output_cache(New(cache=c)) is c


def test_enable_activation_checkpointing_prefers_the_current_name():
    calls = []

    class Both:
        def activation_checkpointing_enable(self):
            calls.append("activation")

        def gradient_checkpointing_enable(self):
            calls.append("gradient")

    class OldOnly:
        def gradient_checkpointing_enable(self):
            calls.append("gradient")

    compat.enable_activation_checkpointing(Both())
    compat.enable_activation_checkpointing(OldOnly())
    assert calls == ["activation", "gradient"]

