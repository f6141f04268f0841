"""The docs stay in step with the code: metric names, the options table, README commands."""

import json
import re
from pathlib import Path

import pytest

from ppomax.config import FIELD_ALIASES, PPOConfig
from ppomax.metrics_doc import METRIC_DOCS, STAGE_METRIC_DOCS, metrics_table_markdown

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


# A test citation: `tests/<file>.py`, optionally `::name` (a `[param]` id after it is ignored),
# or a bare `::name` that continues the file cited last (the style of docs/reliability.md tables).
_CITATION = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?|(?<![\w.:/])::(\w+)")


def cited_tests(text: str) -> list[tuple[str | None, str | None]]:
    """Every (test file, test name or None) that ``text`` cites, in order; a bare ``::name``
    before any file is (None, name)."""
    cited, current = [], None
    for m in _CITATION.finditer(text):
        if m.group(1):
            current = m.group(1)
            cited.append((current, m.group(2)))
        else:
            cited.append((current, m.group(3)))
    return cited


def citation_errors(text: str, source: str) -> list[str]:
    """One message per citation in ``text`` (from ``source``) whose file or ``def name(`` is missing."""
    errors = []
    for path, name in cited_tests(text):
        if path is None:
            errors.append(f"{source}: `::{name}` follows no tests/<file>.py citation")
        elif not (ROOT / path).is_file():
            errors.append(f"{source} cites {path}, which does not exist")
        elif name and not re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M):
            errors.append(f"{source} cites {path}::{name}, which has no `def {name}(`")
    return errors


def _citing_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
             ROOT / "examples" / "README.md", ROOT / ".ci" / "run"]
    missing = [str(f.relative_to(ROOT)) for f in files if not f.is_file()]
    assert not missing, f"pages to check for test citations are gone: {missing}"
    return files


def test_every_cited_test_exists():
    """README.md, docs/*.md, benchmarks/ and examples/ READMEs and .ci/run name tests as proof;
    every named file must exist and every named test must be defined in it."""
    errors, n = [], 0
    for f in _citing_files():
        text = f.read_text(encoding="utf-8")
        n += len(cited_tests(text))
        errors += citation_errors(text, str(f.relative_to(ROOT)))
    assert n > 60, f"only {n} test citations found: the citation pattern no longer matches the docs"
    assert not errors, "\n".join(errors)


def test_citation_checker_catches_made_up_citations():
    text = ("`::test_orphan`; `tests/test_docs.py::test_no_such_test`, `::test_options_table_matches_presets`, "
            "`::test_made_up[x]` and `tests/test_nope.py::test_a`; plain `tests/test_docs.py` and std::vector")
    assert cited_tests(text) == [
        (None, "test_orphan"), ("tests/test_docs.py", "test_no_such_test"),
        ("tests/test_docs.py", "test_options_table_matches_presets"), ("tests/test_docs.py", "test_made_up"),
        ("tests/test_nope.py", "test_a"), ("tests/test_docs.py", None),
    ]  # fmt: skip
    assert citation_errors(text, "x.md") == [
        "x.md: `::test_orphan` follows no tests/<file>.py citation",
        "x.md cites tests/test_docs.py::test_no_such_test, which has no `def test_no_such_test(`",
        "x.md cites tests/test_docs.py::test_made_up, which has no `def test_made_up(`",
        "x.md cites tests/test_nope.py, which does not exist",
    ]


def test_reliability_doc_names_existing_tests():
    """docs/reliability.md cites a test for every guarantee; each cited test must exist."""
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert len([name for _, name in cited_tests(text) if name]) > 40
    assert not citation_errors(text, "docs/reliability.md")


# The fields TRL 1.12 declares on trl/experimental/ppo/ppo_config.py::PPOConfig (read from the
# trl-1.12.0 wheel; TRL is not a dependency, so the list lives here). TrainingArguments fields
# it inherits are mapped in general on the page, not one by one.
TRL_PPO_FIELDS = (
    "learning_rate", "dataset_num_proc", "num_mini_batches", "total_episodes", "local_rollout_forward_batch_size",
    "num_sample_generations", "response_length", "stop_token", "stop_token_id", "temperature",
    "missing_eos_penalty", "sft_model_path", "world_size", "num_total_batches", "micro_batch_size",
    "local_batch_size", "batch_size", "local_mini_batch_size", "mini_batch_size", "push_to_hub",
    "reward_model_path", "model_adapter_name", "ref_adapter_name", "num_ppo_epochs", "whiten_rewards", "kl_coef",
    "kl_estimator", "cliprange", "vf_coef", "cliprange_value", "gamma", "lam", "ds3_gather_for_generation",
)
# `--words` on the page that are options of other programs or of the CLI itself, not PPOConfig fields.
NOT_PPO_FIELDS = {
    "config",  # ppomax ppo --config FILE.yaml
    "help",  # ppomax ppo --help
    "flag",  # the "--flag value" pattern in prose
    "num_processes", "cpu",  # accelerate launch
    "nproc_per_node",  # torchrun
    "to", "checkpoint",  # ppomax export --to seq-cls --checkpoint DIR
    "revision",  # hf download ID --revision R
}


