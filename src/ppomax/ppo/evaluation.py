"""Evaluation during PPO (``--eval_steps``) and writing the best checkpoint (``--metric_for_best_model``).

Every ``eval_steps`` PPO iterations the policy samples one response per held-out prompt
(``--eval_dataset`` or ``eval_prompts=`` in Python) at the training temperature, with a fixed
seed and without touching the training RNG streams (so resume stays exact), and the row gets
``eval/rm_reward``, ``eval/kl``, ``eval/length``, ``eval/truncated``, ``eval/perplexity``, the
set-level collapse metrics of the decoded responses (``eval/distinct_1``, ``eval/distinct_2``,
``eval/self_similarity``, ``eval/template_share``: :mod:`ppomax.diversity`) and, where the task has
a judge (``gold_fn``), ``eval/gold``. The judge is called once with every held-out response, so a
judge with a set-level term sees the whole set, whatever the generation batch size. The sampling,
the statistics and the RNG rule are those of every evaluation in ppomax
(:func:`ppomax.evaluate.sample_and_score`, :func:`ppomax.evaluate.summarize`); only the forward
passes are the trainer's own (chunked, the reward function, π_ref as the policy without adapters).

The best checkpoint (which metric, its direction, the tracker, ``best/`` on disk and its invariants)
is :mod:`ppomax.ppo.best`; its names are importable from here as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ppomax import checkpoint as ckpt_lib
from ppomax import distributed as dist_lib
from ppomax.ppo.best import (  # noqa: F401  (re-exported: the trainer and ppo/setup read them from here)
    EVAL_METRICS,
    LOWER_IS_BETTER,
    NEEDS_DIRECTION,
    BestTracker,
    best_checkpoint,
    check_best_model_settings,
    greater_is_better,
    metric_key,
    prune_best,
    reconcile_best,
    write_best_json,
)

logger = logging.getLogger("ppomax")

# eval/* keys, in the order they are logged.
EVAL_KEYS = ("rm_reward", "kl", "length", "truncated", "perplexity", "distinct_1", "distinct_2", "self_similarity",
             "template_share", "gold")


@torch.no_grad()
def evaluate(tr, prompt_ids: list[list[int]]) -> dict[str, float]:
    """``eval/*`` metrics of the trainer's current policy on ``prompt_ids``."""
    from ppomax.evaluate import decode, sample_and_score, summarize

    cfg = tr.cfg
    bs = cfg.generation_batch_size
    tr.policy.eval()

    def score_batch(idx: list[int], parts: tuple, gen) -> dict:
        mask = parts[3]
        fw = tr.forwards  # the rollout's forwards (ppo/experience.py)
        logp = fw.in_chunks(lambda *x: fw.logprobs_fn(tr.policy, x, cfg.temperature), parts) * mask
        ref = fw.in_chunks(lambda *x: fw.ref_logprobs(x), parts) * mask
        rows = [tr.eval_prompt_rows[i] for i in idx] if tr.eval_prompt_rows else None
        return dict(texts=decode(tr.tokenizer, *parts), logp=logp, ref_logp=ref, rm=fw.score(*parts, rows, gen.truncated))

    # the same eval samples for a given policy (and number of processes), whatever the step; every
    # device's stream is restored. Each rank samples its share of the prompts; all ranks summarise the
    # whole set (distinct-n, self-similarity and a judge's set-level term need every response).
    samples, gold = sample_and_score(tr.engine, tr.sampling, prompt_ids, bs, tr.pad_id, tr.device, cfg.seed + 7919,
                                     score_batch, judge=tr.gold_fn, d=tr.dist)
    m = summarize(samples, gold)
    return {f"eval/{k}": m[k] for k in EVAL_KEYS if k in m}


def evaluate_step(tr, row: dict) -> bool:
    """Every eval_steps PPO iterations (and at the last): ``eval/*`` into ``row``, averaged over ranks (the
    same numbers on every rank, so the decision below is too, and ``save_best``'s collectives run on all
    ranks or none). True when ``eval/<metric>`` improves the tracker; :func:`commit_best` records it."""
    if tr.eval_prompt_ids is None or not (row["ppo_step"] % tr.cfg.eval_steps == 0
                                          or tr.iteration == tr.total_iterations):
        return False
    row.update(dist_lib.reduce_floats(evaluate(tr, tr.eval_prompt_ids), tr.dist, "mean"))
    return tr.best is not None and tr.best.improves(row[tr.best.key])


def commit_best(tr, row: dict, action: str | None) -> bool:
    """Record an improved eval value in the tracker, unless the collapse guard rolled this iteration back
    (the evaluated weights are gone: ``best/`` would get the restored ones under their value). Called before
    the iteration's periodic save, so that checkpoint records the new best too. True: save best/ next."""
    if action == "rollback":
        return False
    tr.best.commit(row[tr.best.key], tr.iteration)
    return True


def save_best(tr) -> Path | None:
    """Write the current state as ``best/checkpoint-<iteration>`` (the tracker already holds its value), then
    ``best/best.json`` (atomically), then remove the best checkpoints nothing refers to any more."""
    from ppomax.ppo import state as run_state

    path = run_state.save(tr, run_dir=tr.out / "best", save_total_limit=None)
    if path is None:  # refused (non-finite weights; so was the periodic save): the tracker goes back
        tr.best.revert()
    elif tr.dist.is_main:
        write_best_json(tr, path)
        prune_best(tr)
    dist_lib.barrier(tr.dist)
    return path


def load_best(tr) -> Path | None:
    """Load the weights of the checkpoint ``best/best.json`` names into the trainer's models
    (``--load_best_model_at_end``); its files are checked against their manifest first."""
    from ppomax import models as M

    path = best_checkpoint(tr.out)
    if path is None:
        logger.warning("load_best_model_at_end: no best checkpoint named by %s; keeping the final weights",
                       tr.out / "best" / "best.json")
        return None
    ckpt_lib.verify_checkpoint(path)
    M.load_weights_into(tr.policy, path / "policy")
    if tr.critic is not None:
        M.load_weights_into(tr.critic, path / "critic")
    tr.engine.sync(tr.policy)
    logger.info("loaded the best model (%s = %s at iteration %s) from %s", tr.best.key, tr.best.value,
                tr.best.step, path)
    return path
