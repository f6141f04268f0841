"""The supervised training loop shared by SFT and reward-model training.

Each stage supplies a ``loss_fn(model, batch) -> (loss, stats)`` and an ``evaluate(model)``;
this loop owns batching, gradient accumulation, the LR schedule, clipping, logging, atomic
checkpoints and exact resume (model, optimizer, scheduler, RNG, data position).

Reduction (STYLE.md rule 2, the PPO update's rule): a step's loss is the mean over the whole
global batch (every micro-batch of every rank), not a mean of micro-batch means, so it does not
depend on how the batch is split. ``units(micro_batch)`` counts a micro-batch's normalisation
units (``num_tokens``, ``num_pairs``, ...); the loop sums them over the global batch and puts
the totals into every micro-batch under the same keys. ``loss_fn`` divides its sums by them and
so returns this micro-batch's *share* of the batch loss; its stats are shares too, and the loop
adds them up (alone, a batch without totals is its own global batch).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ppomax import checkpoint as ckpt_lib
from ppomax import compat
from ppomax.errors import UserError
from ppomax.gradients import reduce_and_clip
from ppomax.training import (
    MetricsLogger,
    RankMetrics,
    autocast,
    load_scheduler_state,
    make_optimizer,
    make_scheduler,
    prepare_output_dir,
    progress,
    scheduler_state,
)

logger = logging.getLogger("ppomax")

LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]]
UnitsFn = Callable[[dict], dict[str, torch.Tensor]]


def token_units(batch: dict) -> dict[str, torch.Tensor]:
    """The default units: ``num_tokens``, the labelled next tokens of the micro-batch (the SFT
    response tokens that ``functional.next_token_nll`` scores)."""
    return {"num_tokens": (batch["labels"][:, 1:] != -100).sum()}


def batch_totals(units: list[dict[str, torch.Tensor]], d: Any) -> dict[str, torch.Tensor]:
    """Sum each unit over this rank's micro-batches and over all ranks (one all-reduce)."""
    from ppomax import distributed as dist_lib

    keys = sorted(units[0])
    local = torch.stack([sum(u[k] for u in units).float() for k in keys])
    return dict(zip(keys, dist_lib.all_reduce_sum(local, d).unbind()))


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches of one epoch (seeded per epoch, so resume can rebuild them)."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def run_supervised(
    cfg: Any,
    stage: str,
    model: Any,
    tokenizer: Any,
    train_examples: list,
    collate: Callable[[list], dict],
    loss_fn: LossFn,
    evaluate: Callable[[Any], dict[str, float]],
    save_model: Callable[[Any, Path], None],
    units: UnitsFn = token_units,
) -> list[dict]:
    """Train ``model`` on ``train_examples``; write checkpoints and the final model to output_dir.

    ``units``: the normalisers ``loss_fn`` divides by (module docstring); SFT's token count by default.
    """
    from ppomax import distributed as dist_lib
    from ppomax import sharding

    # Data parallel under accelerate launch / torchrun: every rank holds the model, takes its share
    # of each global batch (per_device × accumulation × world), gradients are summed across ranks
    # with losses divided by the global batch's units, so the step equals the one-process step.
    d = dist_lib.setup(cfg.device)
    device = d.device  # the model is moved here (models passed in Python too)
    out = Path(cfg.output_dir)
    resume_ckpt = ckpt_lib.resolve_resume(cfg.output_dir, cfg.resume_from) if cfg.resume_from else None
    dist_lib.run_on_main(lambda: prepare_output_dir(cfg, stage), d)  # a refused dir stops every rank
    mode = sharding.resolve_mode(cfg.sharding, d.world_size)
    if cfg.gradient_checkpointing:
        compat.enable_activation_checkpointing(model)  # the current transformers name, or the older one
    if mode == "none":
        model.to(device)
        dist_lib.broadcast_parameters(model, d)  # a fresh RM head is random on every rank
    else:  # FSDP2 (sharding.py): from the host, one block at a time; before the optimizer
        from ppomax.models import is_peft_model

        if is_peft_model(getattr(model, "backbone", model)):
            raise UserError("sharding with LoRA is not supported yet: use LoRA or --sharding, not both")
        dist_lib.check_identical(model, d, stage)
        sharding.shard(model, mode, trainable=True, device=device)

    micro = cfg.per_device_train_batch_size
    accum = cfg.gradient_accumulation_steps * d.world_size  # micro-batches per optimizer step, all ranks
    steps_per_epoch = max(1, math.ceil(len(train_examples) / (micro * accum)))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))
    optimizer = make_optimizer(model.parameters(), cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler_type, cfg.warmup_ratio, total)

    step, epoch, batch_pos = 0, 0, 0
    if resume_ckpt is not None:
        state = ckpt_lib.load_state(resume_ckpt)
        if state.get("stage") != stage:
            raise ckpt_lib.CheckpointError(f"{resume_ckpt} is a {state.get('stage')} checkpoint, not {stage}")
        from ppomax.models import load_weights_into

        load_weights_into(model, resume_ckpt / "model")
        ckpt_lib.load_optimizer(resume_ckpt, "model", optimizer, model)
        load_scheduler_state(scheduler, state["scheduler"])
        step, epoch, batch_pos = state["step"], state["epoch"], state["batch_pos"]
        ckpt_lib.restore_rng(resume_ckpt, state)
        logger.info("resumed %s from %s at step %d", stage, resume_ckpt, step)
        if d.is_main:
            ckpt_lib.discard_after(out, step)  # later checkpoints belong to the crashed run's future
    metrics = (MetricsLogger(out, cfg.report_to, resume_step=step if resume_ckpt else None, run_name=cfg.run_name,
                             config=dataclasses.asdict(cfg)) if d.is_main else RankMetrics())

    def save(at_step: int) -> None:
        saved_model, saved_opt = model, optimizer
        if mode != "none":  # gathered on every rank (collective); rank 0 writes the whole
            saved_model, saved_opt = sharding.GatheredModel(model), sharding.GatheredOptimizer(model, optimizer)
        st = {"stage": stage, "epoch": epoch, "batch_pos": batch_pos, "scheduler": scheduler_state(scheduler)}
        # rank 0 writes; a failed write (disk full) is raised on every rank, none waits for it
        dist_lib.run_on_main(lambda: ckpt_lib.save_checkpoint(out, at_step, {"model": saved_model}, {"model": saved_opt},
                                                            st, tokenizer=tokenizer,
                                                            save_total_limit=cfg.save_total_limit), d)

    bar = progress(total=total, desc=stage, disable=cfg.disable_tqdm or not d.is_main, initial=step)
    running: dict[str, list[float]] = {}
    try:
        groups_epoch, groups = -1, []
        while step < total:
            if groups_epoch != epoch:  # rebuild this epoch's shuffled order (same seed on resume)
                epoch_batches = batches(len(train_examples), micro, cfg.seed, epoch)
                groups = [epoch_batches[i : i + accum] for i in range(0, len(epoch_batches), accum)]
                # Multi-process: a final group too small to give every rank a micro-batch is dropped.
                groups = [g for g in groups if len(g) >= d.world_size] or groups[:1]
                groups_epoch = epoch
            model.train()
            # This rank's micro-batches of the global batch, each told the global batch's units
            # (module docstring): the counts are needed before the first backward.
            mine = [{k: v.to(device) for k, v in collate([train_examples[i] for i in idx]).items()}
                    for idx in groups[batch_pos][d.rank :: d.world_size]]
            totals = batch_totals([units(b) for b in mine], d)
            finite, step_stats = True, {}
            for batch in mine:
                batch.update(totals)
                with autocast(device, cfg.bf16, cfg.fp16):
                    loss, stats = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()  # this micro-batch's share of the global batch loss
                for k, v in stats.items():  # shares add up to this rank's part of the batch value
                    step_stats[k] = step_stats.get(k, 0.0) + v
            for k, v in step_stats.items():
                running.setdefault(k, []).append(v)
            if not dist_lib.all_true(finite, d):  # every rank stops together
                raise UserError(f"{stage}: non-finite loss at step {step + 1}; lower the learning rate "
                                f"(last checkpoint in {out} is intact)")
            gn = reduce_and_clip(model, d, mode != "none", cfg.max_grad_norm)
            if not math.isfinite(gn):  # stepping would write NaN into the weights (and the next checkpoint)
                raise UserError(f"{stage}: non-finite gradient norm at step {step + 1}; lower the learning rate "
                                f"(last checkpoint in {out} is intact)")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_pos += 1
            if batch_pos >= len(groups):
                epoch, batch_pos = epoch + 1, 0
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total:
                row = {"step": step, "epoch": epoch + batch_pos / len(groups), "grad_norm": gn,
                       "lr": scheduler.get_last_lr()[0]}
                # per-step values averaged over the logged steps; the ranks' parts of a step add up
                row.update(dist_lib.reduce_floats({f"train/{k}": sum(v) / len(v) for k, v in sorted(running.items())},
                                                  d, "sum"))
                running.clear()
                if step % cfg.eval_steps == 0 or step == total:
                    row.update({f"eval/{k}": v for k, v in evaluate(model).items()})
                metrics.log(row)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in row.items()
                                 if k.startswith(("train/loss", "eval/loss", "eval/acc", "train/acc"))})
            if step % cfg.save_steps == 0 or step == total:
                save(step)
    finally:
        bar.close()
        metrics.close()
    final_model = sharding.GatheredModel(model) if mode != "none" else model
    dist_lib.run_on_main(lambda: save_model(final_model, out), d)
    return metrics.rows
