"""Markdown/HTML reports for the demo, the ablation and the SmolLM2 study, and reading their runs back.

Reward and loss curves do not reveal over-optimisation (paper Sec. 5.2, App. A); the report
therefore puts the paper's indicators side by side for every method: RM reward vs gold score,
KL(π‖π_ref), policy perplexity on its own samples, response length and the reward tail
(the plots: :mod:`ppomax.studies.plots`, re-exported here).

:data:`ppomax.metrics_doc.METRIC_DOCS` is the single source of the metric names and their meaning.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ppomax.metrics_doc import (  # noqa: F401  (re-exported: report is where users look for them)
    METRIC_DOCS,
    METRICS_DOC_END,
    METRICS_DOC_START,
    STAGE_METRIC_DOCS,
    metrics_table_markdown,
    update_metrics_doc,
)
from ppomax.studies.plots import (  # noqa: F401  (re-exported: the reports and their plots, one import)
    PANELS,
    Panel,
    is_number,
    method_colors,
    plot_curves,
    plot_grid,
    ppo_step_of,
)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a ``metrics.jsonl`` file: one JSON object per logged step.

    Blank lines are skipped. An unparsable *last* line is ignored (a run killed mid-write leaves
    a truncated line); an unparsable line elsewhere means a corrupt file and raises ValueError.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    nonblank = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows: list[dict] = []
    for k, (lineno, line) in enumerate(nonblank):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(nonblank) - 1:
                break
            raise ValueError(f"{path}:{lineno}: not a JSON object: {e}") from e
    return rows


def mean_curve(seed_runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict]:
    """Average the PPO-phase rows of several seeds step by step (for ablation curves).

    For each step, each metric is the mean over the seeds that logged it at that step.
    """
    sums: dict[int, dict[str, list[float]]] = {}
    for rows in seed_runs:
        for row in rows:
            if row.get("phase", "ppo") != "ppo" or "step" not in row:
                continue
            acc = sums.setdefault(ppo_step_of(row), {})
            for key, value in row.items():
                if key not in ("step", "ppo_step", "phase") and is_number(value):
                    acc.setdefault(key, []).append(float(value))
    return [
        {"step": step, "ppo_step": step, "phase": "ppo", **{k: sum(v) / len(v) for k, v in acc.items()}}
        for step, acc in sorted(sums.items())
    ]


# ---------------------------------------------------------------------------------------------
# Reports: built once as a list of blocks, rendered to markdown and to HTML from the same data
# ---------------------------------------------------------------------------------------------

_DASH = "–"
_SUMMARY_COLUMNS = {  # summary key -> column header, in display order
    "rm_reward": "RM reward",
    "gold": "gold",
    "gold_peak": "gold peak",
    "win_rate_vs_sft": "win rate vs SFT [95% CI]",
    "win_rate_vs_base": "win rate vs base [95% CI]",
    "kl": "KL (nats)",
    "perplexity": "perplexity",
    "length": "length (tokens)",
}
_ABLATION_COLUMNS = {
    "gold_final": "gold (final)",
    "gold_peak": "gold (peak)",
    "win_rate": "win rate",
    "kl": "KL (nats)",
    "perplexity": "perplexity",
    "length": "length (tokens)",
    "explained_variance": "explained var.",
    "ev_early": "explained var. (it. 1–30)",
    "value_loss_early": "value loss (it. 1–30)",
    "gold_early": "gold (it. 1–30)",
}
_STAGES = ("start", "middle", "end")
_READING_GUIDE = (
    "Reward and loss curves do not reveal over-optimisation (Zheng et al. 2023, Sec. 5.2). "
    "Signs of a collapse: KL to the reference rising without levelling off, perplexity on own "
    "samples falling, response length drifting (often to the cap), the reward distribution "
    "growing a long tail (p99 pulling away from p50), and RM reward rising while the gold score falls."
)


def _fmt(x: Any) -> str:
    """3 significant digits without exponent in the usual range; missing / NaN -> "–"."""
    if x is None or (is_number(x) and not math.isfinite(x)):
        return _DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not is_number(x):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:.0f}"  # '.3g' would print 1.23e+03
    return f"{x:.3g}"


def _fmt_value(x: Any) -> str:
    """A number, a ``[lo, hi]`` pair or a ``(mean, lo, hi)`` triple."""
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return f"[{_fmt(x[0])}, {_fmt(x[1])}]"
    if isinstance(x, (list, tuple)) and len(x) == 3:
        return f"{_fmt(x[0])} [{_fmt(x[1])}, {_fmt(x[2])}]"
    return _fmt(x)


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _md_cell(text: str) -> str:
    """Escape text for a markdown table cell: `|` would end the cell, `<eos>` would vanish as a tag."""
    for ch in ("\\", "`", "*", "|", "<"):
        text = text.replace(ch, "\\" + ch)
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], escape: bool = True) -> str:
    esc = _md_cell if escape else (lambda s: s)
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


Block = tuple  # ("h", level, text) | ("p", text) | ("img", rel_path, alt) | ("table", headers, rows) | ("ul", items)

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;white-space:pre-wrap}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}img{max-width:100%;height:auto}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"""


