"""PPOTrainer's set-up, in the order it runs: prompts and PPO-ptx rows (bad rows fail before any
model is loaded), then the four models (policy π_θ, reference π_ref, reward model r, critic V_φ),
then their placement: device, frozen models, gradient checkpointing, identical start on every
rank, FSDP2 sharding (sharding.py). Also the resumable prompt sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ppomax import compat, sharding
from ppomax import distributed as dist_lib
from ppomax.config import ConfigError, PPOConfig
from ppomax.errors import UserError

logger = logging.getLogger("ppomax")


class IndexSampler:
    """Epoch-wise shuffled indices with a resumable position (seeded, independent of global RNG)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._make_perm()

    def _make_perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make_perm()
            take = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos : self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._perm = self._make_perm()


def load_prompts(cfg: PPOConfig, tokenizer, prompts, reward_fn=None) -> tuple[list[list[int]], list[dict]]:
    """(token ids, canonical rows) of every usable prompt (``prompts=`` or ``cfg.dataset``), ids fitted to
    max_prompt_length; rows of text, chat messages or TRL's pre-tokenized ``input_ids`` (checked against the
    vocabulary). ``reward_fn`` (a RewardFunction) learns which row columns it can be passed."""
    from ppomax import data as D

    source = prompts if prompts is not None else cfg.dataset
    if source is None:
        raise ConfigError("PPOConfig.dataset is required (flag --dataset), or pass prompts=")
    rows, n_bad = D.load_rows(source, "prompt", skip_bad_rows=cfg.skip_bad_rows, vocab_size=len(tokenizer))
    prompt_ids, kept, n_trunc, n_drop = [], [], 0, 0
    for row in rows:
        ids = D.row_prompt_ids(tokenizer, row)
        fitted = D.fit_prompt(ids, cfg.max_prompt_length, cfg.truncation_mode)
        if fitted is None:
            n_drop += 1
            continue
        n_trunc += len(fitted) < len(ids)
        prompt_ids.append(fitted)
        kept.append(row)
    if not prompt_ids:
        raise UserError("no prompts left after length filtering (max_prompt_length / truncation_mode)")
    logger.info("prompts: %d used, %d bad rows skipped, %d left-truncated, %d dropped as too long",
                len(prompt_ids), n_bad, n_trunc, n_drop)
    if reward_fn is not None:
        reward_fn.bind_rows(kept)
    return prompt_ids, kept


def load_prompt_ids(cfg: PPOConfig, tokenizer, prompts) -> list[list[int]]:
    """Token ids of every usable prompt (:func:`load_prompts` without the rows)."""
    return load_prompts(cfg, tokenizer, prompts)[0]


def load_eval_prompts(cfg: PPOConfig, tokenizer, eval_prompts, has_gold: bool) -> tuple[list | None, list | None]:
    """Held-out (prompt ids, rows) for --eval_steps ((None, None) when off); errors name the missing piece
    before any model loads."""
    if cfg.eval_steps is None:
        return None, None
    source = eval_prompts if eval_prompts is not None else cfg.eval_dataset
    if source is None:
        raise ConfigError("PPOConfig.eval_steps needs held-out prompts: --eval_dataset FILE (or eval_prompts= in Python)")
    from ppomax.ppo.evaluation import metric_key

    if cfg.metric_for_best_model and metric_key(cfg.metric_for_best_model) == "gold" \
            and not has_gold:
        raise ConfigError("PPOConfig.metric_for_best_model = 'gold' needs a gold judge: pass gold_fn= in Python")
    return load_prompts(cfg, tokenizer, source)


def load_eval_prompt_ids(cfg: PPOConfig, tokenizer, eval_prompts, has_gold: bool) -> list[list[int]] | None:
    """Held-out prompt ids for --eval_steps (None when off): :func:`load_eval_prompts` without the rows."""
    return load_eval_prompts(cfg, tokenizer, eval_prompts, has_gold)[0]


def load_ptx_examples(cfg: PPOConfig, tokenizer, ptx_rows: Sequence[dict] | None) -> list | None:
    """Tokenized PPO-ptx rows (Eq. 17), or None when PPO-ptx is off."""
    from ppomax import data as D

    if cfg.ptx_coef > 0 and (ptx_rows is not None or cfg.ptx_dataset is not None):
        ptx, _ = D.load_rows(ptx_rows if ptx_rows is not None else cfg.ptx_dataset, "sft",
                             skip_bad_rows=cfg.skip_bad_rows)
        return D.tokenize_sft(ptx, tokenizer, cfg.max_length_ptx, cfg.max_prompt_length, cfg.truncation_mode)[0]
    if cfg.ptx_coef > 0:
        logger.warning("ptx_coef = %s but no ptx_dataset: PPO-ptx is off", cfg.ptx_coef)
    return None


def weight_index(share: bool):
    """A FrozenWeightIndex (ppomax/shared_weights.py) when frozen weights are shared, else None."""
    if not share:
        return None
    from ppomax.shared_weights import FrozenWeightIndex

    return FrozenWeightIndex()


