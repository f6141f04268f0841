"""kill -9 at any moment: a PPO run SIGKILLed at seeded random points and resumed each time ends
exactly like an uninterrupted run (docs/reliability.md). The driver is ``ppomax.killtest``, which a
user runs by hand as ``python -m ppomax.killtest``."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest
import torch

from ppomax import checkpoint as ckpt_lib
from ppomax.tools import killtest
from ppomax.training import MetricsLogger, truncate_jsonl


@pytest.mark.skipif(sys.platform != "linux" or not hasattr(signal, "SIGKILL"), reason="needs Linux signals")
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    t0 = time.perf_counter()
    report = killtest.run(tmp_path, seed=0, steps=8)
    seconds = time.perf_counter() - t0
    assert not report["problems"], "\n".join(report["problems"])
    kills = report["kills"]
    assert len(kills) == 3 and all(k.startswith("SIGKILL ") for k in kills), kills
    # one kill landed inside a checkpoint write and left its temporary directory behind,
    # which check_checkpoints (run after every kill) did not accept as a checkpoint
    assert any("inside a checkpoint write" in k and "; left .tmp-checkpoint-" in k for k in kills), kills
    if not torch.cuda.is_available():  # the CPU budget; on a GPU each restart also starts CUDA (not measured)
        assert seconds < 60, f"took {seconds:.0f} s"


def _fake_checkpoint(run, name: str, complete: bool = True) -> None:
    (run / name).mkdir(parents=True)
    if complete:
        (run / name / "COMPLETE").write_text("x")


def test_temporary_and_incomplete_directories_are_never_checkpoints(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, "checkpoint-3")
    _fake_checkpoint(run, ".tmp-checkpoint-5-abcd")  # killed after writing COMPLETE, before the rename
    _fake_checkpoint(run, "checkpoint-7", complete=False)  # e.g. copied by hand, half-way
    _fake_checkpoint(run, ".old-checkpoint-9")
    assert ckpt_lib.list_checkpoints(run) == [run / "checkpoint-3"]
    assert ckpt_lib.resolve_resume(run, "latest") == run / "checkpoint-3"
    with pytest.raises(ckpt_lib.CheckpointError, match="not a complete ppomax checkpoint"):
        ckpt_lib.resolve_resume(run, str(run / "checkpoint-7"))
    # 'latest' on a run without any checkpoint yet starts from scratch (one command line for every restart)
    assert ckpt_lib.resolve_resume(tmp_path / "fresh", "latest") is None


class _Saveable:
    def save_pretrained(self, d):
        d.mkdir(parents=True, exist_ok=True)
        (d / "w.json").write_text("{}")


def test_rotation_keeps_the_new_and_protected_checkpoints_and_removes_temporaries(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, ".tmp-checkpoint-1-dead")  # left by a kill during an earlier save
    save = lambda step, keep=(): ckpt_lib.save_checkpoint(run, step, {"m": _Saveable()}, {}, {}, None,  # noqa: E731
                                                          save_total_limit=1, keep=keep)
    save(1)
    assert not (run / ".tmp-checkpoint-1-dead").exists()
    save(2, keep=(run / "checkpoint-1",))  # e.g. the collapse guard's last healthy checkpoint
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    save(3)
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["checkpoint-3"]
    # resuming at step 1 of a run that got further: an older newest checkpoint is never rotated away
    save(1)
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["checkpoint-1", "checkpoint-3"]
    ckpt_lib.discard_after(run, 1)  # what the trainers do on resume: the abandoned future goes
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["checkpoint-1"]


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path):
    # A crash between metrics.log(row) and save(): rows 4-5 exist, the checkpoint is at 3, and the
    # last line is half-written.
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "x"')
    MetricsLogger(tmp_path, resume_step=3).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 1, 2, 2, 3, 3, 4)))
    truncate_jsonl(samples, 2)
    assert [json.loads(line)["step"] for line in samples.read_text().splitlines()] == [1, 1, 2, 2]
