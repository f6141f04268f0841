"""Evaluation during PPO (``--eval_steps``) and the best checkpoint (``--metric_for_best_model``).

Every ``eval_steps`` PPO iterations the policy samples one response per held-out prompt
(``--eval_dataset`` or ``eval_prompts=`` in Python) at the training temperature, with a fixed
seed and without touching the training RNG streams (so resume stays exact), and the row gets
``eval/rm_reward``, ``eval/kl``, ``eval/length``, ``eval/truncated``, ``eval/perplexity``, the
set-level collapse metrics of the decoded responses (``eval/distinct_1``, ``eval/distinct_2``,
``eval/self_similarity``, ``eval/template_share``: :mod:`ppomax.diversity`) and, where the task has
a judge (``gold_fn``), ``eval/gold``. The judge is called once with every held-out response, so a
judge with a set-level term sees the whole set, whatever the generation batch size.

With ``--metric_for_best_model`` (names as in transformers' TrainingArguments; ``gold`` and
``eval/gold`` both work), the checkpoint with the best value so far is kept in
``<output_dir>/best/checkpoint-N`` (plus ``best/best.json``). It lives apart from the periodic
checkpoints: their rotation and the collapse guard's rollback target never delete it, and it
never deletes them. ``--load_best_model_at_end`` loads its weights when training ends.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("ppomax")

EVAL_METRICS = ("rm_reward", "gold", "kl", "length", "truncated", "perplexity")
_LOWER_IS_BETTER = ("kl", "length", "truncated", "perplexity")


def metric_key(name: str) -> str:
    """'gold', 'eval/gold' or 'eval_gold' -> 'gold'."""
    for prefix in ("eval/", "eval_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def greater_is_better(metric: str, setting: bool | None) -> bool:
    """The setting, or by default: higher is better except for kl, length, truncated and perplexity."""
    return setting if setting is not None else metric_key(metric) not in _LOWER_IS_BETTER


class BestTracker:
    """The best value of ``eval/<metric>`` seen so far and its iteration (saved in the run state)."""

    def __init__(self, metric: str, greater: bool) -> None:
        self.key, self.greater = f"eval/{metric_key(metric)}", greater
        self.value: float | None = None
        self.step: int | None = None

    def improves(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.greater else value < self.value

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "step": self.step}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.value, self.step = state.get("value"), state.get("step")


@torch.no_grad()
def evaluate(tr, prompt_ids: list[list[int]]) -> dict[str, float]:
    """``eval/*`` metrics of the trainer's current policy on ``prompt_ids``."""
    from ppomax.data import collate_prompts
    from ppomax.diversity import collapse_metrics
    from ppomax.training import forked_rng

    cfg = tr.cfg
    tr.policy.eval()
    sums = {"rm_reward": 0.0, "kl": 0.0, "length": 0.0, "truncated": 0.0, "nll": 0.0, "gold": 0.0}
    texts: dict[str, list] = {"prompts": [], "responses": [], "truncated": []}
    # the same eval samples for a given policy, whatever the step; every device's stream is restored
    with forked_rng(cfg.seed + 7919):
        for s in range(0, len(prompt_ids), cfg.generation_batch_size):
            batch = collate_prompts(prompt_ids[s : s + cfg.generation_batch_size], tr.pad_id)
            p_ids, p_mask = batch["input_ids"].to(tr.device), batch["attention_mask"].to(tr.device)
            gen = tr.engine.generate(p_ids, p_mask, tr.sampling)
            resp, mask = gen.response_ids, gen.mask
            parts = (p_ids, p_mask, resp, mask)
            logp = tr._in_chunks(lambda *x: tr._logprobs(tr.policy, x, cfg.temperature), parts) * mask
            ref = tr._in_chunks(lambda *x: tr._ref_logprobs(x), parts) * mask
            rows = tr.eval_prompt_rows[s : s + cfg.generation_batch_size] if tr.eval_prompt_rows else None
            sums["rm_reward"] += tr._score(*parts, rows, gen.truncated).sum().item()
            sums["kl"] += (logp - ref).sum().item()
            sums["nll"] -= logp.sum().item()
            sums["length"] += mask.sum().item()
            sums["truncated"] += gen.truncated.float().sum().item()
            prompts, responses = tr._decode(*parts)
            texts["prompts"] += prompts
            texts["responses"] += responses
            texts["truncated"] += gen.truncated.tolist()
        if tr.gold_fn is not None:  # inside the RNG guard: a judge may sample too
            sums["gold"] = float(sum(tr.gold_fn(texts["prompts"], texts["responses"], texts["truncated"])))
    n, n_tok = len(prompt_ids), max(sums["length"], 1.0)
    out = {f"eval/{k}": sums[k] / n for k in ("rm_reward", "kl", "length", "truncated")}
    out["eval/perplexity"] = math.exp(min(sums["nll"] / n_tok, 50.0))
    out.update({f"eval/{k}": v for k, v in collapse_metrics(texts["responses"]).items()})
    if tr.gold_fn is not None:
        out["eval/gold"] = sums["gold"] / n
    return out


def save_best(tr, value: float) -> Path | None:
    """Write the current state as ``best/checkpoint-<iteration>`` (the previous best is replaced)."""
    from ppomax.ppo import state as run_state

    path = run_state.save(tr, run_dir=tr.out / "best", save_total_limit=1)
    if path is not None and tr.dist.is_main:
        info = {"metric": tr.best.key, "value": value, "step": tr.iteration, "checkpoint": path.name,
                "greater_is_better": tr.best.greater}
        (tr.out / "best" / "best.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return path


def load_best(tr) -> Path | None:
    """Load the best checkpoint's weights into the trainer's models (``--load_best_model_at_end``)."""
    from ppomax import models as M
    from ppomax.checkpoint import list_checkpoints

    ckpts = list_checkpoints(tr.out / "best")
    if not ckpts:
        logger.warning("load_best_model_at_end: no best checkpoint in %s; keeping the final weights", tr.out / "best")
        return None
    path = ckpts[-1]
    M.load_weights_into(tr.policy, path / "policy")
    if tr.critic is not None:
        M.load_weights_into(tr.critic, path / "critic")
    tr.engine.sync(tr.policy)
    logger.info("loaded the best model (%s = %s at iteration %s) from %s", tr.best.key, tr.best.value,
                tr.best.step, path)
    return path
