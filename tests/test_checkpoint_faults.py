"""Faults beyond SIGKILL (docs/reliability.md §1): a checkpoint damaged after it was written, and
a save that fails part-way (disk full).

- Damage: COMPLETE only says the writer finished. ``--resume_from latest`` checks each
  checkpoint's MANIFEST.json (size + sha256 of every file) and falls back to the newest intact
  one, with a warning naming the bad file and the one used; a checkpoint named explicitly that
  is damaged is an error naming the file.
- Disk full: the save's temporary directory goes, the previous checkpoint keeps its bytes, and
  the run stops with a CheckpointError (printed by the CLI without a traceback) that names the
  checkpoint, the part being written, the cause, and the intact checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from ppomax import checkpoint as ckpt_lib
from ppomax import cli
from ppomax.config import PPOConfig, SFTConfig
from ppomax.data import write_jsonl
from ppomax.models import ScalarHeadModel, build_tiny_model, load_causal_lm, load_tokenizer
from ppomax.ppo.trainer import PPOTrainer

PROMPTS = ["Say some words:", "Say a few words:", "Say three words:", "Say words:"]
PPO = dict(critic_init="sft", rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2,
           generation_batch_size=4, response_length=6, learning_rate=1e-3, critic_learning_rate=1e-3,
           critic_pretrain_steps=0, report_to="none", disable_tqdm=True, num_sample_generations=0,
           save_steps=1, save_total_limit=5, seed=0)
COMPARED = ("reward/raw_mean", "kl/ref", "policy/loss", "critic/value_loss")


def share_of_the(prompts: list[str], responses: list[str]) -> list[float]:
    return [sum(w == "the" for w in r.split()) / max(len(r.split()), 1) for r in responses]


def ppo(tiny: str, out: Path, **kw) -> PPOTrainer:
    cfg = PPOConfig.from_preset("ppo_max", **{**PPO, "model_name_or_path": tiny, "output_dir": str(out), **kw})
    return PPOTrainer(cfg, prompts=PROMPTS, reward_fn=share_of_the)


def files(ckpt: Path) -> dict[str, bytes]:
    return {p.relative_to(ckpt).as_posix(): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_layers=1, hidden_size=32, num_heads=2)


@pytest.fixture(scope="module")
def ppo_run(tiny, tmp_path_factory):
    """A 3-iteration PPO run with checkpoint-1, -2 and -3 (never modified: tests damage copies)."""
    out = tmp_path_factory.mktemp("ppo") / "run"
    rows = ppo(tiny, out, max_steps=3).train()
    assert [p.name for p in ckpt_lib.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return out, rows


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_bytes(p: Path) -> None:  # same size: only the hash can tell
    b = bytearray(p.read_bytes())
    b[len(b) // 2 : len(b) // 2 + 16] = bytes(16)
    p.write_bytes(bytes(b))


DAMAGE = {
    "truncated_weights": ("policy/model.safetensors", _truncate),
    "state_not_json": ("state.json", lambda p: p.write_text('{"step": 3, "rng": ')),
    "missing_optimizer": ("optimizer-critic.pt", lambda p: p.unlink()),
    "zeroed_bytes_same_size": ("critic/model.safetensors", _flip_bytes),
    "manifest_not_json": ("MANIFEST.json", lambda p: p.write_text("\0" * 64)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_latest_skips_a_damaged_newest_checkpoint(ppo_run, tiny, tmp_path, caplog, damage):
    src, rows = ppo_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    rel, damage_fn = DAMAGE[damage]
    bad = run / "checkpoint-3" / rel
    damage_fn(bad)
    assert (run / "checkpoint-3" / "COMPLETE").exists()  # the marker alone would have let it through

    with caplog.at_level(logging.WARNING, logger="ppomax"):
        tr = ppo(tiny, run, max_steps=4, resume_from="latest")
        resumed = tr.train()
    assert str(bad) in caplog.text  # the warning names the bad file ...
    assert f"resuming from {run / 'checkpoint-2'}, the newest intact checkpoint" in caplog.text  # ... and the one used
    assert [r["step"] for r in resumed] == [3, 4]
    for k in COMPARED:  # iteration 3 redone from checkpoint-2's state: the same as the first time
        assert resumed[0][k] == rows[2][k], k
    # the damaged checkpoint was replaced by a good one (the resumed run saved iteration 3 again)
    for step in (1, 2, 3, 4):
        ckpt_lib.verify_checkpoint(run / f"checkpoint-{step}")


def test_damaged_checkpoint_named_explicitly_is_an_error_naming_the_file(ppo_run, tiny, tmp_path):
    src, _ = ppo_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    bad = run / "checkpoint-3" / "policy" / "model.safetensors"
    _truncate(bad)
    before = {p.name: files(p) for p in run.glob("checkpoint-*")}, (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ckpt_lib.CheckpointError, match="damaged checkpoint") as e:
        ppo(tiny, run, max_steps=4, resume_from=str(run / "checkpoint-3")).train()
    assert f"{bad}: truncated or overwritten" in str(e.value)
    # not silently another checkpoint: nothing was resumed, removed or written
    assert ({p.name: files(p) for p in run.glob("checkpoint-*")}, (run / "metrics.jsonl").read_bytes()) == before


def test_no_intact_checkpoint_left_is_an_error_naming_each_bad_file(ppo_run, tiny, tmp_path):
    src, _ = ppo_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    bad = [run / f"checkpoint-{s}" / "state.json" for s in (1, 2, 3)]
    for p in bad:
        p.write_text("not json")
    with pytest.raises(ckpt_lib.CheckpointError, match="no intact checkpoint left") as e:
        ppo(tiny, run, max_steps=4, resume_from="latest").train()
    for p in bad:
        assert f"{p}: corrupt" in str(e.value) or f"{p}: truncated" in str(e.value)


def test_checkpoint_without_manifest_from_an_older_version_still_resumes(ppo_run, tiny, tmp_path):
    src, rows = ppo_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}" / ckpt_lib.MANIFEST).unlink()
    resumed = ppo(tiny, run, max_steps=3, resume_from=str(run / "checkpoint-2")).train()
    assert [r["step"] for r in resumed] == [3]
    for k in COMPARED:
        assert resumed[0][k] == rows[2][k], k


def test_sft_resume_latest_skips_a_damaged_checkpoint(tiny, tmp_path, caplog):
    from ppomax.sft import train_sft

    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": p, "response": " the a and the"} for p in PROMPTS * 4])
    kw = dict(model_name_or_path=tiny, dataset=str(data), output_dir=str(tmp_path / "sft"), save_steps=2,
              per_device_train_batch_size=4, eval_split=0.0, report_to="none", disable_tqdm=True, logging_steps=1,
              save_total_limit=5)
    full = train_sft(SFTConfig(max_steps=6, **kw))["metrics"]
    bad = tmp_path / "sft" / "checkpoint-6" / "model" / "model.safetensors"
    _truncate(bad)
    with caplog.at_level(logging.WARNING, logger="ppomax"):
        resumed = train_sft(SFTConfig(max_steps=6, resume_from="latest", **kw))["metrics"]
    assert str(bad) in caplog.text and f"resuming from {tmp_path / 'sft' / 'checkpoint-4'}" in caplog.text
    assert [r["step"] for r in resumed] == [5, 6]
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in full[4:]]
    ckpt_lib.verify_checkpoint(tmp_path / "sft" / "checkpoint-6")  # written again, intact


# ---------------------------------------------------------------------------------------------
# A save that fails part-way
# ---------------------------------------------------------------------------------------------


def test_disk_full_during_a_ppo_save_stops_cleanly_and_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch,
                                                                                      capsys):
    rm = tmp_path / "rm"
    torch.manual_seed(0)
    ScalarHeadModel.from_causal_lm(tiny).save_pretrained(rm, tokenizer=load_tokenizer(tiny))
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "run"
    argv = ["ppo", "--model_name_or_path", tiny, "--reward_model_path", str(rm), "--dataset", str(prompts),
            "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "1",
            "--critic_pretrain_steps", "0", "--rollout_batch_size", "4", "--per_device_train_batch_size", "4",
            "--generation_batch_size", "4", "--response_length", "6", "--report_to", "none", "--disable_tqdm",
            "--num_sample_generations", "0", "--resume_from", "latest"]
    real_save, seen = torch.save, {}

    def disk_full(obj, f, *a, **k):
        if ".tmp-checkpoint-4-" in str(f) and str(f).endswith("optimizer-critic.pt"):
            seen["previous"] = files(out / "checkpoint-2")  # what must survive, byte for byte
            Path(f).write_bytes(b"PK\3\4" + bytes(1000))  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert f"ppomax ppo: error: could not write checkpoint {out / 'checkpoint-4'} (while writing optimizer-critic.pt)" \
        in err, err
    assert "No space left on device" in err and "(disk full)" in err
    assert f"the newest complete checkpoint {out / 'checkpoint-2'} is intact" in err
    # on disk: no temporary directory, no checkpoint-4, checkpoint-2 not rotated away and unchanged
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert files(out / "checkpoint-2") == seen["previous"]
    ckpt_lib.verify_checkpoint(out / "checkpoint-2")
    # space freed: the same command line continues from checkpoint-2 and finishes
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main(argv) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [p.name for p in ckpt_lib.list_checkpoints(out)] == ["checkpoint-4"]


def test_sft_save_failing_inside_save_pretrained_keeps_the_previous_checkpoint(tiny, tmp_path):
    from ppomax.sft import train_sft

    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": p, "response": " the a"} for p in PROMPTS])
    out = tmp_path / "sft"
    model = load_causal_lm(tiny)
    real, seen = model.save_pretrained, {}

    def fails_at_step_2(d, *a, **k):
        real(d, *a, **k)
        if ".tmp-checkpoint-2-" in str(d):
            seen["previous"] = files(out / "checkpoint-1")
            _truncate(Path(d) / "model.safetensors")
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')

    model.save_pretrained = fails_at_step_2
    cfg = SFTConfig(model_name_or_path=tiny, dataset=str(data), output_dir=str(out), max_steps=3, save_steps=1,
                    per_device_train_batch_size=2, eval_split=0.0, report_to="none", disable_tqdm=True)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        train_sft(cfg, model=model)
    msg = str(e.value)
    assert f"could not write checkpoint {out / 'checkpoint-2'} (while writing model/)" in msg
    assert "SafetensorError" in msg and "(disk full)" in msg and f"{out / 'checkpoint-1'} is intact" in msg
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert files(out / "checkpoint-1") == seen["previous"]
    ckpt_lib.verify_checkpoint(out / "checkpoint-1")


class _Saveable:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "w.json").write_text("{}" if not self.fail else "{")
        if self.fail:
            raise OSError(errno.EIO, "Input/output error", str(d / "w.json"))


def test_failed_resave_of_the_same_step_keeps_the_existing_checkpoint(tmp_path, monkeypatch):
    # Re-saving a step (collapse rollback) replaces the directory only once the new one is complete.
    run = tmp_path / "run"
    ckpt_lib.save_checkpoint(run, 1, {"m": _Saveable()}, {}, {"x": 1})
    before = files(run / "checkpoint-1")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"\(while writing m/\): OSError: .*Input/output error"):
        ckpt_lib.save_checkpoint(run, 1, {"m": _Saveable(fail=True)}, {}, {"x": 2})
    assert files(run / "checkpoint-1") == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1"]  # no .tmp- or .old- directory
    assert ckpt_lib.load_state(run / "checkpoint-1")["x"] == 1

    # the swap itself fails after the old directory was moved aside: it is put back
    real_replace = ckpt_lib.os.replace

    def replace(src, dst):
        if ".tmp-checkpoint-" in str(src):
            raise OSError(errno.EIO, "Input/output error", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_lib.os, "replace", replace)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"\(while writing checkpoint-1 \(renaming it into place\)\)"):
        ckpt_lib.save_checkpoint(run, 1, {"m": _Saveable()}, {}, {"x": 3})
    assert files(run / "checkpoint-1") == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1"]