def _log_sharing(index) -> None:
    if index is not None and index.done.tensors:
        logger.info("%d frozen tensors shared between models: %.0f MiB not held twice", index.done.tensors,
                    index.done.bytes_saved / 2**20)


def load_models(cfg: PPOConfig, policy=None, ref_policy=None, reward_model=None, critic=None,
                with_reward_model: bool = True, skeleton_trained: bool = False, skeleton_frozen: bool = False,
                share: bool = False) -> tuple:
    """(policy, ref_policy, reward_model, critic): the given ones, the others loaded from cfg's paths.

    With LoRA and no ref_model_path, ref_policy is None: π_ref is the policy with its adapters
    disabled (no second copy in memory). reward_model is None when a reward_fn scores instead.
    ``skeleton_trained`` / ``skeleton_frozen``: build those models on the meta device (a sharded
    run's ranks > 0, filled from rank 0 by place_models). ``share``: share frozen weights as each
    model is loaded (share_frozen_weights), so the host holds at most one model's duplicate at a time.
    """
    from ppomax import models as M
    from ppomax.hf_args import load_dtype
    from ppomax.seqcls import to_scalar_head

    rc, attn = cfg.trust_remote_code, cfg.attn_implementation  # dtypes per role: ppomax/hf_args.py
    with M.skeleton_loading(skeleton_trained):
        if policy is None:
            policy = M.load_causal_lm(cfg.model_name_or_path, load_dtype(cfg, True, cfg.use_peft), rc, attn)
    if cfg.use_peft:
        policy = M.apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    with M.skeleton_loading(skeleton_frozen):
        if ref_policy is None and not (cfg.use_peft and cfg.ref_model_path is None):
            ref_policy = M.load_causal_lm(cfg.ref_model_path or cfg.model_name_or_path, cfg.torch_dtype, rc, attn)
        if reward_model is None and with_reward_model:
            reward_model = M.ScalarHeadModel.from_pretrained(cfg.reward_model_path, cfg.torch_dtype, rc, attn)
    if reward_model is not None:  # an AutoModelForSequenceClassification passed in Python (TRL's reward_model=)
        reward_model = to_scalar_head(reward_model)
    for frozen in (ref_policy, reward_model):  # frozen from the start: their copies of the base can go now
        if frozen is not None:
            frozen.requires_grad_(False)
    index = weight_index(share)  # each model is compared once, as it arrives
    if index is not None:
        for m in (policy, ref_policy, reward_model):
            index.add(m, own_the_rest=True)
    if not cfg.uses_critic:  # grpo / rloo / reinforce_pp: no value function is loaded or trained
        if critic is not None:
            raise ConfigError(f"advantage_estimator = {cfg.advantage_estimator!r} trains no critic; do not pass critic=")
        _log_sharing(index)
        return policy, ref_policy, reward_model, None
    with M.skeleton_loading(skeleton_trained):
        critic = _load_critic(cfg, critic)
    if cfg.critic_use_peft:
        critic = M.apply_lora(critic, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if index is not None:
        index.add(critic, own_the_rest=True)  # a LoRA critic's frozen backbone
    _log_sharing(index)
    return policy, ref_policy, reward_model, critic


def _load_critic(cfg: PPOConfig, critic):
    from ppomax import models as M
    from ppomax.hf_args import load_dtype
    from ppomax.seqcls import to_scalar_head

    load = (load_dtype(cfg, True, cfg.critic_use_peft), cfg.trust_remote_code, cfg.attn_implementation)
    if critic is None:
        if cfg.critic_model_path:
            critic = M.ScalarHeadModel.from_pretrained(cfg.critic_model_path, *load)
        elif cfg.critic_init == "reward_model":  # Sec. 5.3.3: the critic starts as the reward model
            critic = M.ScalarHeadModel.from_pretrained(check_critic_source(cfg), *load)
        else:
            critic = M.ScalarHeadModel.from_causal_lm(cfg.model_name_or_path, *load)
    return to_scalar_head(critic)  # TRL's value_model= (a seq-cls model) works as it is


def preflight(cfg: PPOConfig, critic=None, is_main: bool = True) -> None:
    """Checks that need no model, run before any loads: where the critic starts (below), and with
    --push_to_hub the Hub repo is created now (as transformers' Trainer does), so a missing login fails
    before the compute rather than after it."""
    check_critic_source(cfg, critic)
    if cfg.push_to_hub and is_main:
        from ppomax.hub import create_repo

        create_repo(cfg.hub_model_id, cfg.hub_private_repo)


def check_critic_source(cfg: PPOConfig, critic=None) -> str | None:
    """Where critic_init='reward_model' starts the critic (Sec. 5.3.3); a clear error, before any model
    loads, when there is no reward model directory to start it from (a reward_fn run): ppomax does not
    silently switch to a fresh head."""
    if critic is None and cfg.uses_critic and cfg.critic_model_path is None and cfg.critic_init == "reward_model" \
            and cfg.reward_model_path is None:
        raise ConfigError("critic_init='reward_model' (the PPO-max default, Sec. 5.3.3) starts the critic from the "
                          "reward model, but no --reward_model_path is given (a reward_fn or a reward_model object "
                          "scores instead): set critic_init='sft' (the SFT backbone with a fresh value head, trained "
                          "during --critic_pretrain_steps), --critic_model_path DIR, or pass critic=")
    return cfg.reward_model_path


def optimizers(cfg: PPOConfig, policy, critic) -> tuple:
    """(policy AdamW, its LR schedule, critic AdamW, its schedule); the critic's are None without a critic.
    The critic's schedule also spans critic pre-training."""
    from ppomax.training import make_optimizer, make_scheduler

    betas = (cfg.adam_beta1, cfg.adam_beta2)
    p_opt = make_optimizer(policy.parameters(), cfg.learning_rate, cfg.weight_decay, betas, fused=True)
    p_sched = make_scheduler(p_opt, cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.max_steps)
    if critic is None:
        return p_opt, p_sched, None, None
    c_opt = make_optimizer(critic.parameters(), cfg.critic_learning_rate, cfg.weight_decay, betas, fused=True)
    c_sched = make_scheduler(c_opt, cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.max_steps + cfg.critic_pretrain_steps)
    return p_opt, p_sched, c_opt, c_sched


def frozen_dtype(cfg: PPOConfig, device: torch.device) -> torch.dtype | None:
    """The dtype π_ref and the reward model are held in (--frozen_bf16), or None: as loaded.

    bf16 under --bf16 on a GPU ('auto') or on any device ('on'): autocast computes their matmuls in
    bf16 anyway, so fp32 weights only cost memory and a cast per weight per forward (autocast caches
    casts only of weights that require grad). Embeddings and norms then also run in bf16: scores
    and log π_ref move within bf16 rounding.
    """
    if not cfg.bf16 or cfg.frozen_bf16 == "off":
        return None
    return torch.bfloat16 if cfg.frozen_bf16 == "on" or device.type == "cuda" else None


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter of ``model`` to ``dtype``, in place. Buffers stay as loaded (RoPE's
    inv_freq in bf16 would shift the angles of far positions; ``Module.to`` would cast it too)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def place_models(cfg: PPOConfig, policy, critic, ref_policy, reward_model, dist: dist_lib.Dist, mode: str,
                 device: torch.device) -> None:
    """Dropout off, device, frozen models, gradient checkpointing, the same start on every rank, sharding.

    Must run before the optimizers are built: under sharding they hold the shards."""
    from ppomax.models import disable_dropout

    roles = ((policy, True), (critic, True), (ref_policy, False), (reward_model, False))
    if cfg.disable_dropout:  # ratio exactly 1 on the first mini-batch (see PPOConfig.disable_dropout)
        for m, _ in roles:
            if m is not None:
                disable_dropout(m)
    # Module.to gives every model its own device copy: share again as each one arrives, so the
    # device holds at most one duplicate at a time (on the host, load_models shared them already)
    index = weight_index(cfg.share_frozen_weights and mode == "none" and device.type != "cpu")
    frozen_as = frozen_dtype(cfg, device)
    for m, trainable in roles:
        if m is not None and not sharding.shards(mode, trainable):
            if sharding.is_skeleton(m):
                raise UserError(f"{type(m).__name__} was built without weights but is not sharded")
            m.to(device)  # a model to be sharded moves in fully_shard, one block at a time
            if frozen_as is not None and not trainable:
                cast_parameters(m, frozen_as)  # before sharing: bit-equal bf16 tensors are held once
            if index is not None:
                index.add(m)
    for frozen in (ref_policy, reward_model):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    trained = [m for m in (policy, critic) if m is not None]  # no critic with a critic-free estimator
    if cfg.gradient_checkpointing:
        for m in trained:
            compat.enable_activation_checkpointing(m)  # the current transformers name, or the older one
    if dist.enabled and mode == "none":  # data parallel: identical trained models (fresh heads, LoRA)
        for m in trained:
            dist_lib.broadcast_parameters(m, dist)
    for m, trainable in roles:  # FSDP2 (sharding.py): each rank's shards come from rank 0's copy
        if m is not None and sharding.shards(mode, trainable):
            # ranks > 0 may hold a meta-device skeleton (load_models); every rank says which it has
            skeleton = dist_lib.any_rank(sharding.is_skeleton(m), dist)
            if skeleton and dist.rank == 0 and sharding.is_skeleton(m):
                raise UserError("rank 0 must load the whole model to share it with the other ranks")
            full = dict(m.state_dict()) if skeleton and dist.rank == 0 else None  # the full tensors, kept alive
            if not skeleton:  # all ranks built it (e.g. models passed in Python): check, do not trust
                dist_lib.check_identical(m, dist, type(m).__name__)
            sharding.shard(m, mode, trainable, device)
            if skeleton:
                sharding.fill_from_rank0(m, full, device)
