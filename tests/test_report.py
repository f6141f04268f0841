"""Plots and reports from synthetic metrics: files exist, are real PNGs, tables are formatted."""

import json

import pytest

from ppomax.studies import plots as P
from ppomax.studies import report

# The fixed metric names (the logging contract). Listed here, not read from METRIC_DOCS, so a
# name dropped from the docs table fails the test instead of silently vanishing.
METRIC_NAMES = """reward/raw_mean reward/raw_p50 reward/raw_p90 reward/raw_p99 reward/raw_max
reward/processed_mean gold/mean gold/well_formed kl/ref kl/coef policy/perplexity policy/entropy
policy/approx_kl policy/clipfrac policy/loss response/length_mean response/truncated_frac
critic/value_loss critic/explained_variance critic/clipfrac adv/mean adv/std returns/mean
grad_norm/policy grad_norm/critic lr/policy lr/critic time/generate time/score time/forward
time/train time/iteration tokens_per_s""".split()

PANEL_FILES = ["overview", "rm_reward", "gold", "kl", "perplexity", "length", "reward_tail"]


def fake_run(collapse: bool, n: int = 40) -> list[dict]:
    """Vanilla-like collapse (KL, length, reward tail rising; perplexity, gold falling) or flat."""
    rows = [{"step": i, "phase": "critic_pretrain", "critic/value_loss": 1.0} for i in range(5)]
    for s in range(n):
        t = s / n
        k = 1.0 if collapse else 0.1
        rows.append({
            "step": s, "phase": "ppo",
            "reward/raw_mean": 0.2 + 2 * k * t + 0.05 * (s % 3),
            "gold/mean": 0.6 + (0.2 * t - 0.6 * max(0.0, t - 0.3) if collapse else 0.1 * t),
            "kl/ref": 0.5 + 10 * k * t**1.5,
            "policy/perplexity": 3.0 - 1.5 * k * t,
            "response/length_mean": 20 + 40 * k * t,
            "reward/raw_p99": 1.0 + 5 * k * t**2, "reward/raw_p50": 0.2 + k * t,
        })  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """Plot once per module (matplotlib is the slow part)."""
    out = tmp_path_factory.mktemp("run")
    runs = {"ppo_max": fake_run(False), "vanilla": fake_run(True)}
    plots = report.plot_curves(runs, out / "plots", baselines={"gold": 0.6}, smooth=4)
    return out, plots


def test_plot_curves_writes_valid_pngs(plotted):
    out, plots = plotted
    assert [p.stem for p in plots] == PANEL_FILES  # overview first, then the fixed panel order
    for p in plots:
        assert p.parent == out / "plots"
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", p
        assert len(data) > 5_000, p  # a real figure, not an empty canvas


def test_plot_curves_skips_missing_metrics(tmp_path):
    rows = [{"step": s, "phase": "ppo", "kl/ref": 0.1 * s} for s in range(5)]
    plots = report.plot_curves({"solo": rows}, tmp_path)
    assert [p.name for p in plots] == ["overview.png", "kl.png"]
    # critic pre-training rows alone are not plotted at all
    assert (
        report.plot_curves({"x": [{"step": 0, "phase": "critic_pretrain", "kl/ref": 1.0}]}, tmp_path / "e")
        == []
    )


@pytest.mark.parametrize("label", [None, "base"])
def test_the_dashed_line_is_named_after_the_baseline(tmp_path, monkeypatch, label):
    """The reviews demo's reference is the SFT model; the SmolLM2 study's is the base model."""
    import matplotlib.figure

    legends: list[list[str]] = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *a, **k):
        legends.append([t.get_text() for lg in fig.legends for t in lg.get_texts()])
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    kw = {} if label is None else {"baseline_label": label}
    report.plot_grid({"ppo_max": fake_run(False)}, tmp_path / "g.png", P.PANELS, "t", baselines={"gold": 0.6}, **kw)
    assert (label or "SFT baseline") in legends[-1]
    assert ("SFT baseline" in legends[-1]) == (label is None)


def test_method_colors_fixed():
    colors = report.method_colors(["other", "vanilla", "ppo_max", "another"])
    assert colors["ppo_max"] == "#1a9850" and colors["vanilla"] == "#d73027"
    assert colors["other"] != colors["another"]


