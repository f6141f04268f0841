"""A PPO run's checkpoints: what is saved, and exact resume (docs/reliability.md §1).

A checkpoint (ppomax.checkpoint) holds the trained models (policy; critic when the estimator has
one), their AdamW states, and the JSON state below: iteration, η and the adaptive KL controller,
the running reward moments, the prompt / PPO-ptx samplers, both LR schedules, the collapse
guard's baselines, the skip counter and the rollback target. RNG states are stored by
``checkpoint.save_checkpoint``; a multi-process run stores every rank's. Functions of the trainer,
kept here so that ``trainer.py`` reads as the loop.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ppomax import checkpoint as ckpt_lib
from ppomax import distributed as dist_lib
from ppomax import sharding
from ppomax.training import load_scheduler_state, scheduler_state, set_seed

logger = logging.getLogger("ppomax")


def state_dict(tr) -> dict[str, Any]:
    """The JSON part of a PPO checkpoint."""
    return {
        "stage": "ppo",
        "iteration": tr.iteration,
        "kl_coef": tr.kl_coef,
        "kl_ctl": tr.kl_ctl.state_dict() if tr.kl_ctl else None,
        "score_moments": tr.score_moments.state_dict(),
        "sampler": tr.sampler.state_dict(),
        "ptx_sampler": tr.ptx_sampler.state_dict() if tr.ptx_sampler else None,
        "policy_sched": scheduler_state(tr.policy_sched),
        "critic_sched": scheduler_state(tr.critic_sched) if tr.critic is not None else None,
        "guard": tr.guard.state_dict(),
        "consecutive_skips": tr.consecutive_skips,
        "last_healthy": tr.last_healthy,
        "best": tr.best.state_dict() if tr.best is not None else None,
        "model_signature": signature(tr.policy),
    }


def signature(policy) -> dict[str, Any]:
    """What a checkpoint's policy must match to be resumed into this one."""
    pc = policy.config
    return {"policy": [sharding.class_name(policy), pc.vocab_size, pc.hidden_size, pc.num_hidden_layers],
            "n_params": sum(p.numel() for p in policy.parameters())}


def _trained(tr) -> tuple[dict[str, Any], dict[str, Any]]:
    """(models, optimizers) by name: the policy, and the critic when the estimator has one."""
    models, opts = {"policy": tr.policy}, {"policy": tr.policy_opt}
    if tr.critic is not None:
        models["critic"], opts["critic"] = tr.critic, tr.critic_opt
    return models, opts


def save(tr, run_dir: Path | None = None, save_total_limit: int | None = None) -> Path | None:
    """Write ``<run_dir>/checkpoint-<iteration>`` (default: the output dir, rotated to the config's
    save_total_limit; elsewhere to ``save_total_limit``, None: no rotation); None (and a warning) when a
    model holds NaN/inf weights. Every rank takes part (gathering shards and RNG states); rank 0 writes, and
    a write that fails there (disk full, permissions) raises its CheckpointError's message on every rank
    (distributed.run_on_main): no rank is left waiting for a checkpoint that will never be complete."""
    bad = nonfinite_weights(tr)
    if bad:
        logger.warning("iteration %d: checkpoint not saved: non-finite weights in %s (the last checkpoint "
                       "on disk stays the newest good one)", tr.iteration, " and ".join(bad))
        return None
    models, opts = _trained(tr)
    if tr.sharding != "none":  # every rank takes part in gathering; rank 0 writes the whole
        opts = {k: sharding.GatheredOptimizer(models[k], o) for k, o in opts.items()}
        models = {k: sharding.GatheredModel(m) for k, m in models.items()}
    rank_rng = dist_lib.gather_rng_states(tr.dist)  # each rank's sampling stream, for exact resume
    run_dir = tr.out if run_dir is None else run_dir
    periodic = run_dir == tr.out

    def write() -> Path:
        path = ckpt_lib.save_checkpoint(
            run_dir, tr.iteration, models, opts, state_dict(tr),
            tokenizer=tr.tokenizer, save_total_limit=tr.cfg.save_total_limit if periodic else save_total_limit,
            keep=(tr.last_healthy,) if tr.last_healthy and periodic else (), rank_rng=rank_rng,
        )
        if periodic and tr.best is not None:  # rotation may have removed the last record of an older best
            from ppomax.ppo.best import prune_best

            prune_best(tr)
        return path

    dist_lib.run_on_main(write, tr.dist)  # the other ranks wait until the checkpoint is complete
    return run_dir / f"checkpoint-{tr.iteration}"


