"""benchmarks/gpu_ppo.py --smoke: the GPU benchmark's script runs end to end on CPU with a tiny model
(it measures nothing there). ppomax's runs (fast and eager), the decode micro-benchmark and the
summary must all be produced; TRL's side runs where trl is installed and is skipped, saying so,
where it is not (the CI venv has no trl: it is in the ``bench`` extra, not ``dev``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_and_reports(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ppo.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r = json.loads(out.read_text())
    tiny = r["configs"]["tiny"]
    for label in ("fast", "eager"):
        runs = tiny["runs"][label]
        assert runs and "error" not in runs[0], runs
        assert len(runs[0]["s_per_iter"]) == 1 and runs[0]["s_per_iter"][0] > 0  # 1 measured iteration
        row = tiny["summary"][label]
        assert row["generate_tokens_per_s"] > 0 and 0 < row["iteration_mfu"] < 1
        assert set(row["phase_s"]) >= {"generate", "score", "forward", "train"}
    assert tiny["summary"]["fast_vs_eager"] > 0
    assert tiny["runs"]["fast"][0]["options"] == {"rollout_cuda_graph": True, "rollout_bf16_weights": True,
                                                  "frozen_bf16": "auto"}
    assert tiny["runs"]["eager"][0]["options"] == {"frozen_bf16": "off"}
    dec = tiny["decode"]
    assert dec["graph_vs_static"]["tokens_equal"] is True  # CPU: the eager loop vs the static steps, same seed
    assert dec["fallback"] == ["CUDA graphs need a CUDA device, the prompts are on cpu"]  # said once, with its reason
    if importlib.util.find_spec("trl") is None:
        assert any("TRL's side skipped" in s for s in r["skipped"]) and "trl" not in tiny["runs"]
        assert "TRL's side skipped: trl is not installed" in res.stdout
    else:
        assert "error" not in tiny["runs"]["trl"][0] and tiny["summary"]["speedup_vs_trl"] > 0
    assert "config" in res.stdout and "fast" in res.stdout  # the table is printed last
