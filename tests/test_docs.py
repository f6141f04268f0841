"""The docs stay in step with the code: metric names, the options table, README commands."""

import re
from pathlib import Path

import pytest

from ppomax.config import PPOConfig
from ppomax.report import METRIC_DOCS, STAGE_METRIC_DOCS, metrics_table_markdown

ROOT = Path(__file__).resolve().parents[1]
NOT_METRICS = {"step", "ppo_step", "phase", "skip_cause", "collapse"}


def test_metrics_doc_is_generated_from_code():
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert metrics_table_markdown() in text
    for name in STAGE_METRIC_DOCS:
        assert f"`{name}`" in text


def test_every_logged_ppo_metric_is_documented(tmp_path):
    from ppomax.models import build_tiny_model
    from ppomax.ppo.trainer import PPOTrainer

    model = build_tiny_model(tmp_path / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    cfg = PPOConfig.from_preset(
        "ppo_max", model_name_or_path=str(model), output_dir=str(tmp_path / "run"), critic_init="sft",
        max_steps=1, critic_pretrain_steps=1, rollout_batch_size=4, num_mini_batches=2,
        per_device_train_batch_size=2, response_length=6, report_to="none", disable_tqdm=True,
        ptx_coef=0.1, learning_rate=1e-4,
    )
    ptx = [{"prompt": "a", "response": "b c"}] * 4
    rows = PPOTrainer(cfg, prompts=["hello there", "the cat"], reward_fn=lambda p, r: [len(x) for x in r],
                      gold_fn=lambda p, r, t: [0.0] * len(r), ptx_rows=ptx).train()
    logged = set().union(*(r.keys() for r in rows)) - NOT_METRICS
    missing = sorted(logged - set(METRIC_DOCS))
    assert not missing, f"metrics logged but not documented in METRIC_DOCS: {missing}"


def _parse_cell(cell: str):
    cell = cell.strip()
    if cell == "none":
        return None
    if cell in ("True", "False"):
        return cell == "True"
    try:
        return float(cell)
    except ValueError:
        return cell


def test_options_table_matches_presets():
    text = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    presets = {"ppo_max": PPOConfig.from_preset("ppo_max"), "vanilla": PPOConfig.from_preset("vanilla")}
    checked = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not cells[2].startswith("`--"):
            continue
        flag = re.match(r"`--(\w+)`", cells[2]).group(1)
        assert flag in PPOConfig.__dataclass_fields__, f"docs/options.md names unknown flag --{flag}"
        if flag == "model_name_or_path":
            continue
        for col, name in ((3, "ppo_max"), (4, "vanilla")):
            expect = getattr(presets[name], flag)
            got = _parse_cell(cells[col])
            if isinstance(expect, bool) or expect is None or isinstance(expect, str):
                assert got == expect, f"docs/options.md: --{flag} {name} says {cells[col]!r}, code has {expect!r}"
            else:
                assert got == pytest.approx(expect), f"docs/options.md: --{flag} {name} says {cells[col]!r}, code {expect!r}"
        checked += 1
    assert checked >= 20


def _readme_block(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    setup = _readme_block("Set up and run")
    assert setup[0].startswith("python3 -m venv") and "torch==2.13.0" in setup[0]
    assert setup[1] == "ppomax demo"
    assert setup[0] in ci.splitlines()
    (test_cmd,) = _readme_block("Test")
    assert test_cmd in ci.splitlines()


def test_reliability_doc_names_existing_tests():
    """docs/reliability.md cites a test for every guarantee; each cited test must exist."""
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    cited, current = [], None
    for m in re.finditer(r"`(?:(tests/\w+\.py))?::(\w+)(?:\[[\w-]+\])?`", text):
        current = m.group(1) or current
        cited.append((current, m.group(2)))
    assert len(cited) > 40
    for path, name in cited:
        source = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"docs/reliability.md cites {path}::{name}, which does not exist"
