"""PPOTrainer: the PPO-max loop, top to bottom.

One iteration (PPO_MAX.md "One PPO iteration"):
    make_experience  -> sample prompts (k per prompt), generate with the rollout engine
                        (ppomax.engines: hf or vllm), score, forward π_old / π_ref / V_old
    compute_advantages -> score processing (Eq. 18), KL shaping, the advantage estimator
                        (ppo/advantages.py: GAE, or critic-free grpo / rloo / reinforce_pp)
    update           -> num_ppo_epochs × mini-batches of clipped policy (+ value) loss (+ ptx),
                        then the engine is synced to the new weights
    eval (--eval_steps) / log / checkpoint (ppo/state.py) / collapse guard

Critic pre-training (Sec. 5.4) runs the same loop with the policy frozen for
``critic_pretrain_steps`` iterations first.
"""

from __future__ import annotations

import logging
import math
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
from ppomax.gradients import reduce_and_clip
from ppomax.ppo import advantages, evaluation, setup
from ppomax.ppo import state as run_state
from ppomax.ppo.monitors import CollapseGuard, experience_metrics, gold_metrics, reduce_row, write_samples
from ppomax.ppo.reward_fn import RewardFunction
from ppomax.ppo.rollout import (
    Experience,
    cat_padded,
    maybe_compile,
    response_logprobs,
    response_values,
    reward_model_scores,
)
from ppomax.ppo.setup import IndexSampler
from ppomax.training import autocast, progress, seed_run, set_seed

