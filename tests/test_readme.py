"""The README stays true: its commands are CI's, its demo table is the demo's format, its Python runs."""

import json
import math
import re
from pathlib import Path

import pytest

from ppomax.studies.demo import SUMMARY_TABLE_COLUMNS, summary_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_section(heading: str) -> str:
    """The text of the README's ``## heading`` section, up to the next ``## ``."""
    text = README.read_text(encoding="utf-8")
    parts = text.split(f"\n## {heading}\n", 1)
    assert len(parts) == 2, f"README.md has no '## {heading}' section"
    return parts[1].split("\n## ", 1)[0]


def readme_block(heading: str, lang: str = "") -> str:
    """The first ```lang fenced block of a README section (``lang=""``: a block with no language)."""
    # Walk the fences in pairs: a regex would take a closing ``` for the opening of a bare block.
    opened, body = None, []
    for line in readme_section(heading).splitlines():
        if opened is None and line.startswith("```"):
            opened, body = line[3:].strip(), []
        elif opened is not None and line.strip() == "```":
            if opened == lang:
                return "\n".join(body) + "\n"
            opened = None
        elif opened is not None:
            body.append(line)
    raise AssertionError(f"README.md section '{heading}' has no ```{lang} block")


def readme_demo_table() -> str:
    """The demo's summary table as the README shows it (section "Set up and run")."""
    return readme_block("Set up and run").rstrip("\n")


def parse_demo_table(text: str) -> dict:
    """Inverse of :func:`ppomax.studies.demo.summary_table`: ``{"methods": {name: {column: value}}}``."""
    lines = text.splitlines()
    header = lines[0].split()
    assert header == ["method", *SUMMARY_TABLE_COLUMNS], f"README demo table columns {header}"
    methods = {}
    for line in lines[1:]:
        name, *cells = line.split()
        assert len(cells) == len(SUMMARY_TABLE_COLUMNS), f"README demo table row {line!r}"
        methods[name] = {c: float(v) for c, v in zip(SUMMARY_TABLE_COLUMNS, cells) if v != "–"}
    return {"methods": methods}


def test_readme_demo_table_is_in_the_demos_format():
    """Re-formatting the README's numbers with the demo's formatter gives the README's text back
    (columns, method rows, decimals and alignment), so a hand edit or a format change is caught
    here; the slow demo test checks the numbers themselves (tests/test_demo.py)."""
    table = readme_demo_table()
    parsed = parse_demo_table(table)
    assert list(parsed["methods"]) == ["sft", "ppo_max", "vanilla"]
    assert "gold_peak" not in parsed["methods"]["sft"]  # SFT has no PPO curve: "–"
    assert summary_table(parsed) == table


def test_parse_demo_table_rejects_a_drifted_table():
    """The check above can fail: a README row with a wrong decimal count or a dropped column."""
    table = readme_demo_table()
    three_decimals = re.sub(r" (\d+\.\d\d)(?=\s|$)", lambda m: m.group(1) + "0", table, count=1)  # " 3.35" -> "3.350"
    assert three_decimals != table and summary_table(parse_demo_table(three_decimals)) != three_decimals
    header, *rows = table.splitlines()
    with pytest.raises(AssertionError, match="columns"):
        parse_demo_table("\n".join([header.replace("   gold_peak", ""), *rows]))


def test_ci_runs_the_readme_commands():
    """.ci/run holds the README's set-up line and test line verbatim."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    setup = [x.strip() for x in readme_block("Set up and run", "bash").splitlines() if x.strip()]
    assert setup[0].startswith("python3 -m venv") and "torch==2.13.0" in setup[0]
    assert setup[1] == "ppomax demo"
    assert setup[0] in ci
    (test_cmd,) = [x.strip() for x in readme_block("Test", "bash").splitlines() if x.strip()]
    assert test_cmd in ci


def test_readme_documentation_list_links_every_docs_page():
    """Each docs/*.md page is in the README's "Documentation" list, and each link there resolves."""
    links = [line.split("](", 1)[1].split(")", 1)[0]
             for line in readme_section("Documentation").splitlines() if line.startswith("- [")]
    assert sorted(links) == sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
    assert all((ROOT / link).is_file() for link in links)


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    """Execute the README's "Python API" block as written, in a fresh directory (~6 s)."""
    code = readme_block("Python API", "python")
    monkeypatch.chdir(tmp_path)  # build_tiny_model("tiny") and output_dir="runs/api" land here
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    metrics = namespace["metrics"]
    # critic_pretrain_steps=1 then max_steps=3 PPO iterations, numbered on one step axis
    assert [r["phase"] for r in metrics] == ["critic_pretrain", "ppo", "ppo", "ppo"]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    for r in metrics:
        # the README's reward is a fraction of letters: always in [0, 1]
        assert math.isfinite(r["reward/raw_mean"]) and 0.0 <= r["reward/raw_mean"] <= 1.0
    assert capsys.readouterr().out.splitlines()[-1] == f"{metrics[-1]['reward/raw_mean']} {metrics[-1]['kl/ref']}"
    # the scores logged with the samples are the README's reward_fn applied to them
    samples = [json.loads(x) for x in (tmp_path / "runs" / "api" / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:
        assert s["score"] == pytest.approx(namespace["reward_fn"]([s["prompt"]], [s["response"]])[0], rel=1e-6)
    assert (tmp_path / "tiny" / "config.json").exists()
    assert (tmp_path / "runs" / "api" / "checkpoint-4" / "COMPLETE").exists()
