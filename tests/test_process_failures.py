"""Failures that must end a run cleanly (issue 25 item 5; docs/reliability.md).

- A checkpoint write that fails on rank 0 of a 2-process run (the disk is full) stops both ranks with
  rank 0's error, instead of leaving rank 1 at a barrier until the process group times out (30 min
  under gloo). The two ranks are spawned as in tests/test_distributed.py; each catches its error and
  writes it down, so the harness sees what every rank raised and when.
- The collapse guard's rollback verifies the healthy checkpoint against its manifest, as resume does:
  a damaged one stops the run with an error naming the file, nothing loaded.
- A resumed run's TensorBoard events show each step once (SummaryWriter's purge_step).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ppomax.checkpoint import CheckpointError
from ppomax.config import PPOConfig
from ppomax.errors import UserError
from ppomax.models import build_tiny_model
from ppomax.ppo.trainer import PPOTrainer

PROMPTS = ["hello there", "the cat sat", "a dog ran", "say words"]
TWO_GPUS = torch.cuda.device_count() >= 2  # else the ranks run on CPU with gloo (tests/test_distributed.py)
BOUND_S = 60  # how long rank 1 may take to stop after rank 0 failed (gloo's own timeout is 30 minutes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_layers=1, hidden_size=32, num_heads=2)


def n_words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def _config(model_dir: str, out: str, **kw) -> PPOConfig:
    values = dict(model_name_or_path=model_dir, output_dir=out, critic_init="sft", max_steps=1, critic_pretrain_steps=0,
                  rollout_batch_size=4, num_mini_batches=1, per_device_train_batch_size=4, generation_batch_size=4,
                  response_length=6, report_to="none", disable_tqdm=True, num_sample_generations=0, seed=5)
    return PPOConfig.from_preset("ppo_max", **{**values, **kw})


# ---------------------------------------------------------------------------------------------
# A save that fails on rank 0
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_fails_on_rank_0(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == 0:  # the disk is full when rank 0 writes the first optimizer state of checkpoint-1

        def disk_full(obj, f, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))

        torch.save = disk_full
    result: dict = {"rank": rank, "error": None}
    try:
        PPOTrainer(_config(model_dir, str(Path(out) / "run")), prompts=PROMPTS, reward_fn=n_words).train()
    except Exception as e:  # what the CLI would print and exit 1 with
        result.update(error=str(e), user_error=isinstance(e, UserError), raised_at=time.time())
    Path(out, f"result-{rank}.json").write_text(json.dumps(result))
    if rank == 0:  # rank 0's process stays (as a script that catches the error would): its exit would
        deadline = time.monotonic() + 3 * BOUND_S  # close the connection and end rank 1's wait otherwise
        while not Path(out, "result-1.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    from ppomax.distributed import shutdown

    shutdown()


def test_a_failed_save_on_rank_0_stops_every_rank_with_its_error(tiny, tmp_path, monkeypatch):
    if not TWO_GPUS:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on CPU, as CI runs it
    monkeypatch.setenv("PPOMAX_CHECK_COLLECTIVES", "1")  # every collective on the rank's device (distributed.py)
    ctx = mp.start_processes(_save_fails_on_rank_0, args=(2, _free_port(), tiny, str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    failed_at = None  # when the harness first saw rank 0's error
    try:
        while not ctx.join(timeout=1.0):
            if failed_at is None and (tmp_path / "result-0.json").exists():
                failed_at = time.monotonic()
            # Before the fix rank 1 waited at the barrier after the save for as long as rank 0 lived (up to
            # gloo's 30-minute timeout), or died of gloo's "Connection closed by peer" when rank 0 exited.
            assert failed_at is None or time.monotonic() - failed_at < BOUND_S, \
                f"rank 1 still runs {BOUND_S} s after rank 0's save failed"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2))
    assert r0["error"] and r0["user_error"], r0  # the CLI prints a UserError without a traceback, exit 1
    assert f"could not write checkpoint {tmp_path / 'run' / 'checkpoint-1'} (while writing optimizer-" in r0["error"]
    assert "No space left on device" in r0["error"] and "(disk full)" in r0["error"]
    assert r1["error"] == r0["error"] and r1["user_error"], r1  # the same clear error on rank 1
    assert abs(r1["raised_at"] - r0["raised_at"]) < BOUND_S
    assert not (tmp_path / "run" / "checkpoint-1").exists()  # nothing half-written looks complete


# ---------------------------------------------------------------------------------------------
# The collapse guard's rollback to a damaged checkpoint
# ---------------------------------------------------------------------------------------------

# A collapse within three iterations (tests/test_guards.py): vanilla at a high learning rate.
COLLAPSE = dict(rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=4, generation_batch_size=8,
                response_length=8, learning_rate=5e-2, critic_learning_rate=1e-3, num_ppo_epochs=4, seed=0)


def share_of_e(prompts: list[str], responses: list[str]) -> list[float]:
    return [r.count("e") / max(len(r), 1) for r in responses]


def test_rollback_to_a_damaged_healthy_checkpoint_stops_naming_the_file(tiny, tmp_path):
    out = tmp_path / "run"
    damaged, done = out / "checkpoint-0" / "policy" / "model.safetensors", []

    def reward(prompts, responses):
        if not done:  # the first rollout: the guard saved checkpoint-0 before it
            b = bytearray(damaged.read_bytes())  # the same size, other bytes: only the manifest's hash tells
            b[len(b) // 2 : len(b) // 2 + 16] = bytes(16)
            damaged.write_bytes(bytes(b))
            done.append(True)
        return share_of_e(prompts, responses)

    cfg = PPOConfig.from_preset("vanilla", **{**COLLAPSE, "model_name_or_path": tiny, "output_dir": str(out),
                                              "critic_init": "sft", "critic_pretrain_steps": 0, "max_steps": 4,
                                              "save_steps": 100, "collapse_guard": "rollback", "report_to": "none",
                                              "disable_tqdm": True, "num_sample_generations": 0})
    tr = PPOTrainer(cfg, prompts=["Say some words:", "Tell me a story.", "The weather", "Once upon a time"],
                    reward_fn=reward)
    with pytest.raises(CheckpointError) as err:
        tr.train()
    msg = str(err.value)
    # before: the rollback loaded the damaged weights without a word and the run went on
    assert msg.startswith("collapse guard 'rollback': cannot roll back to the last healthy checkpoint, ")
    assert f"{damaged}: corrupt (its sha256 differs" in msg and "Nothing was loaded" in msg
    assert tr.kl_coef == 0.0  # vanilla's η: the rollback (which raises η to 0.05) did not happen
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any(r.get("collapse") for r in rows)  # the collapsing iteration stopped before its row


# ---------------------------------------------------------------------------------------------
# TensorBoard on resume
# ---------------------------------------------------------------------------------------------


def test_tensorboard_shows_each_step_once_after_a_resume(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    kw = dict(max_steps=3, save_steps=2, logging_steps=1, report_to="tensorboard")
    straight = PPOTrainer(_config(tiny, str(out), **kw), prompts=PROMPTS, reward_fn=n_words).train()
    resumed = PPOTrainer(_config(tiny, str(out), resume_from=str(out / "checkpoint-2"), **kw), prompts=PROMPTS,
                         reward_fn=n_words).train()  # step 3 again, as after a crash between its row and checkpoint
    assert [r["step"] for r in straight] == [1, 2, 3] and [r["step"] for r in resumed] == [3]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for tag in ("reward/raw_mean", "policy/loss", "kl/ref"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3], tag  # before: [1, 2, 3, 3]
        assert events[-1].value == pytest.approx(resumed[-1][tag], rel=1e-6), tag