logger = logging.getLogger("ppomax")

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
        # torch.compile (issue #5): the rollout and training forwards, compiled on first call if cfg.torch_compile
        self._logprobs, self._values, self._rm_scores = (maybe_compile(f, cfg.torch_compile) for f in
                                                         (response_logprobs, response_values, reward_model_scores))
        self.sampler = IndexSampler(len(self.prompt_ids), cfg.seed)
        self.ptx_sampler = IndexSampler(len(self.ptx_examples), cfg.seed + 1) if self.ptx_examples else None
        self.guard = CollapseGuard(cfg.collapse_kl, cfg.collapse_ppl_ratio, cfg.collapse_truncated, cfg.collapse_reward_tail)
        self.iteration = 0  # global counter: critic pre-training iterations, then PPO iterations
        self.consecutive_skips = 0
        self._nonfinite: list[str] = []  # non-finite losses seen since the last optimizer step
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
                action = self._collapse_check(row, pretrain)  # before logging: the row carries `collapse`
                if self.iteration % cfg.logging_steps == 0 or self.iteration == self.total_iterations:
                    self.metrics.log(row)
                    if main:
                        self._write_samples(samples_path, row)
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
            row.update(experience_metrics(exp, self.critic is not None))
            return row
        moments = self.score_moments.state_dict()  # a skipped iteration leaves them as they were
        self.compute_advantages(exp)
        if not dist_lib.all_true(bool(torch.isfinite(exp.advantages).all() & torch.isfinite(exp.returns).all()), self.dist):
            self.score_moments.load_state_dict(moments)
            row.update(self._skip("non-finite advantages or returns"))
            row.update(experience_metrics(exp, self.critic is not None))
            return row
        row.update(experience_metrics(exp, self.critic is not None))
        row["kl/coef"] = self.kl_coef
        if self.gold_fn is not None:
            row.update(self._gold_metrics(exp))
        t1 = time.perf_counter()
        stats = self.update(exp, train_policy=train_policy)
        row["time/train"] = time.perf_counter() - t1
        row.update(stats)
        row = self._reduce_row(row)
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
    # Experience
    # =========================================================================================

    @torch.no_grad()
    def make_experience(self) -> tuple[Experience, dict[str, float]]:
        from ppomax.data import collate_prompts

        cfg = self.cfg
        idx = self.sampler.take(cfg.rollout_batch_size)  # the same global sample on every rank
        n = len(idx) // self.dist.world_size
        idx = idx[self.dist.rank * n : (self.dist.rank + 1) * n]  # this rank's slice: whole prompt groups
        idx = [i for i in idx for _ in range(cfg.num_samples_per_prompt)]  # k samples per prompt, contiguous
        batch = collate_prompts([self.prompt_ids[i] for i in idx], self.pad_id)
        prompt_ids, prompt_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        timings = {"time/generate": 0.0, "time/score": 0.0, "time/forward": 0.0}
        chunks = []
        self.policy.eval()
        # log π_old from the sampling logits saves a policy forward; in fp32 they match it to ~1e-6,
        # under autocast to ~1e-2, so 'auto' recomputes there (then the first ratio is exactly 1).
        # vLLM's kernels differ numerically from the trainer's: 'auto' means forward there (issue #12)
        vllm, gaps = self.engine.name == "vllm", []
        gen_logp = cfg.rollout_logprobs == "generate" or (cfg.vllm_logprobs_as_old if vllm else (
            cfg.rollout_logprobs == "auto" and not (cfg.bf16 or cfg.fp16)))
        for s in range(0, len(idx), cfg.generation_batch_size):
            p_ids, p_mask = prompt_ids[s : s + cfg.generation_batch_size], prompt_mask[s : s + cfg.generation_batch_size]
            t = time.perf_counter()
            gen = self.engine.generate(p_ids, p_mask, self.sampling, return_logprobs=gen_logp or vllm)
            resp, mask, truncated = gen.response_ids, gen.mask, gen.truncated
            timings["time/generate"] += time.perf_counter() - t
            t = time.perf_counter()
            rows = [self.prompt_rows[i] for i in idx[s : s + len(p_ids)]]  # what a reward_fn may be passed
            scores = self._score(p_ids, p_mask, resp, mask, rows, truncated)
            timings["time/score"] += time.perf_counter() - t
            t = time.perf_counter()
            parts = (p_ids, p_mask, resp, mask)
            with autocast(self.device, cfg.bf16, cfg.fp16):
                if gen_logp:
                    logp = gen.logprobs
                else:
                    logp = self._in_chunks(lambda *x: self._logprobs(self.policy, x, cfg.temperature), parts)
                ref_logp = self._in_chunks(lambda *x: self._ref_logprobs(x), parts)
                values = (self._in_chunks(lambda *x: self._values(self.critic.eval(), *x), parts)
                          if self.critic is not None else torch.zeros_like(mask))  # critic-free: no baseline
            timings["time/forward"] += time.perf_counter() - t
            if vllm and not gen_logp:  # |vLLM − trainer| log π_old on response tokens (docs/metrics.md)
                gaps.append((gen.logprobs - logp.float()).abs()[mask.bool()])
            chunks.append((p_ids, p_mask, resp, mask, truncated, logp * mask, ref_logp * mask, values.float() * mask, scores))
        exp = Experience(*cat_padded(chunks, self.pad_id))
        if gaps and (g := torch.cat(gaps)).numel():
            timings.update({"rollout/logprob_gap_mean": g.mean().item(), "rollout/logprob_gap_max": g.max().item()})
        return exp, timings

    def _in_chunks(self, fn, parts) -> torch.Tensor:
        """``fn(*parts)`` over row chunks of per_device_train_batch_size, concatenated: a rollout
        forward over a few thousand tokens keeps its activations in cache (~25 % faster on CPU
        than one forward over the whole generation batch), and memory stays that of a micro-batch."""
        n, B = self.cfg.per_device_train_batch_size, parts[0].shape[0]
        if B <= n:
            return fn(*parts)
        return torch.cat([fn(*(x[s : s + n] for x in parts)) for s in range(0, B, n)], dim=0)

    def _ref_logprobs(self, parts) -> torch.Tensor:
        """log π_ref (B, T): the reference model, or with LoRA the policy with its adapters disabled."""
        if self.ref_policy is not None:
            return self._logprobs(self.ref_policy, parts, self.cfg.temperature)
        with self.policy.disable_adapter():
            return self._logprobs(self.policy, parts, self.cfg.temperature)

    def _score(self, p_ids, p_mask, resp, mask, rows=None, truncated=None) -> torch.Tensor:
        """r(x, y) (B,): the reward model at the last response token, or the reward_fn (ppo/reward_fn.py)."""
        if self.reward_fn is None:
            with autocast(self.device, self.cfg.bf16, self.cfg.fp16):
                return self._in_chunks(lambda *x: self._rm_scores(self.reward_model, *x),
                                       (p_ids, p_mask, resp, mask)).float()
        return self.reward_fn(self.tokenizer, p_ids, p_mask, resp, mask, rows, truncated)

    def _decode(self, p_ids, p_mask, resp, mask) -> tuple[list[str], list[str]]:
        tok = self.tokenizer
        prompts = [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(p_ids, p_mask)]
        responses = [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(resp, mask)]
        return prompts, responses

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
    # Update
    # =========================================================================================

    def update(self, exp: Experience, train_policy: bool = True) -> dict[str, float]:
        """num_ppo_epochs passes of mini-batches; micro-batches accumulate gradients."""
        cfg = self.cfg
        B = exp.scores.numel()
        mini = min(cfg.mini_batch_size // self.dist.world_size, B)  # this rank's part of a mini-batch
        micro = min(cfg.per_device_train_batch_size, mini)
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        acc: dict[str, list[float]] = {}
        self._applied_steps = 0  # optimizer steps not skipped (counted in _optimizer_step)
        for _ in range(cfg.num_ppo_epochs):
            perm = torch.randperm(B, device=self.device)
            for s in range(0, B, mini):
                mb = exp.index(perm[s : s + mini])
                adv = mb.advantages
                if cfg.whiten_advantages and cfg.uses_critic:  # per mini-batch (Sec. 5.3.1, detail 6);
                    # the critic-free estimators are normalised already, per group or over the batch
                    adv = dist_lib.whiten(adv, mb.mask, self.dist)  # moments over the whole mini-batch
                if cfg.advantage_clip is not None:
                    adv = adv.clamp(-cfg.advantage_clip, cfg.advantage_clip)
                # Token losses are divided by the mini-batch's token count over all ranks and the
                # gradients summed (dist_lib.sum_gradients): exactly the one-process mini-batch mean.
                n_tok = dist_lib.all_reduce_sum(mb.mask.sum(), self.dist)
                # token_sum (Dr. GRPO): a constant divisor, responses × response_length, not the token count
                norm = (n_tok if cfg.loss_reduction == "token_mean" else
                        dist_lib.all_reduce_sum(torch.tensor(float(mb.scores.numel()), device=self.device), self.dist)
                        * cfg.response_length)
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
                for k, v in dist_lib.reduce_floats(mb_stats, self.dist, "sum").items():
                    acc.setdefault(k, []).append(v)
                if train_policy and self.ptx_examples is not None:
                    for k, v in self._ptx_step().items():
                        acc.setdefault(k, []).append(v)
                for k, v in self._optimizer_step(train_policy).items():
                    acc.setdefault(k, []).append(v)
        if self._applied_steps:  # the LR schedules count iterations whose update was applied
            if self.critic is not None:
                self.critic_sched.step()
            if train_policy:
                self.policy_sched.step()
        causes = acc.pop("skip_cause", [])
        out = {k: float(sum(v) / len(v)) for k, v in acc.items()}  # `skipped`: the share of skipped steps
        if causes:
            out["skip_cause"] = "; ".join(dict.fromkeys(causes))
        elif "skipped" in out:
            del out["skipped"]
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

    def _ptx_step(self) -> dict[str, float]:
        """PPO-ptx (Eq. 17): λ_ptx · LM loss on a micro-batch of SFT / pre-training rows."""
        from ppomax.data import collate_sft

        cfg = self.cfg
        idx = self.ptx_sampler.take(min(cfg.per_device_train_batch_size, len(self.ptx_examples)))
        batch = collate_sft([self.ptx_examples[i] for i in idx], self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with autocast(self.device, cfg.bf16, cfg.fp16):
            out = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        loss = F.masked_mean(*F.next_token_nll(out.logits, batch["labels"]))
        self._backward(cfg.ptx_coef * loss / self.dist.world_size, "ptx loss")  # summed over ranks: the mean
        return {"ptx/loss": loss.item()}

    def _reduce_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Numeric metrics averaged over ranks (the update's token means are already global; monitors.py)."""
        return reduce_row(row, self.dist)

    def _backward(self, loss: torch.Tensor, name: str) -> None:
        """Backward a finite loss; a NaN/inf one is recorded and skips the coming optimizer step."""
        if bool(torch.isfinite(loss)):
            loss.backward()
        else:
            self._nonfinite.append(f"non-finite {name}")

    def _optimizer_step(self, train_policy: bool) -> dict[str, float]:
        """Clip, check for non-finite gradients, step. A non-finite update is skipped, not applied."""
        cfg = self.cfg
        stats = {}
        models = [("critic", self.critic, self.critic_opt)] if self.critic is not None else []
        if train_policy:
            models.insert(0, ("policy", self.policy, self.policy_opt))
        norms = {}
        for name, model, _ in models:
            norms[name] = reduce_and_clip(model, self.dist, self.sharding != "none", cfg.max_grad_norm)
            stats[f"grad_norm/{name}"] = norms[name]
        bad = [n for n, v in norms.items() if not math.isfinite(v)]
        causes = list(dict.fromkeys(self._nonfinite))
        self._nonfinite = []
        if bad:
            causes.append(f"non-finite gradient norm ({', '.join(bad)})")
        if not dist_lib.all_true(not causes, self.dist) and not causes:  # skip decisions agree on every rank
            causes.append("non-finite loss on another rank")
        if causes:  # this step only; the iteration counts as skipped when all its steps are (step())
            logger.warning("iteration %d: mini-batch update skipped: %s", self.iteration, "; ".join(causes))
        else:
            self._applied_steps += 1
            for _, _, opt in models:
                opt.step()
        stats.update(skipped=float(bool(causes)), **({"skip_cause": "; ".join(causes)} if causes else {}))
        for _, _, opt in models:
            opt.zero_grad(set_to_none=True)
        if not train_policy:
            self.policy_opt.zero_grad(set_to_none=True)
        return stats

    def _skip(self, cause: str) -> dict[str, float]:
        """A skipped iteration: counted; max_consecutive_skips in a row stop the run (ppo/state.py)."""
        return run_state.count_skipped_iteration(self, cause)

    # =========================================================================================
    # Monitoring, gold metrics, samples
    # =========================================================================================

    def _gold_metrics(self, exp: Experience) -> dict[str, float]:
        prompts, responses = self._decode(exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.mask)
        self._last_gold = [float(x) for x in self.gold_fn(prompts, responses, exp.truncated.tolist())]
        return gold_metrics(self._last_gold)

    def _write_samples(self, path: Path, row: dict) -> None:
        exp = getattr(self, "_last_exp", None)
        n = min(self.cfg.num_sample_generations, exp.scores.numel() if exp is not None else 0)
        if n:
            texts = self._decode(exp.prompt_ids[:n], exp.prompt_mask[:n], exp.response_ids[:n], exp.mask[:n])
            write_samples(path, row, *texts, exp.scores[:n].tolist(), getattr(self, "_last_gold", None))

    def _collapse_check(self, row: dict, pretrain: bool) -> str | None:
        if self.cfg.collapse_guard == "off" or pretrain:
            return None
        reasons = self.guard.check(row)
        if not reasons:
            return None
        row["collapse"] = reasons
        mode = self.cfg.collapse_guard
        # Every signal is in metrics.jsonl; the console gets the first and then one every 25 iterations.
        if mode != "warn" or self.iteration - getattr(self, "_last_collapse_warn", -10**9) >= 25:
            self._last_collapse_warn = self.iteration
            logger.warning("iteration %d: collapse signal: %s", self.iteration, "; ".join(reasons))
        if mode == "rollback":
            return "rollback" if run_state.rollback(self) else None
        return "stop" if mode == "stop" else None

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

    def _load(self, path: Path, restore_rng: bool = True) -> None:
        """Restore the run from checkpoint ``path`` (resume; rollback keeps the RNG streams going)."""
        run_state.load(self, path, restore_rng)
