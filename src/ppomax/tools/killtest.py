"""Kill a PPO run with SIGKILL at seeded random moments, resume it, and check nothing was lost.

    python -m ppomax.killtest [--workdir DIR] [--seed 0] [--steps 8]

In ``workdir`` (default: a new temporary directory) this builds a tiny model, a reward model and
a prompt file, runs ``ppomax ppo`` once without interruption (the reference), then runs the same
command again and SIGKILLs it three times -- shortly after start-up, right after a metrics row
was written (before that iteration's checkpoint), and in the middle of a checkpoint write -- each
time restarting the same command line, which carries ``--resume_from latest``. After every kill
it checks that the newest checkpoint loads and that no half-written ``.tmp-checkpoint-*``
directory counts as a checkpoint; at the end, that ``metrics.jsonl`` and ``samples.jsonl`` hold
every step exactly once, in order, and that metrics and final weights equal the reference run's.
Exit code 0 when every check holds. The guarantees are listed in docs/reliability.md; the test
``tests/test_kill_resume.py`` runs this. POSIX only (SIGKILL, SIGSTOP).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = ["Say some words:", "Tell me a story.", "The weather today", "Once upon a time", "Hello there"]
COMPARED = ("reward/raw_mean", "kl/ref", "policy/loss", "critic/value_loss")
SAMPLES_PER_STEP = 2
POLL = 0.001  # seconds between looks at the run directory (an iteration of the tiny run takes ~30 ms)


def make_assets(workdir: Path) -> dict[str, str]:
    """A tiny policy, a reward model on its backbone (seeded head) and a JSONL prompt file."""
    from ppomax.data import write_jsonl
    from ppomax.models import ScalarHeadModel, build_tiny_model, load_tokenizer
    from ppomax.training import forked_rng

    tiny = build_tiny_model(workdir / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    with forked_rng(0):
        ScalarHeadModel.from_causal_lm(tiny).save_pretrained(workdir / "rm", tokenizer=load_tokenizer(tiny))
    write_jsonl(workdir / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return {"model": str(tiny), "rm": str(workdir / "rm"), "prompts": str(workdir / "prompts.jsonl")}


def ppo_argv(assets: dict[str, str], out: Path, steps: int, seed: int) -> list[str]:
    """The one command line used for the first start and every restart (`--resume_from latest`).
    On a GPU it adds --full_determinism: without deterministic kernels two runs differ in the last
    bits (docs/reliability.md), and the comparison with the reference would measure that instead."""
    import torch

    return [
        sys.executable, "-m", "ppomax", "ppo", "--model_name_or_path", assets["model"],
        "--reward_model_path", assets["rm"], "--dataset", assets["prompts"], "--output_dir", str(out),
        "--max_steps", str(steps), "--critic_pretrain_steps", "1", "--rollout_batch_size", "4",
        "--num_mini_batches", "2", "--per_device_train_batch_size", "2", "--generation_batch_size", "4",
        "--response_length", "8", "--learning_rate", "1e-3", "--critic_learning_rate", "1e-3",
        "--num_sample_generations", str(SAMPLES_PER_STEP), "--save_steps", "1", "--save_total_limit", "2",
        "--report_to", "none", "--disable_tqdm", "--seed", str(seed), "--resume_from", "latest",
    ] + (["--full_determinism"] if torch.cuda.is_available() else [])


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)


def _temp_dirs(out: Path) -> set[str]:
    try:
        return {n for n in os.listdir(out) if n.startswith(".tmp-checkpoint-")}
    except FileNotFoundError:
        return set()


def _n_rows(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _stop(proc: subprocess.Popen) -> None:
    """SIGSTOP and wait until the process is really stopped (Linux: /proc state 'T')."""
    os.kill(proc.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    for _ in range(1000):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        except (OSError, IndexError):
            break
        time.sleep(POLL)
    time.sleep(0.02)  # no /proc: give the signal time to land


def kill_after_start(proc: subprocess.Popen, out: Path, delay: float) -> str:
    """SIGKILL ``delay`` seconds after the run wrote config.yaml (its loop is about to start)."""
    while proc.poll() is None and not (out / "config.yaml").exists():
        time.sleep(POLL)
    time.sleep(delay)
    return _kill(proc, f"{delay * 1000:.0f} ms after start-up")


def kill_after_rows(proc: subprocess.Popen, out: Path, new_rows: int, delay: float) -> str:
    """SIGKILL ``delay`` s after ``new_rows`` more metrics rows appeared (before their checkpoint)."""
    start = _n_rows(out)
    while proc.poll() is None and _n_rows(out) < start + new_rows:
        time.sleep(POLL)
    time.sleep(delay)
    return _kill(proc, f"{delay * 1000:.1f} ms after metrics row {start + new_rows} was written")


def kill_in_checkpoint_write(proc: subprocess.Popen, out: Path, skip: int, delay: float) -> str:
    """Let ``skip`` checkpoint writes finish, then freeze the process inside the next one
    (its temporary directory exists) ``delay`` s after it began, and SIGKILL it there."""
    stale, seen = _temp_dirs(out), set()
    while proc.poll() is None:
        new = _temp_dirs(out) - stale - seen
        if not new:
            time.sleep(POLL)
            continue
        if len(seen) < skip:
            seen |= new
            continue
        time.sleep(delay)
        _stop(proc)
        caught = sorted(_temp_dirs(out) - stale)
        if caught:
            return _kill(proc, f"inside a checkpoint write ({caught[0]} exists, {delay * 1000:.1f} ms in)")
        os.kill(proc.pid, signal.SIGCONT)  # the write had already finished: try the next one
        seen |= new
    return _kill(proc, "never: the run finished first")


def _kill(proc: subprocess.Popen, where: str) -> str:
    if proc.poll() is not None:
        return f"not killed (exited with {proc.returncode} first); planned: {where}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return f"SIGKILL {where}"


def check_checkpoints(out: Path) -> list[str]:
    """Problems with the run directory right after a kill (empty list: all good).

    The newest complete checkpoint must load completely (state, RNG, both models with finite
    weights, weights-only optimizer states), and no temporary directory may be listed.
    """
    import torch
    from safetensors.torch import load_file

    from ppomax import checkpoint as ckpt_lib
    from ppomax.models import ScalarHeadModel, load_causal_lm

    problems = []
    listed = ckpt_lib.list_checkpoints(out)
    for p in listed:
        if not p.name.startswith("checkpoint-"):
            problems.append(f"{p.name} listed as a checkpoint")
    if not listed:
        return problems  # killed before the first checkpoint: the restart begins from scratch
    latest = ckpt_lib.resolve_resume(out, "latest")
    if latest.name.startswith("."):
        problems.append(f"--resume_from latest picked {latest.name}")
    try:
        state = ckpt_lib.load_state(latest)
        load_file(latest / "rng.safetensors")
        for name, model in (("policy", load_causal_lm(latest / "policy")),
                            ("critic", ScalarHeadModel.from_pretrained(latest / "critic"))):
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                problems.append(f"{latest.name}/{name} has non-finite weights")
            torch.load(latest / f"optimizer-{name}.pt", map_location="cpu", weights_only=True)
        if state["step"] != int(latest.name.split("-")[1]):
            problems.append(f"{latest.name}/state.json says step {state['step']}")
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        problems.append(f"{latest.name} does not load: {type(e).__name__}: {e}")
    return problems


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare_runs(ref: Path, out: Path, total: int, tol: float = 1e-5) -> list[str]:
    """Problems with the finished, killed-and-resumed run compared with the reference run."""
    import torch

    from ppomax.models import load_causal_lm

    problems = []
    rows, ref_rows = read_jsonl(out / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    if steps != list(range(1, total + 1)):
        problems.append(f"metrics.jsonl steps are {steps}, expected 1..{total} once each")
    for a, b in zip(ref_rows, rows):
        for k in COMPARED:
            if (k in a) != (k in b) or (k in a and not math.isclose(a[k], b[k], rel_tol=0, abs_tol=tol)):
                problems.append(f"step {b['step']}: {k} = {b.get(k)} but {a.get(k)} in the uninterrupted run")
    sample_steps = [r["step"] for r in read_jsonl(out / "samples.jsonl")]
    expected = [s for s in range(1, total + 1) for _ in range(SAMPLES_PER_STEP)]
    if sample_steps != expected:
        problems.append(f"samples.jsonl steps are {sample_steps}, expected each step {SAMPLES_PER_STEP}× in order")
    final, ref_final = out / f"checkpoint-{total}", ref / f"checkpoint-{total}"
    if not (final / "COMPLETE").exists():
        problems.append(f"no complete {final.name}")
    else:
        a = dict(load_causal_lm(ref_final / "policy").named_parameters())
        for k, v in load_causal_lm(final / "policy").named_parameters():
            if not torch.allclose(v, a[k], atol=1e-6, rtol=0):
                problems.append(f"final policy weight {k} differs from the uninterrupted run")
    if _temp_dirs(out):
        problems.append(f"temporary directories left after the final save: {sorted(_temp_dirs(out))}")
    return problems


def run(workdir: Path, seed: int = 0, steps: int = 8, echo: bool = False) -> dict[str, Any]:
    """Reference run, three seeded kills with restarts, checks. Returns a report dict:
    ``kills`` (where each kill landed), ``problems`` (empty when every guarantee held), ``seconds``."""
    from ppomax.checkpoint import list_checkpoints

    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    say = print if echo else (lambda *a, **k: None)
    assets = make_assets(workdir)
    total = steps + 1  # one critic pre-training iteration, then `steps` PPO iterations
    ref, out, log = workdir / "reference", workdir / "killed", workdir / "runs.log"
    say(f"reference run (uninterrupted, in the background) -> {ref}")
    reference = _start(ppo_argv(assets, ref, steps, seed), workdir / "reference.log")
    rng = random.Random(seed)
    plan = [
        lambda p: kill_after_start(p, out, rng.uniform(0.0, 0.06)),
        lambda p: kill_after_rows(p, out, rng.randint(1, 3), rng.choice([0.0, rng.uniform(0.0, 0.01)])),
        lambda p: kill_in_checkpoint_write(p, out, rng.randint(0, 2), rng.uniform(0.0, 0.01)),
    ]
    argv = ppo_argv(assets, out, steps, seed)
    kills, problems = [], []
    for i, kill in enumerate(plan, start=1):
        where = kill(_start(argv, log))
        left = sorted(_temp_dirs(out))
        kills.append(where + (f"; left {left[0]}" if left else ""))
        say(f"run {i}: {kills[-1]}")
        found = check_checkpoints(out)
        problems += [f"after kill {i}: {p}" for p in found]
        newest = [p.name for p in list_checkpoints(out)]
        say(f"  checkpoints: {newest or 'none yet'}; newest loads: {'yes' if not found else found}")
    say("final restart, to the end")
    rc, ref_rc = _start(argv, log).wait(), reference.wait()
    if rc != 0:
        problems.append(f"final resumed run failed with exit code {rc} (see {log})")
    if ref_rc != 0:
        problems.append(f"reference run failed with exit code {ref_rc} (see {workdir / 'reference.log'})")
    if rc == 0 and ref_rc == 0:
        problems += compare_runs(ref, out, total)
    return {"kills": kills, "problems": problems, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppomax.killtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="Where models and runs go (default: a new temp dir).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the training runs and of the kill points.")
    parser.add_argument("--steps", type=int, default=8, help="PPO iterations (after one critic pre-training step).")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ppomax-killtest-"))
    report = run(workdir, seed=args.seed, steps=args.steps, echo=True)
    if report["problems"]:
        print("FAILED:")
        for p in report["problems"]:
            print(f"  - {p}")
        return 1
    print(f"OK in {report['seconds']:.0f} s: after {len(report['kills'])} kills the newest checkpoint always loaded, "
          f"metrics.jsonl has steps 1..{args.steps + 1} once each, and metrics and weights equal the "
          f"uninterrupted run's. Runs are in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