def _render(blocks: Sequence[Block], title: str, out_dir: Path, stem: str) -> Path:
    """Write ``<stem>.md`` and a self-contained ``<stem>.html`` (inline CSS, relative image paths)."""
    md, ht = [f"# {title}"], [f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            md.append("#" * b[1] + " " + b[2])
            ht.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif kind == "p":
            md.append(b[1])
            ht.append(f"<p>{html.escape(b[1])}</p>")
        elif kind == "img":
            md.append(f"![{b[2]}]({b[1]})")
            ht.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
        elif kind == "table":
            md.append(_md_table(b[1], b[2]))
            ht.append(_html_table(b[1], b[2]))
        elif kind == "ul":
            md.append("\n".join(f"- {item}" for item in b[1]))
            ht.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b[1]) + "</ul>")
    (out_dir / f"{stem}.md").write_text("\n\n".join(md) + "\n", encoding="utf-8")
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(ht) + "\n</body>\n</html>\n"
    )
    (out_dir / f"{stem}.html").write_text(page, encoding="utf-8")
    return out_dir / f"{stem}.md"


def _plot_blocks(plots: Sequence[Path], out_dir: Path) -> tuple[list[Block], list[Block]]:
    """(overview image, "Curves" section with the individual panels), linked relative to out_dir."""
    rel = {Path(p).stem: Path(os.path.relpath(p, out_dir)).as_posix() for p in plots}
    overview: list[Block] = []
    if "overview" in rel:
        overview.append(("img", rel.pop("overview"), "overview of the collapse indicators"))
    panels: list[Block] = [("h", 2, "Curves"), *(("img", r, stem) for stem, r in rel.items())] if rel else []
    return overview, panels


