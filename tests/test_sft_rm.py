"""SFT and reward-model stages end to end on tiny models: learning, outputs, reload, resume."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from ppomax.config import RewardConfig, SFTConfig
from ppomax.data import write_jsonl
from ppomax.errors import UserError
from ppomax.models import ScalarHeadModel, build_tiny_model, load_causal_lm, load_tokenizer

ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow"]
COLORS = ["red", "blue", "green", "black", "white"]


def _sft_rows(n: int, seed: int = 0) -> list[dict]:
    """A small, very repetitive corpus: the response is a fixed template of the prompt's words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, c = rng.choice(ANIMALS), rng.choice(COLORS)
        rows.append({"prompt": f"Describe the {a}.", "response": f" The {a} is {c}. The {a} is happy."})
    return rows


def _pref_rows(n: int, seed: int = 0) -> list[dict]:
    """Separable preferences: chosen always says 'good', rejected always says 'bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, c = rng.choice(ANIMALS), rng.choice(COLORS)
        rows.append({"prompt": f"Rate the {c} {a}.", "chosen": f" The {c} {a} is good.",
                     "rejected": f" The {c} {a} is bad."})
    return rows



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_layers=2, hidden_size=64, vocab_size=512)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    write_jsonl(path, _sft_rows(60))
    return str(path)


def _sft_cfg(tiny, data, out, **kw) -> SFTConfig:
    base = dict(model_name_or_path=tiny, dataset=data, output_dir=str(out), learning_rate=3e-3,
                lr_scheduler_type="constant", per_device_train_batch_size=4, per_device_eval_batch_size=16,
                eval_split=0.2,
                max_steps=40, logging_steps=10, eval_steps=10, save_steps=20, warmup_ratio=0.0,
                report_to="none", disable_tqdm=True, seed=0)
    base.update(kw)
    return SFTConfig(**base)


@pytest.fixture(scope="module")
def sft_run(tiny, sft_data, tmp_path_factory):
    from ppomax.sft import train_sft

    out = tmp_path_factory.mktemp("sft")
    result = train_sft(_sft_cfg(tiny, sft_data, out))
    return out, result


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


def test_sft_lowers_eval_loss(sft_run):
    out, result = sft_run
    evals = [r["eval/loss"] for r in result["metrics"] if "eval/loss" in r]
    assert len(evals) == 4  # steps 10, 20, 30, 40
    # a repetitive corpus: the loss at least halves from the first eval to the last
    assert evals[-1] < 0.5 * evals[0], evals
    assert result["final"]["eval/loss"] == evals[-1]


def test_sft_writes_run_directory(sft_run, tiny):
    out, result = sft_run
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["stage"] == "sft" and cfg["config"]["learning_rate"] == 3e-3 and cfg["config"]["max_steps"] == 40
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows == result["metrics"]
    for r in rows:
        assert {"train/loss", "eval/loss", "eval/perplexity", "lr", "grad_norm", "epoch"} <= set(r)
        assert r["eval/perplexity"] == pytest.approx(2.718281828 ** r["eval/loss"], rel=1e-6)
    # step checkpoints (atomic, COMPLETE marker) and the final model
    for step in (20, 40):
        ck = out / f"checkpoint-{step}"
        assert (ck / "COMPLETE").exists() and (ck / "model" / "model.safetensors").exists()
        assert (ck / "optimizer-model.pt").exists() and (ck / "state.json").exists()
    reloaded = load_causal_lm(out)
    load_tokenizer(out)
    trained = result["model"].cpu()
    for (name, a), (_, b) in zip(trained.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    # it differs from the start
    start = load_causal_lm(tiny)
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight, reloaded.model.layers[0].mlp.up_proj.weight)


def test_sft_exact_resume(tiny, sft_data, tmp_path):
    from ppomax.sft import train_sft

    # cosine with warm-up: the scheduler state must be restored too
    kw = dict(max_steps=10, save_steps=5, logging_steps=1, eval_steps=5, save_total_limit=5,
              lr_scheduler_type="cosine", warmup_ratio=0.2,
              full_determinism=torch.cuda.is_available())  # bit for bit on a GPU: deterministic kernels
    full = train_sft(_sft_cfg(tiny, sft_data, tmp_path / "full", **kw))

    # Simulate a crash after step 5: only the run's files up to checkpoint-5 survive.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-5", crashed / "checkpoint-5")
    shutil.copy(tmp_path / "full" / "config.yaml", crashed / "config.yaml")
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:7]) + "\n")  # steps 1..7, 6-7 written after the save

    torch.manual_seed(999)  # the caller's RNG state must not matter
    resumed = train_sft(_sft_cfg(tiny, sft_data, crashed, resume_from=str(crashed / "checkpoint-5"), **kw))

    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["step"] for r in resumed["metrics"]] == [6, 7, 8, 9, 10]
    for r_full, r_res in zip(full["metrics"][5:], resumed["metrics"]):
        for k in ("train/loss", "lr", "grad_norm"):
            assert r_full[k] == r_res[k], k
    assert full["final"] == resumed["final"]
    # metrics.jsonl: no step counted twice after the resume
    steps = [json.loads(x)["step"] for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def _ragged_rows(n: int, stage: str) -> list[dict]:
    """Responses of 1 to 12 words: a mean of micro-batch means would weigh their tokens unequally."""
    rng = random.Random(1)
    rows = []
    for i in range(n):
        words = " " + " ".join(rng.choice(ANIMALS + COLORS) for _ in range(1 + i % 12))
        if stage == "sft":
            rows.append({"prompt": f"Say {i}:", "response": words})
        else:
            rows.append({"prompt": f"Pick {i}:", "chosen": words, "rejected": " no" * (1 + i % 5)})
    return rows


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_batch_8x1_equals_batch_1x8_with_accumulation(tiny, tmp_path, monkeypatch, stage):
    """The step's loss is the token (LM) / pair (Bradley-Terry) mean over the whole batch, so one
    micro-batch of 8 and 8 accumulated micro-batches of 1 end at the same weights. The old loop
    (per-micro-batch token means weighted by example count) gives each 1-word response the weight
    of a 12-word one and differs here by > 1e-3.

    Plain SGD stands in for AdamW so that Δθ = −lr·(clipped) gradient: AdamW's first steps are
    ≈ lr·g/(|g| + 1e-8), which turns float rounding of gradients near 0 into lr-sized noise (the
    value-head bias gets an exactly-zero Bradley-Terry gradient in exact arithmetic) and hides
    real gradient differences behind sign(g).
    """
    from ppomax import loop
    from ppomax.reward import train_reward_model
    from ppomax.sft import train_sft

    monkeypatch.setattr(loop, "make_optimizer", lambda params, lr, *a, **k: torch.optim.SGD(list(params), lr=lr))
    data = tmp_path / "data.jsonl"
    write_jsonl(data, _ragged_rows(24, stage))
    runs = []
    for micro, accum in ((8, 1), (1, 8)):
        kw = dict(model_name_or_path=tiny, dataset=str(data), output_dir=str(tmp_path / f"{micro}x{accum}"),
                  per_device_train_batch_size=micro, gradient_accumulation_steps=accum, max_steps=3,
                  learning_rate=0.1, lr_scheduler_type="constant", warmup_ratio=0.0, eval_split=0.0,
                  logging_steps=1, eval_steps=100, save_steps=100, report_to="none", disable_tqdm=True, seed=0)
        if stage == "sft":
            runs.append(train_sft(SFTConfig(**kw)))
        else:  # with the LM term: both units at once
            runs.append(train_reward_model(RewardConfig(**kw, rm_lm_coef=0.5)))
    a, b = (dict(r["model"].named_parameters()) for r in runs)
    moved = 0.0
    start = {k.removeprefix("model."): v for k, v in load_causal_lm(tiny).state_dict().items()}  # on the CPU
    for name, p in a.items():
        assert torch.allclose(p, b[name], rtol=0, atol=1e-6), (name, (p - b[name]).abs().max().item())
        key = name.removeprefix("backbone.").removeprefix("model.")  # RM backbone / causal LM names
        if key in start:
            moved = max(moved, (p.detach().cpu() - start[key]).abs().max().item())
    assert moved > 1e-4  # the weights did train
    # the logged losses are batch means too, whatever the split (step 1: the same weights)
    keys = ("train/loss",) if stage == "sft" else ("train/loss", "train/pair_loss", "train/lm_loss", "train/accuracy")
    for ra, rb in zip(runs[0]["metrics"], runs[1]["metrics"]):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_refuses_to_overwrite_a_different_run(tiny, sft_data, tmp_path):
    from ppomax.sft import train_sft

    out = tmp_path / "run"
    train_sft(_sft_cfg(tiny, sft_data, out, max_steps=1))
    with pytest.raises(UserError, match="already holds a different run"):
        train_sft(_sft_cfg(tiny, sft_data, out, max_steps=1, learning_rate=5e-4))
    # the refused run did not touch the directory
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["config"]["learning_rate"] == 3e-3
    train_sft(_sft_cfg(tiny, sft_data, out, max_steps=1, learning_rate=5e-4, overwrite_output_dir=True))
    assert yaml.safe_load((out / "config.yaml").read_text())["config"]["learning_rate"] == 5e-4


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


def _rm_cfg(tiny, data, out, **kw) -> RewardConfig:
    base = dict(model_name_or_path=tiny, dataset=data, output_dir=str(out), learning_rate=1e-3,
                per_device_train_batch_size=8, eval_split=0.25, max_steps=30, logging_steps=10,
                eval_steps=10, save_steps=100, warmup_ratio=0.0, report_to="none", disable_tqdm=True, seed=0)
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pref.jsonl"
    write_jsonl(path, _pref_rows(80))
    return str(path)


@pytest.fixture(scope="module")
def rm_run(tiny, pref_data, tmp_path_factory):
    from ppomax.reward import train_reward_model

    out = tmp_path_factory.mktemp("rm")
    return out, train_reward_model(_rm_cfg(tiny, pref_data, out))


def test_rm_learns_separable_preferences(rm_run):
    out, result = rm_run
    evals = [r for r in result["metrics"] if "eval/accuracy" in r]
    assert evals and evals[-1]["eval/accuracy"] > 0.9, evals
    assert evals[-1]["eval/margin"] > 0
    assert evals[-1]["eval/loss"] < 0.1  # an untrained head gives ≈ ln 2 = 0.69
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/pair_loss", "train/accuracy", "eval/loss", "eval/accuracy"} <= set(rows[-1])
    assert "train/lm_loss" not in rows[-1]  # β_rm = 0: no LM term


def test_saved_rm_reloads_with_identical_scores(rm_run, tiny):
    out, result = rm_run
    trained = result["model"].cpu().eval()
    reloaded = ScalarHeadModel.from_pretrained(out).eval()
    tok = load_tokenizer(out)
    enc = tok([" The red cat is good.", " The dog is bad. The dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = trained(enc["input_ids"], enc["attention_mask"])
        b = reloaded(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(a, b)


def test_rm_with_lm_loss_logs_lm_loss(tiny, pref_data, tmp_path):
    from ppomax.reward import train_reward_model

    result = train_reward_model(_rm_cfg(tiny, pref_data, tmp_path / "rm_lm", rm_lm_coef=0.5, max_steps=4,
                                        logging_steps=2, eval_steps=4))
    rows = result["metrics"]
    assert all("train/lm_loss" in r and r["train/lm_loss"] > 0 for r in rows)
    # loss = pair_loss + 0.5 · lm_loss, averaged over the logged steps
    for r in rows:
        assert r["train/loss"] == pytest.approx(r["train/pair_loss"] + 0.5 * r["train/lm_loss"], rel=1e-5)
    # the LM head trains with the backbone (tied to the embeddings) and the RM still saves/reloads
    ScalarHeadModel.from_pretrained(tmp_path / "rm_lm")


def test_rm_stage_scores_a_truncated_side_as_ppo_scores_a_truncated_sample(tiny, tmp_path):
    """Issue #24: a pair side marked ``chosen_truncated`` / ``rejected_truncated`` is scored by the rm
    stage at its last token, without EOS, exactly as PPO scores a sample cut at the length cap
    (``reward_model_scores`` on a response without EOS); a side that stopped is scored at its EOS, as
    PPO scores a sample that stopped. Before, the rm stage appended EOS to every side."""
    from ppomax.data import collate_preference, collate_prompts
    from ppomax.ppo.rollout import reward_model_scores
    from ppomax.reward import pair_scores
    from ppomax.sft import load_stage_data

    rows = [{"prompt": "Rate the red cat.", "chosen": " The red cat is good and", "rejected": " The cat is bad.",
             "chosen_truncated": True},
            {"prompt": "Rate it.", "chosen": " Fine.", "rejected": " It is bad and the", "rejected_truncated": True}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = RewardConfig(model_name_or_path=tiny, dataset=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "rm"),
                       eval_split=0.0, max_length=64, max_prompt_length=32, report_to="none")
    tok, examples, _, _ = load_stage_data(cfg, "preference")
    torch.manual_seed(0)
    model = ScalarHeadModel.from_causal_lm(tiny).eval()
    with torch.no_grad():
        rc, rr, _ = pair_scores(model, collate_preference(examples, tok.pad_token_id))
        # PPO's path: left-padded prompts, responses right-padded with a mask, the score at the last masked token
        prompts = collate_prompts([e["prompt_ids"] for e in examples], tok.pad_token_id)

        def ppo_scores(side: str, truncated: list[bool]) -> torch.Tensor:
            words = [tok(r[side], add_special_tokens=False)["input_ids"] for r in rows]
            resp = [w + ([] if t else [tok.eos_token_id]) for w, t in zip(words, truncated)]  # a sample that stopped has EOS
            T = max(map(len, resp))
            ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in resp])
            mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in resp])
            return reward_model_scores(model, prompts["input_ids"], prompts["attention_mask"], ids, mask)

        ppo_chosen, ppo_rejected = ppo_scores("chosen", [True, False]), ppo_scores("rejected", [False, True])
    assert examples[0]["chosen_ids"][-1] != tok.eos_token_id and examples[1]["rejected_ids"][-1] != tok.eos_token_id
    torch.testing.assert_close(rc, ppo_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rr, ppo_rejected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and with EOS appended (the old rule) the truncated side would score differently
        assert not torch.allclose(ppo_scores("chosen", [False, False])[0], ppo_chosen[0], atol=1e-4)