def test_migration_page_covers_every_trl_field():
    text = (ROOT / "docs" / "migrating_from_trl.md").read_text(encoding="utf-8")
    fields = set(PPOConfig.__dataclass_fields__)
    # every TRL field exactly once in the first column of the mapping table
    table = text.split("## Every TRL `PPOConfig` field", 1)[1].split("\n## ", 1)[0]
    listed = [re.match(r"\| `(\w+)`", line).group(1) for line in table.splitlines() if line.startswith("| `")]
    assert sorted(listed) == sorted(TRL_PPO_FIELDS), (
        f"not listed: {sorted(set(TRL_PPO_FIELDS) - set(listed))}; not TRL fields: {sorted(set(listed) - set(TRL_PPO_FIELDS))}; "
        f"twice: {sorted({x for x in listed if listed.count(x) > 1})}"
    )
    # every ppomax flag the page names exists
    flags = set(re.findall(r"(?<![\w-])--(\w+)", text)) - NOT_PPO_FIELDS
    assert len(flags) > 40
    unknown = sorted(flags - fields - set(FIELD_ALIASES))  # --dtype is --torch_dtype
    assert not unknown, f"docs/migrating_from_trl.md names flags that PPOConfig lacks: {unknown}"
    # and the keyword arguments of the ppomax example are PPOConfig fields
    example = text.split("PPOConfig.from_preset(", 1)[1].split("\n)", 1)[0]
    kwargs = re.findall(r"(\w+)=", example)
    assert len(kwargs) >= 10 and not sorted(set(kwargs) - fields), sorted(set(kwargs) - fields)


# The metric names TRL 1.12's PPOTrainer.train logs (trl/experimental/ppo/ppo_trainer.py, `metrics[...]`),
# plus `epoch`, which Trainer.log adds.
TRL_PPO_METRICS = (
    "eps", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
    "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
    "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr", "episode",
    "epoch",
)


def test_migration_page_maps_every_trl_metric():
    text = (ROOT / "docs" / "migrating_from_trl.md").read_text(encoding="utf-8")
    table = text.split("## Every TRL PPO metric", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| `")]
    listed = [re.match(r"`([\w/]+)`", r[0]).group(1) for r in rows]
    assert sorted(listed) == sorted(TRL_PPO_METRICS), sorted(set(TRL_PPO_METRICS) ^ set(listed))
    named = {m for r in rows for m in re.findall(r"`([\w/]+)`", r[1])}
    unknown = sorted(named - set(METRIC_DOCS) - {"step", "ppo_step"})
    assert not unknown, f"the TRL metric table names metrics ppomax does not log: {unknown}"


def test_migration_script_runs(tmp_path, monkeypatch):
    """The ppomax side of the page's side-by-side, run as written: the two Hub ids are a tiny causal LM and a
    tiny AutoModelForSequenceClassification reward model in an offline Hub cache; load_dataset, the Hub
    upload and wandb are mocked at their boundaries; the sizes are cut to one short iteration."""
    import importlib.machinery
    import shutil
    import sys
    import types

    import datasets
    import torch
    from huggingface_hub import HfApi, constants
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ppomax.models import build_tiny_model, load_tokenizer

    text = (ROOT / "docs" / "migrating_from_trl.md").read_text(encoding="utf-8")
    script = text.split("# ppomax: the same models, data and logging\n", 1)[1].split("```", 1)[0]
    cuts = {"rollout_batch_size=64": "rollout_batch_size=4", "per_device_train_batch_size=16":
            "per_device_train_batch_size=2", "max_steps=100": "max_steps=1, critic_pretrain_steps=1",
            "response_length=53": "response_length=4"}
    for a, b in cuts.items():
        assert script.count(a) == 1, a
        script = script.replace(a, b)

    rev = "0" * 40
    sft = build_tiny_model(tmp_path / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(sft).save_pretrained(tmp_path / "rm")
    for repo, src in (("my-org/pythia-1b-sft", sft), ("my-org/pythia-1b-rm", tmp_path / "rm")):
        entry = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        shutil.copytree(src, entry / "snapshots" / rev)
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text(rev)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    rows = [{"prompt": f"review number {i}: the film was", "chosen": "good", "rejected": "bad"} for i in range(104)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(rows))
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("U", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, repo_id, folder_path, **kw: uploads.append(repo_id))
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    run = types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    inits = []
    wandb.init = lambda **kw: inits.append(kw) or run
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.chdir(tmp_path)
    exec(compile(script, "migrating_from_trl.md", "exec"), {"__name__": "__main__"})  # noqa: S102

    out = tmp_path / "pythia-1b-ppo"
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    assert uploads == ["my-org/pythia-1b-ppo"] and inits[0]["name"] == "pythia-1b-ppo"
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["ppo_step"] == 1 and "eval/rm_reward" in last
