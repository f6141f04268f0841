"""Collapse-monitoring plots for the studies' reports: one fixed colour per method, the paper's
indicators side by side (RM reward vs gold, KL(π‖π_ref), perplexity on own samples, length, the
reward tail). matplotlib is imported inside the plotting functions (Agg backend) so importing a
study stays fast."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Fixed colours so a method looks the same in every figure and report.
_FIXED_COLORS = {"ppo_max": "#1a9850", "vanilla": "#d73027", "sft": "#636363"}
# Qualitative palette without greens/reds, so other methods are not confused with the two above.
_PALETTE = ["#4575b4", "#f28e2b", "#8e6bbf", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#1f3b73"]


def method_colors(names: Sequence[str]) -> dict[str, str]:
    """Colour per method: ppo_max green, vanilla red, sft grey, others from a palette in order."""
    colors, k = {}, 0
    for name in names:
        fixed = _FIXED_COLORS.get(name.lower().replace("-", "_"))
        if fixed is None:
            fixed, k = _PALETTE[k % len(_PALETTE)], k + 1
        colors[name] = fixed
    return colors


@dataclass(frozen=True)
class Panel:
    """One plot panel: the metrics it draws, in which styles, with which title and y label."""

    name: str  # file stem, also the key for `baselines`
    keys: tuple[str, ...]  # metrics drawn; the first one gets the method's legend label
    styles: tuple[str, ...]  # line style per key
    title: str
    ylabel: str


PANELS: tuple[Panel, ...] = (
    Panel("rm_reward", ("reward/raw_mean",), ("-",), "RM reward (raw score)", "RM score"),
    Panel("gold", ("gold/mean",), ("-",), "Gold score (judge)", "gold score"),
    Panel("kl", ("kl/ref",), ("-",), "KL(π‖π_ref) per response (nats)", "KL (nats / response)"),
    Panel("perplexity", ("policy/perplexity",), ("-",), "Policy perplexity on own samples", "perplexity (per token)"),
    Panel("length", ("response/length_mean",), ("-",), "Response length (tokens)", "mean length (tokens)"),
    Panel("reward_tail", ("reward/raw_p99", "reward/raw_p50"), ("-", "--"), "Reward distribution: p50 and p99", "RM score"),
)  # fmt: skip

_RC = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.framealpha": 0.9,
}


def is_number(x: Any) -> bool:
    """An int or a float, not a bool (JSON numbers of a metrics row)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)