def nonfinite_weights(tr) -> list[str]:
    """The trained models ('policy', 'critic') holding a NaN or inf parameter."""
    bad = []
    for name, model in _trained(tr)[0].items():
        ok = sharding.all_finite(model)  # one device sync per model (this rank's shards)
        if not (dist_lib.all_true(ok, tr.dist) if tr.sharding != "none" else ok):
            bad.append(name)
    return bad


def load(tr, path: Path, restore_rng: bool = True) -> None:
    """Restore everything ``save`` wrote into the trainer ``tr``; the engine samples the loaded policy."""
    from ppomax import models as M

    state = ckpt_lib.load_state(path)
    if state.get("stage", "ppo") != "ppo":
        raise ckpt_lib.CheckpointError(f"{path} is a {state['stage']} checkpoint, not ppo")
    if state.get("model_signature") != signature(tr.policy):
        raise ckpt_lib.CheckpointError(f"{path} was written for a different model "
                                       f"({state.get('model_signature')} vs {signature(tr.policy)})")
    models, opts = _trained(tr)
    for name, model in models.items():
        M.load_weights_into(model, path / name)
        ckpt_lib.load_optimizer(path, name, opts[name], model)
    load_scheduler_state(tr.policy_sched, state["policy_sched"])
    if tr.critic is not None:
        load_scheduler_state(tr.critic_sched, state["critic_sched"])
    tr.iteration = int(state["iteration"])
    tr.kl_coef = float(state["kl_coef"])
    if tr.kl_ctl is not None and state.get("kl_ctl"):
        tr.kl_ctl.load_state_dict(state["kl_ctl"])
    tr.score_moments.load_state_dict(state["score_moments"])
    tr.sampler.load_state_dict(state["sampler"])
    if tr.ptx_sampler is not None and state.get("ptx_sampler"):
        tr.ptx_sampler.load_state_dict(state["ptx_sampler"])
    tr.guard.load_state_dict(state.get("guard", {}))
    tr.consecutive_skips = int(state.get("consecutive_skips", 0))
    tr.last_healthy = state.get("last_healthy")
    if tr.best is not None and restore_rng:  # resume; a rollback (restore_rng=False) keeps the best seen so far:
        tr.best.load_state_dict(state.get("best"))  # best/ is not rolled back
    tr.engine.sync(tr.policy)  # resume and rollback: the engine samples from the loaded weights
    if restore_rng:
        if not ckpt_lib.restore_rng(path, state, tr.dist.rank):  # no state of this rank stored:
            set_seed(tr.cfg.seed + tr.dist.rank + 100003 * tr.iteration)  # a distinct stream per rank
    logger.info("resumed from %s at iteration %d", path, tr.iteration)


def rollback(tr) -> bool:
    """The collapse guard's rollback: restore the last healthy checkpoint (its RNG streams are not
    restored, so the run does not replay the same samples), raise η, keep counting iterations forward.
    False (and a warning; the guard acts as 'warn') when there is no healthy checkpoint.

    The checkpoint is verified against its manifest first, as resume verifies one named explicitly
    (checkpoint.verify_checkpoint; rank 0 reads it, every rank gets the outcome): a damaged one is a
    CheckpointError naming the bad file, raised on every rank before anything is loaded. It is never
    replaced by another checkpoint: the periodic ones may hold the collapsed policy."""
    from ppomax.config import PPOConfig

    if not tr.last_healthy or not (Path(tr.last_healthy) / "COMPLETE").exists():
        logger.warning("collapse guard 'rollback': no healthy checkpoint to roll back to (%s); continuing as 'warn'",
                       tr.last_healthy or "none saved yet")
        return False
    healthy = Path(tr.last_healthy)

    def verify() -> None:
        try:
            ckpt_lib.verify_checkpoint(healthy)
        except ckpt_lib.CheckpointError as e:
            raise ckpt_lib.CheckpointError(
                f"collapse guard 'rollback': cannot roll back to the last healthy checkpoint, {e}. Nothing was "
                f"loaded; the run stopped at iteration {tr.iteration}. Resume from an intact checkpoint saved "
                f"before the collapse (--resume_from DIR/checkpoint-N)") from None

    dist_lib.run_on_main(verify, tr.dist)
    # η × factor; an η of 0 (vanilla) would stay 0, so it becomes the PPO-max value instead.
    eta = tr.kl_coef * tr.cfg.rollback_kl_factor if tr.kl_coef > 0 else PPOConfig.__dataclass_fields__["kl_coef"].default
    logger.warning("rolling back to %s; η %g -> %g", healthy, tr.kl_coef, eta)
    it = tr.iteration
    tr.load_checkpoint(healthy, restore_rng=False)  # through the trainer: one seam for every load
    tr.kl_coef = eta
    if tr.kl_ctl is not None:
        tr.kl_ctl.value = tr.kl_coef
    tr.iteration = it  # keep counting forward: metrics rows stay unique
    tr.last_healthy = str(healthy)
    return True