def test_write_report(plotted):
    out, plots = plotted
    summary = {
        "steps": 40,
        "methods": {
            "ppo_max": {"rm_reward": 1.23456, "gold": 0.7012, "kl": 2.5, "perplexity": 2.85, "length": 22.0,
                        "win_rate_vs_sft": 0.62, "win_rate_ci": [0.55, 0.69], "gold_peak": 0.71},
            "vanilla": {"rm_reward": 2.2, "gold": 0.41, "kl": 10.5, "perplexity": 1.5, "length": 1234.5,
                        "win_rate_vs_sft": 0.3, "win_rate_ci": [0.2, 0.4]},
        },
    }  # fmt: skip
    samples = {
        "ppo_max": [
            {"stage": "end", "step": 39, "prompt": "Review:", "response": "a | b <eos>", "gold": 0.8},
            {"stage": "start", "step": 0, "prompt": "Review:", "response": "fine", "gold": None},
        ],
        "vanilla": [
            {"stage": "middle", "step": 20, "prompt": "Q", "response": "great great\ngreat", "gold": 0.2}
        ],
    }
    md_path = report.write_report(out, "Demo", summary, plots, samples, ["the contrast held: <yes>"])
    assert md_path == out / "report.md"
    md = md_path.read_text()
    assert md.startswith("# Demo")
    assert md.index("plots/overview.png") < md.index("## Summary")  # the overview is on top
    assert "| method | RM reward | gold | gold peak | win rate vs SFT [95% CI] |" in md
    # 3 significant digits, interval after the win rate, missing -> en dash, no 1.23e+03
    assert "| ppo_max | 1.23 | 0.701 | 0.71 | 0.62 [0.55, 0.69] | 2.5 | 2.85 | 22 |" in md
    assert "| vanilla | 2.2 | 0.41 | – | 0.3 [0.2, 0.4] | 10.5 | 1.5 | 1234 |" in md
    for stem in PANEL_FILES:
        assert f"](plots/{stem}.png)" in md
    assert "- the contrast held: <yes>" in md
    # samples: start before end, `|` escaped so the table keeps its 5 columns, tag not swallowed
    assert md.index("| start | 0 |") < md.index("| end | 39 |")
    assert r"| a \| b \<eos> |" in md
    assert "great great<br>great" in md

    page = (out / "report.html").read_text()
    assert "&lt;eos&gt;" in page and "<eos>" not in page
    assert "&lt;yes&gt;" in page
    assert '<img src="plots/overview.png"' in page
    assert "<td>0.62 [0.55, 0.69]</td>" in page


def test_write_ablation_report(tmp_path):
    rows = [
        {"variant": "no_reward_norm", "n_seeds": 3, "gold_final": (0.5, 0.45, 0.55), "kl": (8.0, 6.0, 10.0),
         "significant": {"gold_final": True, "kl": False}},
        {"variant": "ppo_max", "n_seeds": 3, "gold_final": (0.69, 0.66, 0.72), "kl": (2.4, 2.0, 2.8),
         "significant": {"gold_final": True}},  # the baseline is never starred
        {"variant": "one_seed", "n_seeds": 1, "gold_final": (0.6, float("nan"), float("nan")), "kl": (3.0, None, None)},
    ]  # fmt: skip
    runs = {"ppo_max": fake_run(False, n=10), "no_reward_norm": fake_run(True, n=10)}
    path = report.write_ablation_report(tmp_path, rows, runs)
    md = path.read_text()
    assert path.name == "ablation.md" and (tmp_path / "ablation.html").exists()
    assert "| variant | seeds | gold (final) | KL (nats) |" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[1] == "| ppo_max (baseline) | 3 | 0.69 ± 0.03 | 2.4 ± 0.4 |"  # baseline first
    assert lines[2] == r"| no_reward_norm | 3 | 0.5 ± 0.05 \* | 8 ± 2 |"
    assert lines[3] == "| one_seed | 1 | 0.6 | 3 |"
    assert "](plots/overview.png)" in md and (tmp_path / "plots" / "kl.png").exists()


def test_read_metrics_ignores_truncated_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "phase": "ppo", "kl/ref": 0.1}, {"step": 1, "phase": "ppo", "kl/ref": 0.2}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + '\n\n{"step": 2, "phase": "pp')
    assert report.read_metrics(p) == rows
    p.write_text(json.dumps(rows[0]) + "\n{broken\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=":2:"):
        report.read_metrics(p)


def test_mean_curve_and_smooth():
    a = [{"step": 0, "phase": "ppo", "kl/ref": 1.0}, {"step": 1, "phase": "ppo", "kl/ref": 3.0}]
    b = [
        {"step": 0, "phase": "ppo", "kl/ref": 3.0, "gold/mean": 0.5},
        {"step": 0, "phase": "critic_pretrain", "kl/ref": 99.0},
    ]
    assert report.mean_curve([a, b]) == [
        {"step": 0, "ppo_step": 0, "phase": "ppo", "kl/ref": 2.0, "gold/mean": 0.5},
        {"step": 1, "ppo_step": 1, "phase": "ppo", "kl/ref": 3.0},
    ]
    # window 2: [1, (1+2)/2, (2+3)/2, (3+4)/2]
    assert P._smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_metrics_docs_cover_every_metric():
    assert set(METRIC_NAMES) <= set(report.METRIC_DOCS)
    table = report.metrics_table_markdown()
    assert table.splitlines()[0] == "| metric | meaning | what a collapse looks like |"
    for name in METRIC_NAMES:
        assert f"| `{name}` |" in table
    assert all(meaning and collapse for meaning, collapse in report.METRIC_DOCS.values())