def ppo_step_of(row: Mapping[str, Any]) -> int:
    """The x of a PPO row: its PPO iteration (``ppo_step``), so runs with and without critic
    pre-training line up; ``step`` counts pre-training iterations too."""
    return int(row.get("ppo_step", row["step"]))


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over PPO-phase rows, sorted by step, non-finite values dropped."""
    pts = sorted(
        (ppo_step_of(r), float(r[key]))
        for r in rows
        if r.get("phase", "ppo") == "ppo" and "step" in r and is_number(r.get(key)) and math.isfinite(r[key])
    )
    return [s for s, _ in pts], [v for _, v in pts]


def _smooth(y: Sequence[float], window: int) -> list[float]:
    """Trailing moving average; the first points average over what is available so far."""
    out, total = [], 0.0
    for i, v in enumerate(y):
        total += v
        if i >= window:
            total -= y[i - window]
        out.append(total / min(i + 1, window))
    return out


def _draw_panel(ax, panel: Panel, runs, colors, baselines, smooth: int, method_legend: bool,
                baseline_label: str = "SFT baseline") -> bool:
    """Draw one panel into ``ax``; returns False (and draws nothing) if no run has the metric."""
    drawn = False
    for method, rows in runs.items():
        for key, style in zip(panel.keys, panel.styles):
            x, y = _series(rows, key)
            if not x:
                continue
            drawn = True
            label = method if key == panel.keys[0] else None
            kw = {"color": colors[method], "linestyle": style, "marker": "o" if len(x) == 1 else None}
            if smooth > 1 and len(x) > 1:
                ax.plot(x, y, alpha=0.25, linewidth=1.0, **kw)  # faint raw curve under the average
                ax.plot(x, _smooth(y, smooth), linewidth=2.0, label=label, **kw)
            else:
                ax.plot(x, y, linewidth=1.8, label=label, **kw)
    if not drawn:
        return False
    if baselines and baselines.get(panel.name) is not None:
        ax.axhline(
            baselines[panel.name], color="#444444", linestyle=(0, (5, 3)), linewidth=1.3, label=baseline_label
        )
    ax.set_title(panel.title)
    ax.set_xlabel("PPO step")
    ax.set_ylabel(panel.ylabel)
    handles, labels = ax.get_legend_handles_labels()
    if len(panel.keys) > 1:  # explain the line styles with neutral proxy lines
        from matplotlib.lines import Line2D

        proxies = [Line2D([], [], color="#555555", linestyle=s) for s in panel.styles]
        names = [k.rsplit("_", 1)[-1] for k in panel.keys]  # "reward/raw_p99" -> "p99"
        if method_legend:
            handles, labels = handles + proxies, labels + names
        else:
            handles, labels = proxies, names
    elif not method_legend:
        handles, labels = [], []
    if handles:
        ax.legend(handles, labels, loc="best")
    return True


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: str | os.PathLike,
    baselines: Mapping[str, float] | None = None,
    smooth: int = 1,
    baseline_label: str = "SFT baseline",
) -> list[Path]:
    """One PNG per panel (all methods overlaid) plus ``overview.png``, a 2×3 grid of them.

    ``runs`` maps method name -> metrics rows (see :func:`read_metrics`); only ``phase == "ppo"``
    rows are plotted against ``step``. ``baselines`` maps a panel name to a horizontal dashed
    reference line, e.g. ``{"gold": sft_gold}``. ``smooth > 1`` draws a trailing moving average
    of that window over the faint raw curve; ``baseline_label`` names the dashed line in the
    legend. Panels no run has data for are skipped.
    Returns the written paths, ``overview.png`` first.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never try to open a window
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = method_colors(list(runs))
    written: list[Path] = []
    with plt.rc_context(_RC):
        drawn_panels = []
        for panel in PANELS:
            fig, ax = plt.subplots(figsize=(7.0, 4.2), layout="constrained")
            if _draw_panel(ax, panel, runs, colors, baselines, smooth, method_legend=True,
                           baseline_label=baseline_label):
                written.append(out / f"{panel.name}.png")
                fig.savefig(written[-1], dpi=130)
                drawn_panels.append(panel)
            plt.close(fig)
        if not drawn_panels:
            return []

        suffix = f" (moving average over {smooth} steps)" if smooth > 1 else ""
        overview = plot_grid(runs, out / "overview.png", PANELS, f"Collapse indicators during PPO{suffix}",
                             baselines, smooth, colors, baseline_label)
    return [overview, *written]


def plot_grid(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, panels: Sequence[Panel], title: str,
              baselines: Mapping[str, float] | None = None, smooth: int = 1,
              colors: Mapping[str, str] | None = None, baseline_label: str = "SFT baseline") -> Path:
    """``panels`` side by side, three per row, with one legend for the figure; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = colors or method_colors(list(runs))
    nrows = math.ceil(len(panels) / 3)
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(nrows, 3, figsize=(18.0, 4.75 * nrows), layout="constrained", squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            if not _draw_panel(ax, panel, runs, colors, baselines, smooth, method_legend=False,
                               baseline_label=baseline_label):
                ax.set_title(panel.title)
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#888888")
                ax.set_xticks([])
                ax.set_yticks([])
        for ax in list(axes.flat)[len(panels):]:
            ax.set_axis_off()
        handles, labels = [], []  # one legend for the whole figure instead of one per panel
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels and not lab.startswith("_"):
                    handles.append(h)
                    labels.append(lab)
        # the legend title doubles as the figure title: fig.suptitle would collide with an
        # "outside" legend under constrained layout
        fig.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 8), fontsize=12,
                   frameon=False, title=title, title_fontproperties={"size": 15, "weight": "bold"})
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path