def count_skipped_iteration(tr, cause: str) -> dict[str, Any]:
    """Count an iteration whose update was skipped entirely (non-finite weights, scores or advantages, or
    every mini-batch step skipped); ``max_consecutive_skips`` of them in a row stop the run with an error
    naming the last good checkpoint. An iteration that applied any step resets the count (trainer.step)."""
    from ppomax.errors import UserError

    tr.consecutive_skips += 1
    logger.warning("iteration %d: update skipped: %s (%d in a row)", tr.iteration, cause, tr.consecutive_skips)
    if tr.consecutive_skips >= tr.cfg.max_consecutive_skips:
        ckpts = ckpt_lib.list_checkpoints(tr.out)
        last = f"The last good checkpoint, {ckpts[-1]}, is intact." if ckpts else "No checkpoint was written."
        raise UserError(f"stopped after {tr.consecutive_skips} consecutive skipped updates; last cause: {cause}. "
                        f"{last}")
    return {"skipped": 1.0, "skip_cause": cause}


def open_run(tr):
    """Prepare the output dir and, with --resume_from, load the checkpoint to resume; return the metrics
    logger (rank 0; the other ranks get one that only reduces)."""
    from ppomax.training import MetricsLogger, RankMetrics, prepare_output_dir, truncate_jsonl

    cfg, main = tr.cfg, tr.dist.is_main
    resume_ckpt = ckpt_lib.resolve_resume(cfg.output_dir, cfg.resume_from) if cfg.resume_from else None
    dist_lib.run_on_main(lambda: prepare_output_dir(cfg, "ppo"), tr.dist)  # a refused dir stops every rank
    samples = tr.out / "samples.jsonl"
    if resume_ckpt is not None:
        load(tr, resume_ckpt)
        dist_lib.barrier(tr.dist)
        if main:  # rows and checkpoints written after the resumed one belong to the crashed run's future
            ckpt_lib.discard_after(tr.out, tr.iteration)
            truncate_jsonl(samples, tr.iteration)
    elif main:
        samples.unlink(missing_ok=True)
    if tr.best is not None:  # best/ agrees with the loaded tracker (ppo/evaluation.py)
        from ppomax.ppo.best import reconcile_best

        reconcile_best(tr, resume_ckpt)
    if not main:
        return RankMetrics()
    return MetricsLogger(tr.out, cfg.report_to, resume_step=tr.iteration if resume_ckpt else None,
                         run_name=cfg.run_name, config=dataclasses.asdict(cfg))


def save_final(tr) -> None:
    """At the end of training: the policy as a plain HF model in output_dir, in --torch_dtype, with the
    tokenizer (LoRA merged, or the adapter with --save_merged false; ppomax/publish.py); then
    --push_to_hub. Every rank takes part in gathering a sharded policy; rank 0 writes (its failure is
    raised on every rank, as in :func:`save`)."""
    from ppomax import publish
    from ppomax.models import is_peft_model

    cfg = tr.cfg
    gathered = sharding.GatheredModel(tr.policy) if tr.sharding != "none" else None

    def write() -> None:
        dtype = publish.save_dtype(cfg.torch_dtype, cfg.model_name_or_path)
        if gathered is not None and is_peft_model(tr.policy):  # merging needs whole LoRA layers: save the adapter
            logger.warning("sharded LoRA run: the final model is the peft adapter; merge it with `ppomax export "
                           "--checkpoint %s --output_dir DIR`", tr.out)
            gathered.save_pretrained(tr.out)
            tr.tokenizer.save_pretrained(tr.out)
        else:
            publish.save_final(tr.policy, tr.out, tr.tokenizer, dtype, merged=cfg.save_merged,
                               state=gathered.state if gathered is not None else None)
        publish.push(cfg, tr.out, "ppo")

    dist_lib.run_on_main(write, tr.dist)
