"""The main job: `ppomax demo` (quick in CI; the full contrast is slow-marked), eval and ablate."""

import json

import pytest
import torch

from ppomax.cli import main
from ppomax.studies.demo import SUMMARY_TABLE_COLUMNS, summary_table

KEYS = ("rm_reward", "gold", "kl", "perplexity", "length", "win_rate_vs_sft")


def test_summary_table_by_hand():
    """Decimals per column (kl, length: 1; others: 2), "–" for missing or NaN, right-aligned in
    columns as wide as their widest cell, 3 spaces apart (widths: method 7, gold 5, kl 5)."""
    summary = {"methods": {
        "sft": {"rm_reward": -0.434, "gold": 0.0151, "kl": 0.0, "perplexity": 6.5349, "length": 9.06,
                "well_formed": 0.9609, "win_rate_vs_sft": 0.5},
        "vanilla": {"rm_reward": 6.2249, "gold": -1.4688, "gold_peak": float("nan"), "gold_best": 0.8751,
                    "kl": 276.66, "perplexity": 1.3, "length": 28, "well_formed": 0, "win_rate_vs_sft": 0.0117},
    }}  # fmt: skip
    assert summary_table(summary).splitlines() == [
        "method    rm_reward    gold   gold_peak   gold_best      kl   perplexity   length   well_formed   win_rate_vs_sft",
        "sft           -0.43    0.02           –           –     0.0         6.53      9.1          0.96              0.50",
        "vanilla        6.22   -1.47           –        0.88   276.7         1.30     28.0          0.00              0.01",
    ]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo")
    try:
        assert main(["demo", "--quick", "--output_dir", str(out), "--disable_tqdm"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_quick_demo_writes_report_summary_and_plots(quick_demo):
    summary = json.loads((quick_demo / "summary.json").read_text())
    assert set(summary["methods"]) == {"sft", "ppo_max", "vanilla"}
    for name, m in summary["methods"].items():
        for k in KEYS:
            assert isinstance(m[k], float | int), (name, k)
    for name in ("ppo_max", "vanilla"):
        m = summary["methods"][name]
        lo, hi = m["win_rate_ci"]
        assert 0.0 <= lo <= m["win_rate_vs_sft"] <= hi <= 1.0
        assert "gold_peak" in m
        # PPO moved the policy away from SFT and towards the reward model
        assert m["kl"] > 0.0
        assert m["rm_reward"] > summary["methods"]["sft"]["rm_reward"]
    assert summary["methods"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)
    # table.txt is the printed table, formatted from summary.json; every column is a summary key
    assert (quick_demo / "table.txt").read_text(encoding="utf-8") == summary_table(summary) + "\n"
    for name, m in summary["methods"].items():
        assert set(SUMMARY_TABLE_COLUMNS) - set(m) <= ({"gold_peak", "gold_best"} if name == "sft" else set()), name
    for method in ("ppo_max", "vanilla"):  # best/ by eval/gold during training (issue #15), and its evaluation
        m = summary["methods"][method]
        info = json.loads((quick_demo / "runs" / method / "best" / "best.json").read_text())
        assert info["metric"] == "eval/gold" and info["step"] == m["best_step"]
        assert m["gold_best"] == m["best"]["gold"] and (quick_demo / "runs" / method / "best").is_dir()
    report = (quick_demo / "report.md").read_text()
    assert "ppo_max" in report and "vanilla" in report and "plots/overview.png" in report
    assert "## Best checkpoint vs final" in report
    for png in ("overview", "rm_reward", "gold", "kl", "perplexity", "length", "reward_tail"):
        data = (quick_demo / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    for method in ("ppo_max", "vanilla"):
        rows = [json.loads(x) for x in (quick_demo / "runs" / method / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # vanilla has no critic pre-training; ppo_max does (Sec. 5.4)
    phases = {json.loads(x)["phase"] for x in (quick_demo / "runs" / "ppo_max" / "metrics.jsonl").read_text().splitlines()}
    assert phases == {"critic_pretrain", "ppo"}


def test_demo_rerun_reuses_cached_stages(quick_demo, capsys):
    """A second run finds every stage done: no training, the same summary."""
    before = json.loads((quick_demo / "summary.json").read_text())
    assert main(["demo", "--quick", "--output_dir", str(quick_demo), "--disable_tqdm"]) == 0
    out = capsys.readouterr().out
    assert "[demo] SFT" not in out and "reward model:" not in out
    after = json.loads((quick_demo / "summary.json").read_text())
    assert after["methods"]["ppo_max"]["gold"] == before["methods"]["ppo_max"]["gold"]
    assert "\n" + summary_table(after) + "\n" in out  # the console shows table.txt's text


def test_eval_cli_on_demo_policy(quick_demo, tmp_path):
    policy = sorted((quick_demo / "runs" / "ppo_max").glob("checkpoint-*"))[-1] / "policy"
    sft = quick_demo / "assets" / "sft"
    rc = main(["eval", "--model_name_or_path", str(policy), "--baseline_model_path", str(sft),
               "--reward_model_path", str(quick_demo / "assets" / "rm"), "--task", "reviews",
               "--num_prompts", "32", "--response_length", "28", "--output_dir", str(tmp_path), "--disable_tqdm"])
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    m = res["metrics"]
    for k in ("rm_reward", "gold", "kl", "perplexity", "length", "win_rate_vs_baseline", "win_rate_ci"):
        assert k in m
    assert m["n"] == 32 and len(res["samples"]) == 8
    assert (tmp_path / "eval.md").exists()


def test_ablate_two_variants(quick_demo, tmp_path):
    out = tmp_path / "abl"
    rc = main(["ablate", "--quick", "--output_dir", str(out), "--cache_dir", str(quick_demo / "assets"),
               "--variants", "ppo_max:seeds=2;no_kl:kl_coef=0", "--ppo_steps", "3", "--disable_tqdm"])
    assert rc == 0
    text = (out / "ablation.md").read_text()
    assert "ppo_max" in text and "no_kl" in text
    data = json.loads((out / "ablation.json").read_text())
    assert {r["variant"]: r["n_seeds"] for r in data["rows"]} == {"ppo_max": 2, "no_kl": 1}  # seeds= per variant
    assert (out / "runs" / "ppo_max" / "seed1" / "DONE").exists() and not (out / "runs" / "no_kl" / "seed1").exists()
    # advantage quality over the first PPO iterations (issue #15): a figure and the early critic columns
    assert (out / "plots" / "advantage_quality.png").exists() and "Advantage quality" in text
    assert "explained var. (it. 1–30)" in text
    # resumable: a second call re-uses the finished runs (their eval.json) without training
    assert (out / "runs" / "no_kl" / "seed0" / "eval.json").exists()


def test_ablate_variant_spec_and_early_curve_stats():
    from ppomax.config import ConfigError
    from ppomax.studies.ablate import curve_stats, parse_variants

    # a built-in name with a body adds to its overrides; seeds= is the variant's own seed count
    assert parse_variants("vanilla:seeds=5;no_value_clip:seeds=3")["vanilla"] == {"preset": "vanilla", "seeds": 5}
    assert parse_variants("no_value_clip:seeds=3")["no_value_clip"] == {"cliprange_value": None, "seeds": 3}
    for bad in ("ppo_max:seeds=0", "ppo_max:seeds=two"):
        with pytest.raises(ConfigError, match="seeds"):
            parse_variants(bad)
    rows = [{"phase": "critic_pretrain", "ppo_step": 0, "critic/explained_variance": -9.0}]
    rows += [{"phase": "ppo", "ppo_step": i, "critic/explained_variance": i / 100, "critic/value_loss": 1.0 / i,
              "gold/mean": 0.5} for i in range(1, 41)]
    st = curve_stats(rows)
    assert st["ev_early"] == pytest.approx(sum(range(1, 31)) / 100 / 30)  # PPO iterations 1-30 only
    assert st["value_loss_early"] == pytest.approx(sum(1.0 / i for i in range(1, 31)) / 30)
    assert st["gold_early"] == 0.5
    assert st["explained_variance"] == pytest.approx(sum(range(31, 41)) / 100 / 10)  # the last 10


def test_ablate_estimator_variants_by_name_with_a_budget(quick_demo, tmp_path):
    """Built-in variants by name (the critic-free estimators, issue #14) and --budget (issue #15)."""
    from ppomax.studies.ablate import parse_variants, scaled_budget
    from ppomax.studies.demo import QUICK

    assert parse_variants("ppo_max;grpo;dr_grpo")["dr_grpo"] == {
        "advantage_estimator": "grpo", "num_samples_per_prompt": 4, "grpo_scale_rewards": False,
        "loss_reduction": "token_sum"}
    assert (scaled_budget(QUICK, 0.5).ppo_steps, scaled_budget(QUICK, 0.5).critic_pretrain_steps) == (10, 2)
    out = tmp_path / "abl"
    rc = main(["ablate", "--quick", "--output_dir", str(out), "--cache_dir", str(quick_demo / "assets"),
               "--variants", "rloo", "--ppo_steps", "4", "--budget", "0.5", "--disable_tqdm"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "runs" / "rloo" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ppo_step"] for r in rows] == [1, 2] and all(r["phase"] == "ppo" for r in rows)  # no critic
    assert not any(k.startswith("critic/") for r in rows for k in r)
    # the same number of responses per iteration as ppo_max: 32 / k prompts × k = 4 samples
    import yaml

    cfg = yaml.safe_load((out / "runs" / "rloo" / "seed0" / "config.yaml").read_text())["config"]
    assert cfg["rollout_batch_size"] * cfg["num_samples_per_prompt"] == QUICK.rollout_batch_size


@pytest.mark.slow
def test_full_demo_shows_the_papers_contrast(tmp_path):
    """Default seed and budget: vanilla over-optimises the RM, PPO-max stays aligned (≈ 7 min)."""
    assert main(["demo", "--output_dir", str(tmp_path / "demo"), "--disable_tqdm"]) == 0
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    m, sft = s["methods"], s["methods"]["sft"]
    va, pm = m["vanilla"], m["ppo_max"]
    assert va["rm_reward"] > sft["rm_reward"] + 0.5
    assert va["gold"] < va["gold_peak"] - 0.2 or va["gold"] < sft["gold"]
    assert va["kl"] >= 3 * pm["kl"]
    assert pm["gold"] > sft["gold"] and pm["win_rate_vs_sft"] > 0.5
    assert s["contrast_holds"]
    # The README shows this run's table, number for number (paste table.txt there after a change).
    from test_readme import readme_demo_table  # tests/ is on sys.path under pytest's default import mode

    assert (tmp_path / "demo" / "table.txt").read_text(encoding="utf-8") == summary_table(s) + "\n"
    assert summary_table(s) == readme_demo_table(), "README.md's demo table differs from this run's table.txt"


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by a container's pid 1, counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc")
def test_pool_workers_exit_when_the_demo_is_killed(tmp_path):
    """A demo or ablate killed with SIGKILL leaves no worker training on: a rerun would otherwise
    resume the run directory the orphan still writes checkpoints into."""
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    script = f"""
import multiprocessing as mp, os, signal, time
from concurrent.futures import ProcessPoolExecutor
from ppomax.training import exit_with_parent
if __name__ == "__main__":
    pool = ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"), initializer=exit_with_parent,
                               initargs=(os.getpid(),))
    futures = [pool.submit(time.sleep, 120) for _ in range(2)]
    time.sleep(1.0)
    while len(pool._processes) < 2:
        time.sleep(0.1)
    open({str(pids)!r}, "w").write(" ".join(map(str, pool._processes)))
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == -9
    workers = [int(x) for x in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.time() + 15
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "orphaned pool workers kept running"
