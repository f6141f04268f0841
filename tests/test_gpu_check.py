"""The GPU check (``python -m ppomax.gpu_check``): its CPU rehearsal runs here, so the script a user
runs on a new GPU machine cannot rot, and its verdict is shown to fail when a part fails."""

from __future__ import annotations

import json

from ppomax.tools import gpu_check


def test_smoke_run_passes_with_one_verdict_line(tmp_path, capsys):
    rc = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, lines
    assert lines[-1] == "GPU CHECK (smoke, CPU): PASS (test suite not run)"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    ppo = report["ppo"]
    assert ppo["device"] == "cpu" and ppo["problems"] == [] and len(ppo["rows"]) == 2
    assert int(ppo["params_moved"].split()[0]) > 0
    assert all(r["policy/loss"] == r["policy/loss"] for r in ppo["rows"])  # finite losses were logged


def test_a_failing_suite_makes_the_verdict_fail_and_names_the_test(tmp_path, capsys):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_broken.py").write_text("def test_one_plus_one():\n    assert 1 + 1 == 3\n\n"
                                          "def test_fine():\n    assert True\n")
    rc = gpu_check.main(["--smoke", "--tests", str(tests), "--out", str(tmp_path / "out"), "--workers", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 1
    assert last.startswith("GPU CHECK (smoke, CPU): FAIL: test suite: 1 failed, 1 passed")
    assert "test_broken.py::test_one_plus_one" in last
    assert (tmp_path / "out" / "pytest.txt").exists() and (tmp_path / "out" / "junit.xml").exists()


def test_the_ppo_judge_fails_runs_that_skip_stall_or_differ():
    import torch

    row = {"step": 1, **{k: 0.5 for k in gpu_check.COMPARED}}
    good = {"rows": [row], "params_moved": 3, "weights": [torch.ones(2)]}
    assert gpu_check.judge_ppo(good, good, 1) == []
    other = {**good, "rows": [{**row, "policy/loss": 0.25}]}
    assert "two runs with --full_determinism differ (first: iteration 1, policy/loss)" in gpu_check.judge_ppo(good, other, 1)
    assert "end with different weights" in gpu_check.judge_ppo(good, {**good, "weights": [torch.zeros(2)]}, 1)[0]
    bad = {**good, "rows": [{**row, "skipped": 1.0, "skip_cause": "non-finite policy loss", "policy/loss": float("nan")}],
           "params_moved": 0}
    found = gpu_check.judge_ppo(bad, bad, 2)
    assert found[0] == "PPO logged 1 of 2 iterations"
    assert any("skipped its update: non-finite policy loss" in f for f in found)
    assert any("non-finite or missing policy/loss" in f for f in found)
    assert "PPO did not move the policy's weights" in found


def test_without_cuda_the_real_check_fails_with_the_reason(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path), "--skip-tests"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "GPU CHECK: FAIL: no CUDA device is visible (use --smoke for the CPU rehearsal) (test suite not run)")
