"""Check ppomax on a GPU machine and end with one verdict line.

    python -m ppomax.gpu_check [--out DIR] [--workers 8] [--steps 3]      # on a CUDA machine
    python -m ppomax.gpu_check --smoke                                     # anywhere: the CPU rehearsal

Two parts, each written to ``--out`` as it finishes (so a run cut short by a time limit keeps what
it had), then the last line of output is the verdict, ``GPU CHECK: PASS`` or ``GPU CHECK: FAIL:
<reasons>``:

1. the test suite (the ``tests/`` folder of the source checkout, or ``--tests DIR``) with pytest
   on this machine, so every test runs on the device the library picks: CUDA here. The
   two-process tests hide the GPU from their ranks unless there are two (tests/test_distributed.py);
   ``pytest.txt`` holds the output, ``junit.xml`` the tracebacks;
2. a short PPO run of a random Llama of real shape (SmolLM2-135M's: hidden 576, 30 layers, 9
   heads, 3 KV heads, FFN 1536, a 49 152-token vocabulary; random weights built here, nothing is
   downloaded) under bf16 autocast, run twice with ``--full_determinism``: every iteration must
   apply its update with finite losses, the policy's weights must move, and the two runs must
   agree bit for bit (the GPU half of docs/reliability.md's determinism guarantee).

``--smoke`` runs part 2 on the CPU with a tiny shape and two iterations, and part 1 only when
``--tests`` is given: tests/test_gpu_check.py runs it in CI, so this script cannot rot. A tool,
not part of the library (like ``ppomax.tools.killtest``): nothing in ppomax imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# SmolLM2-135M's architecture (its config.json), the model of the SmolLM2 study; random weights.
REAL_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152)
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)
PROMPTS = [f"Write a short story about a {w} and a lighthouse." for w in
           ("cat", "robot", "river", "violin", "storm", "gardener", "comet", "baker")]


def environment() -> dict[str, Any]:
    import torch

    import ppomax

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "ppomax": os.path.dirname(ppomax.__file__)}
    for lib in ("transformers", "accelerate", "peft"):
        try:
            env[lib] = __import__(lib).__version__
        except ImportError:
            env[lib] = None
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    return env


def default_tests_dir() -> Path | None:
    """The source checkout's tests/ (src/ppomax/../../tests), if this ppomax is one."""
    import ppomax

    d = Path(ppomax.__file__).resolve().parents[2] / "tests"
    return d if (d / "conftest.py").exists() else None


def run_suite(tests: Path, out: Path, workers: int, timeout: float) -> dict[str, Any]:
    """pytest on ``tests`` in a subprocess: its return code, summary line and failed test ids."""
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={out / 'junit.xml'}",
           str(tests)]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd[4:4] = ["-n", str(workers)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tests.parent)
        text, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s", -1
    (out / "pytest.txt").write_text(text, encoding="utf-8")
    summary = next((line.strip("= ") for line in reversed(text.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", line)), "no pytest summary")
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)))
    return {"command": " ".join(cmd), "rc": rc, "summary": summary, "failed": failed,
            "seconds": round(time.perf_counter() - t0, 1)}


def build_model(root: Path, shape: dict[str, int]) -> str:
    """A random Llama of ``shape`` with the tiny BPE tokenizer (ids past its 512 decode to nothing,
    which the reward below does not mind): nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppomax.models import build_tiny_model, load_tokenizer, save_causal_lm
    from ppomax.training import forked_rng

    tok = load_tokenizer(build_tiny_model(root / "tokenizer", num_layers=1, hidden_size=16, num_heads=2))
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with forked_rng(0):
        model = LlamaForCausalLM(cfg)
    save_causal_lm(model, tok, root / "model")
    return str(root / "model")


def ppo_run(model: str, out: Path, device: str, steps: int, batch: int, response: int) -> dict[str, Any]:
    """``steps`` bf16 PPO iterations with --full_determinism; the rows, the weights' movement, a digest."""
    import torch

    from ppomax.config import PPOConfig
    from ppomax.ppo.trainer import PPOTrainer

    cfg = PPOConfig.from_preset(
        "ppo_max", model_name_or_path=model, output_dir=str(out), device=device, bf16=True, full_determinism=True,
        critic_init="sft", rollout_batch_size=batch, generation_batch_size=batch, num_mini_batches=2,
        per_device_train_batch_size=batch // 2, response_length=response, critic_pretrain_steps=0, max_steps=steps,
        save_steps=10**6, learning_rate=1e-5, critic_learning_rate=1e-5, report_to="none", disable_tqdm=True,
        num_sample_generations=0, seed=0)
    tr = PPOTrainer(cfg, prompts=PROMPTS, reward_fn=lambda p, r: [len(set(x.split())) / 10 for x in r])
    start = [p.detach().float().cpu().clone() for p in tr.policy.parameters()]
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tr.device)
    t0 = time.perf_counter()
    rows = tr.train()
    seconds = time.perf_counter() - t0
    moved = sum(not torch.equal(p.detach().float().cpu(), s) for p, s in zip(tr.policy.parameters(), start))
    weights = [p.detach().float().cpu() for p in tr.policy.parameters()]
    return {"rows": rows, "seconds": round(seconds, 2), "params_moved": moved, "params": len(start),
            "weights": weights, "device": str(tr.device),
            "peak_gib": round(torch.cuda.max_memory_allocated(tr.device) / 2**30, 2) if tr.device.type == "cuda" else None}