def write_report(
    out_dir: str | os.PathLike,
    title: str,
    summary: Mapping[str, Any],
    plots: Sequence[Path],
    samples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    notes: Sequence[str] | None = None,
    *,
    max_chars: int = 600,
) -> Path:
    """Write ``report.md`` and ``report.html`` for a demo run into ``out_dir``; return the .md path.

    ``summary["methods"]`` maps method -> final metrics (rm_reward, gold, gold_peak,
    win_rate_vs_sft + win_rate_ci, kl, perplexity, length, and any extra keys, shown as extra
    columns). Other scalar top-level summary entries are listed under the table. ``samples``
    maps method -> generations tagged with stage start/middle/end; texts longer than
    ``max_chars`` are shortened. ``notes`` become bullet points.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods: Mapping[str, Mapping[str, Any]] = summary.get("methods", {})
    extra = [k for m in methods.values() for k, v in m.items()
             if k not in _SUMMARY_COLUMNS and k != "win_rate_ci" and not isinstance(v, Mapping)]
    keys = [k for k in _SUMMARY_COLUMNS if any(k in m for m in methods.values())] + list(dict.fromkeys(extra))
    rows = []
    for name, m in methods.items():
        cells = [name]
        for k in keys:
            cell = _fmt_value(m.get(k))
            if k.startswith("win_rate_vs") and m.get("win_rate_ci") is not None and cell != _DASH:
                cell += " " + _fmt_value(list(m["win_rate_ci"]))
            cells.append(cell)
        rows.append(cells)

    overview, panels = _plot_blocks(plots, out)
    blocks: list[Block] = [*overview]  # the picture at the top of the report
    blocks += [("h", 2, "Summary"), ("table", ["method", *(_SUMMARY_COLUMNS.get(k, k) for k in keys)], rows)]
    with_best = {n: m for n, m in methods.items() if isinstance(m.get("best"), Mapping)}
    if with_best:  # issue #15: each method's best checkpoint (picked during training) next to its final one
        cols = [c for c in ("gold", "rm_reward", "kl", "win_rate_vs_sft", "win_rate_vs_base", "distinct_2",
                            "template_share") if any(c in m["best"] for m in with_best.values())]
        best_rows = [[n, _fmt_value(m.get("best_step")),
                      *(f"{_fmt_value(m['best'].get(c))} / {_fmt_value(m.get(c))}" for c in cols)]
                     for n, m in with_best.items()]
        blocks += [("h", 2, "Best checkpoint vs final"),
                   ("p", "best/ is the checkpoint with the highest eval/gold on held-out prompts during training "
                         "(--metric_for_best_model gold); both are evaluated on the report's prompts. Cells: best / final."),
                   ("table", ["method", "best at iteration", *cols], best_rows)]
    run_info = [
        f"{k}: {_fmt(v)}" for k, v in summary.items() if k != "methods" and not isinstance(v, (dict, list))
    ]
    if run_info:
        blocks.append(("ul", run_info))
    if notes:
        blocks += [("h", 2, "Notes"), ("ul", list(notes))]
    blocks += [("h", 2, "How to read the curves"), ("p", _READING_GUIDE)]
    blocks += panels
    if samples:
        blocks.append(("h", 2, "Sample generations"))
        order = {s: i for i, s in enumerate(_STAGES)}
        for method, items in samples.items():
            items = sorted(items, key=lambda s: (order.get(s.get("stage"), len(order)), s.get("step", 0)))
            table = [
                [str(s.get("stage", "")), _fmt(s.get("step")), _clip(str(s.get("prompt", "")), max_chars),
                 _clip(str(s.get("response", "")), max_chars), _fmt(s.get("gold"))]
                for s in items
            ]  # fmt: skip
            blocks += [("h", 3, method), ("table", ["stage", "step", "prompt", "response", "gold"], table)]
    return _render(blocks, title, out, "report")


def write_ablation_report(
    out_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    baseline: str = "ppo_max",
    *,
    title: str = "PPO-max ablation",
    smooth: int = 1,
    extra: Sequence[Block] = (),
) -> Path:
    """Write ``ablation.md`` / ``ablation.html`` (+ curves under ``out_dir/plots``); return the .md path.

    ``rows``: one dict per variant with ``variant``, ``n_seeds``, ``(mean, lo, hi)`` triples per
    metric (gold_final, gold_peak, win_rate, kl, perplexity, length, explained_variance) and
    ``significant``: metric -> bool (difference vs ``baseline`` excludes 0). Cells show
    ``mean ± half-width`` (just the mean for one seed); significant cells get a ``*``.
    ``runs`` maps variant -> metrics rows, e.g. seed-averaged with :func:`mean_curve`. ``extra``:
    blocks shown after the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda r: r["variant"] != baseline)  # baseline first, else stable
    keys = [k for k in _ABLATION_COLUMNS if any(k in r for r in rows)]
    table = []
    for r in ordered:
        is_base = r["variant"] == baseline
        cells = [r["variant"] + (" (baseline)" if is_base else ""), _fmt(r.get("n_seeds"))]
        for k in keys:
            v = r.get(k)
            mean, lo, hi = v if isinstance(v, (list, tuple)) else (v, None, None)
            cell = _fmt(mean)
            if (r.get("n_seeds") or 1) > 1 and is_number(lo) and is_number(hi) and math.isfinite(hi - lo):
                cell += f" ± {_fmt((hi - lo) / 2)}"
            if not is_base and r.get("significant", {}).get(k):
                cell += " *"
            cells.append(cell)
        table.append(cells)
    plots = plot_curves(runs, out / "plots", smooth=smooth) if runs else []
    overview, panels = _plot_blocks(plots, out)
    blocks: list[Block] = [
        *overview,
        ("h", 2, "Results"),
        ("table", ["variant", "seeds", *(_ABLATION_COLUMNS[k] for k in keys)], table),
        ("p", f"mean ± half-width of the 95% Student-t interval over seeds. * = the 95% Welch t-interval "
              f"of the difference to {baseline} excludes 0."),
        *extra,
        ("h", 2, "How to read the curves"),
        ("p", _READING_GUIDE),
        *panels,
    ]  # fmt: skip
    return _render(blocks, title, out, "ablation")
