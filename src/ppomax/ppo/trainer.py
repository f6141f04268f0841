"""PPOTrainer: the PPO-max loop, top to bottom.

One iteration (PPO_MAX.md "One PPO iteration"; DESIGN.md's data flow), each arrow a call into ppo/:
    make_experience    -> sample prompts (k per prompt), generate with the rollout engine (ppomax.engines:
                          hf or vllm), score, forward π_old / π_ref / V_old             (ppo/experience.py)
    compute_advantages -> score processing (Eq. 18), KL shaping, the advantage estimator: GAE, or
                          critic-free grpo / rloo / reinforce_pp                        (ppo/advantages.py)
    update             -> num_ppo_epochs × mini-batches of clipped policy (+ value) loss (+ ptx); a step
                          with a non-finite loss or gradient is skipped (ppo/update.py); then the engine
                          is synced to the new weights
    eval (--eval_steps) / log / samples / collapse guard / checkpoint
                          (ppo/evaluation.py, ppo/monitors.py, ppo/state.py)

Critic pre-training (Sec. 5.4) runs the same loop with the policy frozen for
``critic_pretrain_steps`` iterations first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ppomax import distributed as dist_lib
from ppomax import functional as F
from ppomax import sharding
from ppomax.config import ConfigError, PPOConfig
from ppomax.engines import Sampling, make_engine
from ppomax.errors import UserError
from ppomax.ppo import advantages, evaluation, experience, setup
from ppomax.ppo import state as run_state
from ppomax.ppo import update as update_lib
from ppomax.ppo.experience import Forwards
from ppomax.ppo.monitors import (
    CollapseGuard,
    experience_metrics,
    gold_metrics,
    judge_rollouts,
    reduce_row,
    write_sample_rows,
)
from ppomax.ppo.reward_fn import RewardFunction
from ppomax.ppo.rollout import Experience
from ppomax.ppo.setup import IndexSampler
from ppomax.training import autocast, progress, seed_run, set_seed

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
GoldFn = Callable[[list[str], list[str], list[bool]], Sequence[float]]


# metric -> short label in the progress bar (full names: docs/metrics.md)
_POSTFIX = {"reward/raw_mean": "reward", "gold/mean": "gold", "kl/ref": "kl", "policy/perplexity": "ppl",
            "response/length_mean": "len"}


class CollapseStop(UserError):
    """The collapse guard (mode 'stop') ended the run; the last checkpoint holds the state."""


class PPOTrainer:
    """PPO-max trainer.

    Args:
        config: a :class:`PPOConfig` (e.g. ``PPOConfig.from_preset("ppo_max", ...)``).
        policy / ref_policy / reward_model / critic: models, or None to load from the paths in ``config``. The
            policies are causal LMs; reward_model / critic a ScalarHeadModel or, as TRL took them, an
            AutoModelForSequenceClassification with num_labels=1 (ppomax/seqcls.py). Models passed in are
            moved in place (``Module.to``) to the trainer's device, ``self.device`` (``config.device``;
            'auto': cuda:LOCAL_RANK with CUDA, else CPU), wherever they were.
        tokenizer: shared by all four models; loaded from ``model_name_or_path`` if None.
        prompts: list of strings (or prompt rows); None reads ``config.dataset``.
        reward_fn: ``reward_fn(prompts, responses, **optional) -> list[float]`` instead of a reward model; keyword
            parameters it declares (prompt_ids, prompt_messages, row columns, ...): ppo/reward_fn.py.
        gold_fn: optional ``gold_fn(prompts, responses, truncated) -> list[float]``, logged as
            ``gold/mean`` (a task's judge; never used for training).
    """

    def __init__(
        self,
        config: PPOConfig,
        policy=None,
        ref_policy=None,
        reward_model=None,
        critic=None,
        tokenizer=None,
        prompts: Sequence[str] | Sequence[dict] | None = None,
        reward_fn: RewardFn | None = None,
        gold_fn: GoldFn | None = None,
        ptx_rows: Sequence[dict] | None = None,
        eval_prompts: Sequence[str] | Sequence[dict] | None = None,
    ) -> None:
        from ppomax import models as M

        self.cfg = cfg = config
        self.reward_fn, self.gold_fn = (RewardFunction(reward_fn) if reward_fn else None), gold_fn  # ppo/reward_fn.py
        if cfg.output_dir is None:
            raise ConfigError("PPOConfig.output_dir is required (flag --output_dir)")
        if reward_model is None and reward_fn is None and cfg.reward_model_path is None:
            raise ConfigError("PPO needs a reward: --reward_model_path, or reward_fn= in Python")
        if policy is None and cfg.model_name_or_path is None:
            raise ConfigError("PPOConfig.model_name_or_path is required (flag --model_name_or_path)")
        self.dist = dist_lib.setup(cfg.device)  # rank, world size (1 unless launched by accelerate / torchrun), device
        W = self.dist.world_size
        if cfg.rollout_batch_size % W or cfg.mini_batch_size % W:
            raise ConfigError(f"with {W} processes, rollout_batch_size = {cfg.rollout_batch_size} and the mini-batch "
                              f"size {cfg.mini_batch_size} must be divisible by {W} (they are global sizes)")
        self.sharding = sharding.resolve_mode(cfg.sharding, W)
        self.device = self.dist.device  # the one device of this process: models, rollouts, collectives
        seed_run(cfg.seed, cfg.full_determinism)  # the same on every rank: fresh heads and LoRA matrices start identical
        setup.preflight(cfg, critic, self.dist.is_main)  # where the critic starts, the Hub repo: before any model

        # ---- data first: bad rows fail before any model is loaded -----------------------------
        if tokenizer is None:
            tokenizer = M.load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = tokenizer
        self.prompt_ids, self.prompt_rows = setup.load_prompts(cfg, tokenizer, prompts, self.reward_fn)
        self.eval_prompt_ids, self.eval_prompt_rows = setup.load_eval_prompts(cfg, tokenizer, eval_prompts, gold_fn is not None)
        self.best = (evaluation.BestTracker(cfg.metric_for_best_model, evaluation.greater_is_better(
            cfg.metric_for_best_model, cfg.greater_is_better)) if cfg.metric_for_best_model else None)
        self.ptx_examples = setup.load_ptx_examples(cfg, tokenizer, ptx_rows)
        self.pad_id = tokenizer.pad_token_id

        # ---- models: loaded (LoRA applied), placed on the device or sharded --------------------
        # Sharded runs: ranks > 0 build the sharded models without weights and get them from rank 0,
        # so a node holds one full host copy of each model, not one per process.
        later_rank = self.dist.rank > 0 and self.sharding != "none"
        self.policy, self.ref_policy, self.reward_model, self.critic = setup.load_models(
            cfg, policy, ref_policy, reward_model, critic, with_reward_model=reward_fn is None,
            skeleton_trained=later_rank, skeleton_frozen=later_rank and sharding.shards(self.sharding, False),
            share=cfg.share_frozen_weights and self.sharding == "none")  # FSDP2 owns a sharded model's storage
        # A response ends at any EOS id: chat models list end-of-turn and end-of-text in generation_config.
        self.eos_ids = M.eos_token_ids(tokenizer, self.policy)
        self.sampling = Sampling(cfg.response_length, tuple(self.eos_ids), self.pad_id, cfg.temperature, cfg.top_k,
                                 cfg.top_p, cfg.stop_at_eos)
        setup.place_models(cfg, self.policy, self.critic, self.ref_policy, self.reward_model, self.dist,
                           self.sharding, self.device)
        self.engine = make_engine(cfg, self.policy, tokenizer)  # samples the rollouts (ppomax.engines)

        # ---- optimisation state --------------------------------------------------------------
        self.policy_opt, self.policy_sched, self.critic_opt, self.critic_sched = setup.optimizers(
            cfg, self.policy, self.critic)  # the critic's are None with a critic-free estimator
        self.score_moments = F.RunningMoments()
        self.kl_ctl = F.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else None
        self.kl_coef = cfg.kl_coef
        # The models as functions of a batch (torch.compile'd on first call with --torch_compile, issue #5):
        # the rollout's forwards, and the same log π / V functions for the update's training forward.
        self.forwards = Forwards(cfg, self.policy, self.ref_policy, self.critic, self.reward_model, self.reward_fn,
                                 tokenizer, self.device)
        self._logprobs, self._values = self.forwards.logprobs_fn, self.forwards.values_fn
        self.sampler = IndexSampler(len(self.prompt_ids), cfg.seed)
        self.ptx_sampler = IndexSampler(len(self.ptx_examples), cfg.seed + 1) if self.ptx_examples else None
        self.guard = CollapseGuard(cfg.collapse_kl, cfg.collapse_ppl_ratio, cfg.collapse_truncated, cfg.collapse_reward_tail)
        self.iteration = 0  # global counter: critic pre-training iterations, then PPO iterations
        self.consecutive_skips = 0
        self._nonfinite: list[str] = []  # non-finite losses seen since the last optimizer step
        self._last_exp: Experience | None = None  # the latest rollout and its judge scores: samples.jsonl
        self._last_gold: list[float] | None = None
        self.last_healthy: str | None = None
        self.out = Path(cfg.output_dir)
        if self.dist.enabled:  # distinct sampling per rank
            if self.ptx_examples:
                self.ptx_sampler = IndexSampler(len(self.ptx_examples), cfg.seed + 1 + self.dist.rank)
            set_seed(cfg.seed + self.dist.rank)

    # =========================================================================================
    # The loop
    # =========================================================================================

    @property
    def total_iterations(self) -> int:
        return self.cfg.critic_pretrain_steps + self.cfg.max_steps

    def train(self) -> list[dict[str, Any]]:
        """Run critic pre-training then PPO; return the logged metric rows."""
        cfg = self.cfg
        main = self.dist.is_main  # only rank 0 writes files (config, metrics, samples, checkpoints)
        self.metrics = run_state.open_run(self)  # the output dir, and the resumed state with --resume_from
        samples_path = self.out / "samples.jsonl"
        bar = progress(total=self.total_iterations, desc=f"ppo {self.out.name}", disable=cfg.disable_tqdm or not main,
                       initial=self.iteration)
        try:
            while self.iteration < self.total_iterations:
                if (cfg.collapse_guard == "rollback" and self.last_healthy is None
                        and self.iteration == cfg.critic_pretrain_steps):
                    self._save(healthy=True)  # the policy has not moved yet: what a rollback returns to
                self.iteration += 1
                pretrain = self.iteration <= cfg.critic_pretrain_steps
                row = self.step(train_policy=not pretrain)
                row.update(step=self.iteration, phase="critic_pretrain" if pretrain else "ppo",
                           ppo_step=max(0, self.iteration - cfg.critic_pretrain_steps))
                improved = not pretrain and evaluation.evaluate_step(self, row)  # --eval_steps: eval/* into the row
                # before logging: the row carries `collapse`; 'rollback' restores the last healthy checkpoint
                action = None if pretrain else self.guard.act(row, cfg.collapse_guard, self.iteration)
                if action == "rollback" and not run_state.rollback(self):
                    action = None  # no healthy checkpoint yet: the guard acts as 'warn'
                if self.iteration % cfg.logging_steps == 0 or self.iteration == self.total_iterations:
                    self.metrics.log(row)
                    if main and self._last_exp is not None:  # the first num_sample_generations rollouts
                        write_sample_rows(samples_path, row, self._last_exp, cfg.num_sample_generations,
                                          self.forwards.decode, self._last_gold)
                bar.update(1)
                bar.set_postfix({short: f"{row[k]:.3g}" for k, short in _POSTFIX.items() if k in row})
                if action == "stop":
                    saved = self.save()
                    raise CollapseStop(f"collapse guard stopped the run at iteration {self.iteration}: "
                                       f"{'; '.join(row['collapse'])} "
                                       + (f"(state saved in {saved})" if saved else "(not saved: non-finite weights)"))
                # the tracker takes the value (not for rolled-back weights) before the periodic save records it
                improved = improved and evaluation.commit_best(self, row, action)
                if self.iteration % cfg.save_steps == 0 or self.iteration == self.total_iterations:
                    self._save(healthy=not row.get("collapse"))
                if improved:  # after the periodic save: best/ and checkpoint-N never replace each other
                    evaluation.save_best(self)
            if cfg.load_best_model_at_end:
                evaluation.load_best(self)
            run_state.save_final(self)  # the policy as a plain HF model in output_dir (+ --push_to_hub)
        finally:
            bar.close()
            self.metrics.close()
        return self.metrics.rows

    def step(self, train_policy: bool = True) -> dict[str, float]:
        """One iteration: experience → advantages → update. Returns the metric row."""
        t0 = time.perf_counter()
        bad = self._nonfinite_weights()
        if bad:  # sampling from NaN logits would crash; nothing to learn from this state either
            self._last_exp = None
            return self._skip(f"non-finite weights in {' and '.join(bad)}")
        exp, timings = self.make_experience()
        self._last_exp = exp
        row = dict(timings)
        finite = dist_lib.all_true(bool(torch.isfinite(exp.scores).all()), self.dist)
        if not finite:
            row.update(self._skip("non-finite reward scores"))
            row.update(experience_metrics(exp, self.critic is not None, self.dist))
            return row
        moments = self.score_moments.state_dict()  # a skipped iteration leaves them as they were
        self.compute_advantages(exp)
        if not dist_lib.all_true(bool(torch.isfinite(exp.advantages).all() & torch.isfinite(exp.returns).all()), self.dist):
            self.score_moments.load_state_dict(moments)
            row.update(self._skip("non-finite advantages or returns"))
            row.update(experience_metrics(exp, self.critic is not None, self.dist))
            return row
        row.update(experience_metrics(exp, self.critic is not None, self.dist))
        row["kl/coef"] = self.kl_coef
        if self.gold_fn is not None:  # a task's judge: logged, never trained on
            texts = self.forwards.decode(exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.mask)
            self._last_gold, every = judge_rollouts(self.gold_fn, *texts, exp.truncated.tolist(), self.dist)
            row.update(gold_metrics(every))  # the whole batch's, on every rank
        t1 = time.perf_counter()
        stats = self.update(exp, train_policy=train_policy)
        row["time/train"] = time.perf_counter() - t1
        row.update(stats)
        row = reduce_row(row, self.dist)  # over ranks (the update's token means are global already)
        if self._applied_steps == 0:  # every optimizer step was skipped: no optimisation state may move,
            self.score_moments.load_state_dict(moments)  # and the iteration counts as skipped
            row.update(self._skip(row.get("skip_cause", "no optimizer step applied")))
        else:
            self.consecutive_skips = 0  # an iteration that applied an update ends a run of skipped ones
        if self._applied_steps and train_policy:
            self.engine.sync(self.policy)  # the next rollout samples from the updated policy
            if self.kl_ctl is not None:
                self.kl_ctl.update(row["kl/ref"], exp.scores.numel() * self.dist.world_size)
                self.kl_coef = self.kl_ctl.value
        row["time/iteration"] = time.perf_counter() - t0
        n_tokens = exp.mask.sum().item() + exp.prompt_mask.sum().item()
        row["tokens_per_s"] = n_tokens / max(row["time/iteration"], 1e-9)
        return row

    # =========================================================================================
    # Experience (ppo/experience.py)
    # =========================================================================================

    def make_experience(self) -> tuple[Experience, dict[str, float]]:
        """Roll out this rank's share of a rollout batch, k samples per prompt; (Experience, time/*)."""
        cfg, d = self.cfg, self.dist
        idx = self.sampler.take(cfg.rollout_batch_size)  # the same global sample on every rank
        n = len(idx) // d.world_size
        idx = idx[d.rank * n : (d.rank + 1) * n]  # this rank's slice: whole prompt groups
        idx = [i for i in idx for _ in range(cfg.num_samples_per_prompt)]  # k samples per prompt, contiguous
        prompts, rows = [self.prompt_ids[i] for i in idx], [self.prompt_rows[i] for i in idx]
        return experience.make_experience(cfg, self.engine, self.sampling, self.forwards, prompts, rows, self.pad_id)

    def compute_advantages(self, exp: Experience) -> None:
        """Score processing (Eq. 18), KL shaping (Sec. 5.3.1) and the advantage estimator, in place."""
        cfg = self.cfg
        # Running moments over every raw score seen so far (Eq. 18: μ, σ of the history), every rank's.
        self.score_moments.update(dist_lib.all_gather(exp.scores, self.dist))
        # r̃: normalised, clipped, then the missing-EOS penalty (in r̃'s units, after the clip)
        exp.processed_scores = advantages.process_scores(cfg, exp.scores, exp.truncated, self.score_moments)
        exp.kl = F.kl_penalty(exp.logprobs, exp.ref_logprobs, cfg.kl_estimator) * exp.mask
        exp.rewards, exp.advantages, exp.returns = advantages.estimate(
            cfg, exp.processed_scores, exp.kl, exp.mask, exp.values, self.kl_coef, self.dist)

    # =========================================================================================
    # Update (the pieces around the loss: ppo/update.py)
    # =========================================================================================

    def update(self, exp: Experience, train_policy: bool = True) -> dict[str, float]:
        """num_ppo_epochs passes of mini-batches, one optimizer step each; micro-batches accumulate gradients."""
        cfg = self.cfg
        B = exp.scores.numel()
        mini = min(cfg.mini_batch_size // self.dist.world_size, B)  # this rank's part of a mini-batch
        micro = min(cfg.per_device_train_batch_size, mini)
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        stats = update_lib.UpdateStats()
        self._applied_steps = 0  # optimizer steps not skipped (counted in _optimizer_step)
        for _ in range(cfg.num_ppo_epochs):
            perm = torch.randperm(B, device=self.device)
            for s in range(0, B, mini):
                mb = exp.index(perm[s : s + mini])
                adv = update_lib.minibatch_advantages(cfg, mb, self.dist)  # whitened per mini-batch, clipped
                n_tok, norm = update_lib.loss_divisor(cfg, mb, self.dist)  # token losses / norm: the global mean
                mb_stats: dict[str, float] = {}
                for m0 in range(0, mb.scores.numel(), micro):
                    sl = slice(m0, m0 + micro)
                    sub = mb.index(torch.arange(mb.scores.numel(), device=self.device)[sl])
                    st = self._micro_step(sub, adv[sl], norm, train_policy)
                    # micro-batch token means, weighted by token share -> the mini-batch token mean
                    # (logged values do not depend on per_device_train_batch_size)
                    w = (sub.mask.sum() / n_tok).item()
                    for k, v in st.items():
                        mb_stats[k] = mb_stats.get(k, 0.0) + w * v
                stats.add(dist_lib.reduce_floats(mb_stats, self.dist, "sum"))
                if train_policy and self.ptx_examples is not None:  # PPO-ptx (Eq. 17)
                    ptx = update_lib.ptx_loss(cfg, self.policy, self.ptx_examples, self.ptx_sampler, self.pad_id,
                                              self.device)
                    self._backward(cfg.ptx_coef * ptx / self.dist.world_size, "ptx loss")  # summed over ranks: the mean
                    stats.add({"ptx/loss": ptx.item()})
                stats.add(self._optimizer_step(train_policy))
        if self._applied_steps:  # the LR schedules count iterations whose update was applied
            if self.critic is not None:
                self.critic_sched.step()
            if train_policy:
                self.policy_sched.step()
        out = stats.means()  # `skipped`: the share of skipped steps
        out["lr/policy"] = self.policy_sched.get_last_lr()[0] if train_policy else 0.0
        if self.critic is not None:
            out["lr/critic"] = self.critic_sched.get_last_lr()[0]
        return out

    def _micro_step(self, mb: Experience, adv: torch.Tensor, norm: torch.Tensor, train_policy: bool) -> dict[str, float]:
        """Backward of one micro-batch; token losses are divided by ``norm`` (the mini-batch's token count,
        or its constant for token_sum), so the micro-batches add up to the mini-batch loss."""
        cfg = self.cfg
        share = (mb.mask.sum() / norm).item()  # a loss / share is this micro-batch's token mean (logged)
        parts = (mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.mask)
        stats = {}
        if train_policy:
            with autocast(self.device, cfg.bf16, cfg.fp16):
                logp, entropy = self._logprobs(self.policy, parts, cfg.temperature, with_entropy=True,
                                                  entropy_grad=cfg.entropy_coef > 0)
            # Sec. 5.3.2 "importance sampling fixed to the reference": ρ = π_θ / π_ref.
            old = mb.ref_logprobs if cfg.importance_sampling_ref else mb.logprobs
            pg_loss, pst = F.policy_loss(logp, old, adv, mb.mask, cfg.cliprange, num_tokens=norm)
            ent = F.masked_mean(entropy, mb.mask, num_tokens=norm)
            loss = pg_loss - cfg.entropy_coef * ent if cfg.entropy_coef > 0 else pg_loss
            if not cfg.kl_in_reward:  # GRPO's KL term: η · k3 estimate of KL(π_θ‖π_ref) in the loss
                kl_loss = F.masked_mean(F.kl_penalty(logp, mb.ref_logprobs, "k3", mb.mask), mb.mask, num_tokens=norm)
                loss = loss + self.kl_coef * kl_loss
                stats["policy/kl_loss"] = kl_loss.item() / max(share, 1e-9)
            self._backward(loss, "policy loss")
            stats.update({"policy/loss": pg_loss.item() / max(share, 1e-9), "policy/clipfrac": pst.clipfrac.item(),
                          "policy/approx_kl": pst.approx_kl.item(), "policy/entropy": ent.item() / max(share, 1e-9)})
        if self.critic is None:  # a critic-free estimator
            return stats
        with autocast(self.device, cfg.bf16, cfg.fp16):
            values = self._values(self.critic, *parts).float()
        v_loss, vst = F.value_loss(values, mb.values, mb.returns, mb.mask, cfg.cliprange_value, num_tokens=norm)
        self._backward(cfg.vf_coef * v_loss, "value loss")
        stats.update({"critic/value_loss": v_loss.item() / max(share, 1e-9), "critic/clipfrac": vst.clipfrac.item()})
        return stats

    def _backward(self, loss: torch.Tensor, name: str) -> None:
        """Backward a finite loss; a NaN/inf one is recorded and skips the coming optimizer step."""
        if bool(torch.isfinite(loss)):
            loss.backward()
        else:
            self._nonfinite.append(f"non-finite {name}")

    def _optimizer_step(self, train_policy: bool) -> dict[str, float]:
        """Clip, check for non-finite losses and gradients, step (ppo/update.py). A non-finite update is skipped."""
        trained = [("policy", self.policy, self.policy_opt)] if train_policy else []
        if self.critic is not None:
            trained.append(("critic", self.critic, self.critic_opt))
        stats = update_lib.optimizer_step(trained, self.dist, self.sharding != "none", self.cfg.max_grad_norm,
                                          self._nonfinite, self.iteration)
        self._nonfinite = []
        if not stats["skipped"]:  # the iteration counts as skipped when all its steps are (step)
            self._applied_steps += 1
        if not train_policy:
            self.policy_opt.zero_grad(set_to_none=True)
        return stats

    def _skip(self, cause: str) -> dict[str, float]:
        """A skipped iteration: counted; max_consecutive_skips in a row stop the run (ppo/state.py)."""
        return run_state.count_skipped_iteration(self, cause)

    # =========================================================================================
    # Checkpoints
    # =========================================================================================

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, optimizer and RNG states that resume needs (ppo/state.py)."""
        return run_state.state_dict(self)

    def save(self) -> Path | None:
        """Write checkpoint-<iteration>; refused (None, warning) when a model holds NaN/inf weights,
        so the newest checkpoint on disk is always a finite one."""
        return run_state.save(self)

    def _save(self, healthy: bool) -> None:
        """Save; a healthy checkpoint (no collapse signal) becomes the rollback target, recorded
        in its own state so that a resumed run knows it too."""
        prev = self.last_healthy
        if healthy:
            self.last_healthy = str(self.out / f"checkpoint-{self.iteration}")
        if self.save() is None:
            self.last_healthy = prev

    def _nonfinite_weights(self) -> list[str]:
        """The trained models ('policy', 'critic') holding a NaN or inf parameter."""
        return run_state.nonfinite_weights(self)

    def load_checkpoint(self, path: Path, restore_rng: bool = True) -> None:
        """Restore the run from checkpoint ``path`` (resume; rollback keeps the RNG streams going)."""
        run_state.load(self, path, restore_rng)