COMPARED = ("reward/raw_mean", "kl/ref", "policy/loss", "critic/value_loss", "grad_norm/policy", "grad_norm/critic")


def judge_ppo(a: dict, b: dict, steps: int) -> list[str]:
    """Problems with two identical PPO runs (empty: all good)."""
    import torch

    problems = []
    if len(a["rows"]) != steps:
        problems.append(f"PPO logged {len(a['rows'])} of {steps} iterations")
    for r in a["rows"]:
        if r.get("skipped"):
            problems.append(f"PPO iteration {r['step']} skipped its update: {r.get('skip_cause')}")
        bad = [k for k in COMPARED if not math.isfinite(r.get(k, float("nan")))]
        if bad:
            problems.append(f"PPO iteration {r['step']}: non-finite or missing {', '.join(bad)}")
    if a["params_moved"] == 0:
        problems.append("PPO did not move the policy's weights")
    diff = [(ra["step"], k) for ra, rb in zip(a["rows"], b["rows"]) for k in COMPARED if ra.get(k) != rb.get(k)]
    if diff or len(a["rows"]) != len(b["rows"]):
        problems.append(f"two runs with --full_determinism differ (first: iteration {diff[0][0]}, {diff[0][1]})"
                        if diff else "two runs with --full_determinism logged different iterations")
    elif not all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"])):
        problems.append("two runs with --full_determinism end with different weights")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppomax.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="Where reports go (default: a new temporary directory).")
    parser.add_argument("--smoke", action="store_true", help="CPU rehearsal: tiny shape, 2 iterations, no suite.")
    parser.add_argument("--tests", default=None, help="The tests folder (default: the checkout's tests/).")
    parser.add_argument("--skip-tests", action="store_true", help="Leave out part 1 (the verdict says so).")
    parser.add_argument("--workers", type=int, default=8, help="pytest-xdist workers when it is installed.")
    parser.add_argument("--suite-timeout", type=float, default=1800.0, help="Seconds for the whole suite.")
    parser.add_argument("--steps", type=int, default=None, help="PPO iterations (default 3; --smoke 2).")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="ppomax-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (2 if args.smoke else 3)
    report: dict[str, Any] = {"environment": environment(), "smoke": args.smoke}
    problems, notes = [], []

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")

    save()
    env = report["environment"]
    print(f"torch {env['torch']}, CUDA available: {env['cuda_available']} {env.get('gpus', '')}; reports in {out}")
    if not args.smoke and not env["cuda_available"]:
        problems.append("no CUDA device is visible (use --smoke for the CPU rehearsal)")
    tests = Path(args.tests) if args.tests else (None if args.smoke else default_tests_dir())
    if args.skip_tests or (args.smoke and tests is None):
        notes.append("test suite not run")
    elif tests is None or not tests.is_dir():
        problems.append("test suite not found (run from a source checkout, or pass --tests DIR or --skip-tests)")
    elif not problems:
        print(f"part 1: pytest {tests} ...", flush=True)
        suite = report["suite"] = run_suite(tests, out, args.workers, args.suite_timeout)
        save()
        print(f"  {suite['summary']} ({suite['seconds']} s)")
        if suite["rc"] != 0:
            shown = ", ".join(suite["failed"][:5]) + (" ..." if len(suite["failed"]) > 5 else "")
            problems.append(f"test suite: {suite['summary']}" + (f" ({shown})" if shown else ""))
    if not problems or args.smoke:
        shape = SMOKE_SHAPE if args.smoke else REAL_SHAPE
        print(f"part 2: bf16 PPO, {steps} iterations, random Llama {shape}, twice with --full_determinism ...",
              flush=True)
        with tempfile.TemporaryDirectory(dir=out) as work:
            try:
                model = build_model(Path(work), shape)
                device = "cpu" if args.smoke else "cuda"
                batch, response = (4, 8) if args.smoke else (16, 64)
                a, b = (ppo_run(model, Path(work) / f"run{i}", device, steps, batch, response) for i in (1, 2))
                found = judge_ppo(a, b, steps)
                report["ppo"] = {"shape": shape, "device": a["device"], "seconds": [a["seconds"], b["seconds"]],
                                 "peak_gib": a["peak_gib"], "params_moved": f"{a['params_moved']} of {a['params']}",
                                 "rows": a["rows"], "problems": found}
                problems += found
                print(f"  {a['seconds']} s and {b['seconds']} s on {a['device']}; weights moved in "
                      f"{a['params_moved']} of {a['params']} tensors; {'runs equal' if not found else found}")
            except Exception as e:  # noqa: BLE001 - any crash of the run is the finding
                problems.append(f"PPO run crashed: {type(e).__name__}: {str(e)[:300]}")
                report["ppo"] = {"error": repr(e)}
    report["problems"], report["notes"] = problems, notes
    save()
    label = "GPU CHECK (smoke, CPU)" if args.smoke else "GPU CHECK"
    tail = f" ({'; '.join(notes)})" if notes else ""
    print(f"{label}: PASS{tail}" if not problems else f"{label}: FAIL: {'; '.join(problems)}{tail}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
