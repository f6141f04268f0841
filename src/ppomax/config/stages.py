"""The training stages' configs: SFT, the reward model and PPO (paper Sec. 4 and 5), with the PPO
presets applied however a PPOConfig is built (:data:`ppomax.config.presets.PRESETS`)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from ppomax.config.base import LoraArgs, RunArgs, check_engine
from ppomax.config.presets import CRITIC_FIELDS, NO_CRITIC, PRESETS
from ppomax.fields import ConfigError, check, opt
from ppomax.hf_args import HFArgs


@dataclass
class SFTConfig(LoraArgs, HFArgs, RunArgs):
    """Supervised fine-tuning: next-token loss on response tokens only (prompt masked)."""

    eval_dataset: str | None = opt(None, "Held-out data; if unset, eval_split of the training data is held out.")
    eval_split: float = opt(0.05, "Fraction of training rows held out for eval when no eval_dataset.", ge=0, lt=1)
    num_train_epochs: float = opt(1.0, "Epochs over the training data (when max_steps = -1).", gt=0)
    per_device_train_batch_size: int = opt(8, "Sequences per micro-batch.", ge=1)
    per_device_eval_batch_size: int = opt(16, "Sequences per eval batch.", ge=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", ge=1)
    learning_rate: float = opt(2e-5, "Peak learning rate (AdamW).", gt=0)
    warmup_ratio: float = opt(0.03, "Fraction of the steps spent in linear warm-up.", ge=0, le=1)
    eval_steps: int = opt(100, "Evaluate every N steps (and at the end).", ge=1)
    max_length: int = opt(1024, "Maximum prompt + response tokens; longer responses are cut.", ge=2)

    def __post_init__(self) -> None:
        self._check_common()
        self._check_lora()


@dataclass
class RewardConfig(LoraArgs, HFArgs, RunArgs):
    """Reward model: pairwise Bradley-Terry loss + optional LM loss (paper Sec. 4, Eq. 2); with
    --use_peft, LoRA on the backbone (the head trains fully) and the merged model is saved."""

    eval_dataset: str | None = opt(None, "Held-out preference pairs; if unset, eval_split is held out.")
    eval_split: float = opt(0.05, "Fraction of pairs held out for eval when no eval_dataset.", ge=0, lt=1)
    num_train_epochs: float = opt(1.0, "Epochs over the pairs (when max_steps = -1).", gt=0)
    per_device_train_batch_size: int = opt(8, "Pairs per micro-batch.", ge=1)
    per_device_eval_batch_size: int = opt(16, "Pairs per eval batch.", ge=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", ge=1)
    learning_rate: float = opt(1e-5, "Peak learning rate (AdamW).", gt=0)
    warmup_ratio: float = opt(0.03, "Fraction of the steps spent in linear warm-up.", ge=0, le=1)
    eval_steps: int = opt(100, "Evaluate every N steps (and at the end).", ge=1)
    max_length: int = opt(1024, "Maximum prompt + response tokens per side; longer responses are cut.", ge=2)
    rm_lm_coef: float = opt(
        0.0, "β_rm: weight of the LM loss on the chosen response (paper Eq. 2; 0 turns it off).", ge=0
    )

    def __post_init__(self) -> None:
        self._check_common()
        self._check_lora()
        check(self.save_merged or not self.use_peft, "RewardConfig.save_merged = False: the reward model is always "
              "saved merged (PPO loads a plain reward model); its LoRA adapter is kept in <output_dir>/adapter")


@dataclass
class PPOConfig(LoraArgs, HFArgs, RunArgs):
    """PPO-max (paper Sec. 5.4). The defaults are the ``ppo_max`` preset; see PRESETS."""

    preset: str = opt(
        "ppo_max", "Starting values of every PPO-max detail: 'ppo_max' (paper Sec. 5.4) or 'vanilla' (Fig. 5 baseline); "
        "fields set explicitly (flags, YAML, keyword arguments) override the preset's.", choices=("ppo_max", "vanilla"),
    )
    reward_model_path: str | None = opt(None, "Reward model directory (scalar head); or pass reward_fn in Python.")
    ref_model_path: str | None = opt(None, "Reference policy π_ref (default: model_name_or_path, frozen).")
    critic_model_path: str | None = opt(None, "Critic init directory (default: per critic_init).")
    critic_init: str = opt(
        "reward_model", "Critic V_φ init: 'reward_model' (Sec. 5.3.3, used by PPO-max) or 'sft' (SFT backbone + fresh head).",
        choices=("reward_model", "sft"),
    )
    critic_use_peft: bool = opt(
        False, "LoRA adapters on the critic's backbone (its value head trains fully); same lora_* settings.",
    )
    share_frozen_weights: bool = opt(
        True, "One copy in memory of each frozen tensor that the policy's base, π_ref, the critic and the reward "
        "model hold bit for bit (LoRA: the shared base); the numbers do not change. Off under sharding.",
    )
    # --- rollout -------------------------------------------------------------------------------
    rollout_batch_size: int = opt(64, "Prompts sampled per PPO iteration (the experience buffer; paper 128).", ge=1)
    num_mini_batches: int = opt(4, "Mini-batches per PPO epoch (paper: buffer 128 in mini-batches of 32).", ge=1)
    per_device_train_batch_size: int = opt(16, "Micro-batch for forward/backward (gradient accumulation inside a mini-batch).", ge=1)
    generation_batch_size: int = opt(64, "Prompts per generate() call during rollout (memory knob).", ge=1)
    num_ppo_epochs: int = opt(1, "Passes over each experience buffer.", ge=1)
    response_length: int = opt(128, "Maximum new tokens per response (the length cap).", ge=1)
    temperature: float = opt(1.0, "Sampling temperature; log-probs use the same temperature (PPO_MAX.md).", gt=0)
    top_k: int = opt(
        0, "Top-k sampling (0: off). PPO refuses other values: the ratio and the KL penalty score the sampled tokens "
        "under the full temperature-scaled softmax, so truncated sampling would bias both (use temperature).", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling (1.0: off). PPO refuses other values, for the reason given at top_k.",
                       gt=0, le=1)
    stop_at_eos: bool = opt(
        True, "End a response at its first EOS id, any of the tokenizer's and generation_config's (off: every response "
        "is exactly response_length tokens, e.g. for benchmarks; 'truncated' then means no EOS among them).",
    )
    disable_dropout: bool = opt(
        True, "Set every dropout rate of the policy, critic, reference and reward model to 0 (LoRA's too). Rollouts "
        "run in eval mode and the update in train mode; with dropout on, the first mini-batch's ratio is not 1 and "
        "the clip fires on noise (TRL does the same).",
    )
    rollout_engine: str = opt(
        "hf", "What samples the rollouts: 'hf' (ppomax's KV-cache decode loop on the training model) or 'vllm' (a "
        "colocated vLLM engine in this process, weights synced after every update; pip install 'ppomax[vllm]').",
        choices=("hf", "vllm"),
    )
    # vLLM engine settings (ppomax.engines.vllm; ignored by 'hf')
    vllm_gpu_memory_utilization: float = opt(
        0.2, "vLLM: share of GPU memory for its weights and KV cache (on CPU: of host RAM, for the KV cache). vLLM's "
        "0.9 would starve the colocated trainer's models and optimizer; 0.2 starts on a 23 GB CPU host.", gt=0, lt=1)
    vllm_kv_cache_memory_gib: float | None = opt(
        None, "vLLM: an explicit KV-cache size in GiB instead of vllm_gpu_memory_utilization (small runs, tests).", gt=0)
    vllm_dtype: str = opt("auto", "vLLM weights dtype ('auto': the policy's).", choices=("auto", "float32", "bfloat16",
                                                                                           "float16"))
    vllm_enforce_eager: bool = opt(False, "vLLM: no CUDA graphs / torch.compile (faster start, slower decode).")
    vllm_enable_sleep_mode: bool = opt(
        False, "vLLM, GPU only: sleep (weights to host, KV cache freed) while the trainer trains; refused on CPU.")
    vllm_logprobs_as_old: bool = opt(
        False, "Use vLLM's sampled-token log-probs as log π_old instead of a trainer forward (as --rollout_logprobs "
        "generate does with vllm): saves a policy forward per rollout, but vLLM's kernels differ numerically, so the "
        "first ratio is not 1 and the clip sees that gap as policy change; rollout/logprob_gap_* are then not logged.")
    rollout_logprobs: str = opt(
        "auto", "Where log π_old comes from: 'generate' (the sampling logits, no second policy forward), 'forward' "
        "(a full forward, bit-identical to the training forward), 'auto' (generate in fp32, forward under bf16/fp16).",
        choices=("auto", "generate", "forward"),
    )
    torch_compile: bool = opt(
        False, "torch.compile (inductor) the decode step and the policy, reference, critic and reward-model forwards "
        "(and their backward). Faster iterations once compiled, but the first iteration compiles for tens of seconds "
        "and the first change of prompt/response length recompiles once (with dynamic shapes): for long runs.",
    )
    rollout_cuda_graph: bool = opt(
        False, "hf engine, GPU: run each decode step as a captured CUDA graph over a static KV cache, sampling "
        "included (the same sampling and log π_old). Where it cannot (CPU, a model without a static cache, FSDP2, a "
        "failed capture) it logs the reason once and uses the eager loop.")
    rollout_bf16_weights: bool = opt(
        False, "hf engine, with --bf16: sample from a copy of the policy with its linear weights in bf16, refreshed "
        "after every update (as vLLM holds one): no per-step casts of frozen or graph-captured weights; the same "
        "numbers as autocast; costs the bf16 copy's memory. Not with sharding.")
    frozen_bf16: str = opt(
        "auto", "Hold the frozen models (π_ref, reward model) in bf16: 'auto' = under --bf16 on a GPU, 'on' = under "
        "--bf16 on any device, 'off' = as loaded. Halves their memory and time; scores move within bf16 rounding. "
        "π_ref under LoRA (the adapter-off policy) is not a separate model and stays as it is.",
        choices=("auto", "on", "off"))
    missing_eos_penalty: float | None = opt(
        1.0, "Subtract this from r̃ of responses that hit the cap without EOS, after the Eq. 18 normalisation and clip "
        "(σ units under PPO-max; the moments see raw scores): the RM never saw a truncated response, which PPO can "
        "exploit (compare reward/truncated_mean with reward/raw_mean). None: off.", ge=0)
    # --- reward shaping (Fig. 5 details 1-5) ------------------------------------------------
    kl_coef: float = opt(0.05, "η: token-level KL penalty to π_ref (Sec. 5.3.1, Fig. 7; PPO-max 0.05).", ge=0)
    kl_estimator: str = opt("k1", "Per-token KL estimator in the reward: k1 = log π − log π_ref (can be < 0), k3 ≥ 0.", choices=("k1", "k2", "k3"))
    adaptive_kl: bool = opt(False, "Adapt η toward kl_target (Ziegler et al. 2019) instead of a fixed η.")
    kl_target: float = opt(6.0, "Target summed KL per sequence for the adaptive controller.", gt=0)
    kl_horizon: int = opt(10000, "Horizon (samples) of the adaptive controller.", ge=1)
    reward_scaling: bool = opt(False, "Divide scores by the running std (Sec. 5.3.1 'reward scaling'; no gain in the paper).")
    reward_normalize: bool = opt(True, "Normalise scores with running mean/std of all scores so far (Eq. 18).")
    reward_clip: float | None = opt(0.8, "δ: clip normalised scores to [−δ, δ] (Eq. 18; paper ablates 0.3/0.8, advises relaxed). None: off.", gt=0)
    whiten_rewards: bool = opt(False, "Whiten the per-token rewards within the batch before GAE (TRL option).")
    # --- advantage estimator (issue #14): PPO-max's GAE with a critic, or a critic-free one ---
    advantage_estimator: str = opt(
        "gae", "How advantages are estimated: 'gae' (PPO-max: a critic and GAE, Eq. 12-13), or critic-free: 'grpo' "
        "(Shao et al. 2024: reward minus the prompt group's mean, over its std), 'rloo' (Ahmadian et al. 2024: minus "
        "the mean of the other samples), 'reinforce_pp' (Hu 2025: token returns whitened over the batch). Critic-free "
        "estimators load and train no critic.", choices=("gae", "grpo", "rloo", "reinforce_pp"),
    )
    num_samples_per_prompt: int = opt(
        1, "k: responses sampled per prompt; the k samples of a prompt sit next to each other in the batch, and "
        "rollout_batch_size counts prompts (an iteration has rollout_batch_size × k responses). grpo/rloo need k >= 2.",
        ge=1,
    )
    grpo_scale_rewards: bool = opt(
        True, "grpo: divide by the group's std. false gives Dr. GRPO (Liu et al. 2025), which also uses "
        "--loss_reduction token_sum.",
    )
    kl_in_reward: bool = opt(
        True, "Where the KL penalty η acts: true puts −η·KL_t into the token rewards (PPO-max, Sec. 5.3.1); false adds "
        "η × the k3 estimate of KL(π_θ‖π_ref) to the policy loss, as GRPO does.",
    )
    loss_reduction: str = opt(
        "token_mean", "How token losses of a mini-batch are reduced: 'token_mean' (every token of the mini-batch weighs "
        "the same) or 'token_sum' (Dr. GRPO: summed and divided by a constant, responses × response_length, so long "
        "responses are not down-weighted).", choices=("token_mean", "token_sum"),
    )
    # --- advantages and losses (Fig. 5 details 6, 7, 10, 11) ----------------------------------
    gamma: float = opt(1.0, "γ discount in GAE (App. C.3).", ge=0, le=1)
    lam: float = opt(0.9, "λ of GAE (App. C.3 text: 0.9; released code 0.95).", ge=0, le=1)
    whiten_advantages: bool = opt(
        True, "Normalise GAE advantages per mini-batch (Sec. 5.3.1 detail 6). The critic-free estimators normalise by "
        "their own rule (per group, or over the batch) and are not whitened again.")
    advantage_clip: float | None = opt(None, "Clip advantages to [−c, c] (detail 6; the paper advises not stacking with reward clipping).", gt=0)
    cliprange: float = opt(0.2, "ε of the clipped surrogate (Eq. 14; App. C.1).", gt=0, lt=1)
    cliprange_value: float | None = opt(0.2, "ε_v of value-loss clipping (detail 7). None: off.", gt=0)
    vf_coef: float = opt(1.0, "Critic loss weight (the critic has its own optimizer; this scales its loss).", gt=0)
    entropy_coef: float = opt(0.0, "Entropy bonus c_ent (detail 3; very sensitive, off in PPO-max).", ge=0)
    importance_sampling_ref: bool = opt(
        False, "Fix π_old to π_ref in the ratio ('infinite buffer', Sec. 5.3.2): more stable, lower final quality."
    )
    # --- critic pre-training and PPO-ptx (Sec. 5.4) -------------------------------------------
    critic_pretrain_steps: int = opt(20, "Rollouts on which only the critic trains before the policy moves (Sec. 5.4).", ge=0)
    critic_learning_rate: float = opt(1.65e-6, "Critic learning rate (paper, 7B: 1.65e-6).", gt=0)
    learning_rate: float = opt(5e-7, "Policy learning rate (paper, 7B: 5e-7; tiny models need larger).", gt=0)
    warmup_ratio: float = opt(0.0, "Fraction of the steps spent in linear warm-up (PPO-max uses critic pre-training instead).", ge=0, le=1)
    lr_scheduler_type: str = opt("constant", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant"))
    ptx_dataset: str | None = opt(None, "PPO-ptx (Eq. 17): SFT/pre-training rows mixed into the policy loss.")
    ptx_coef: float = opt(0.0, "λ_ptx: weight of the PPO-ptx LM loss (needs ptx_dataset).", ge=0)
    max_length_ptx: int = opt(1024, "Maximum tokens of a PPO-ptx row (prompt + response).", ge=2)
    # --- loop ----------------------------------------------------------------------------------
    max_steps: int = opt(100, "PPO iterations (rollout + update); critic pre-training comes on top.", ge=1)
    save_steps: int = opt(50, "Checkpoint every N PPO iterations (and at the end).", ge=1)
    logging_steps: int = opt(1, "Log every N iterations.", ge=1)
    num_sample_generations: int = opt(4, "Sample responses written to samples.jsonl at each logged step.", ge=0)
    # --- evaluation during training and the best checkpoint (names as in TrainingArguments) -----
    eval_steps: int | None = opt(
        None, "Evaluate every N PPO iterations (and at the last) on --eval_dataset: eval/rm_reward, eval/kl, "
        "eval/length, eval/truncated, eval/perplexity, and eval/gold with a gold_fn (Python). None: off.", ge=1)
    eval_dataset: str | None = opt(None, "Held-out prompts for --eval_steps (JSONL / datasets dir); or eval_prompts= in Python.")
    metric_for_best_model: str | None = opt(
        None, "Keep the checkpoint with the best value of this eval metric in <output_dir>/best (rm_reward, gold, kl, "
        "length, truncated, perplexity; 'eval/' prefix optional). Needs --eval_steps.")
    greater_is_better: bool | None = opt(
        None, "Whether a larger metric_for_best_model is better (default: yes, except kl, truncated; length, perplexity: required).")
    load_best_model_at_end: bool = opt(False, "Load the best checkpoint's weights when training ends (needs metric_for_best_model).")
    max_consecutive_skips: int = opt(3, "Stop after this many consecutive updates skipped for non-finite values.", ge=1)
    collapse_guard: str = opt(
        "warn", "On a collapse signal (see docs/metrics.md): warn, stop (save and exit) or rollback.",
        choices=("off", "warn", "stop", "rollback"),
    )
    collapse_kl: float = opt(20.0, "Collapse signal: mean summed KL to π_ref per response above this.", gt=0)
    collapse_ppl_ratio: float = opt(0.35, "Collapse signal: policy perplexity below this fraction of its start value.", gt=0, lt=1)
    collapse_truncated: float = opt(0.5, "Collapse signal: share of responses hitting the length cap above this.", gt=0, le=1)
    collapse_reward_tail: float | None = opt(
        None, "Collapse signal: the reward tail (raw p99 − p50 of a batch) above this multiple of its first PPO value "
        "(App. A: a long tail). None: off.", gt=1,
    )
    rollback_kl_factor: float = opt(2.0, "On rollback, multiply η by this factor.", gt=1)

    def __post_init__(self) -> None:
        self._check_common()
        self._check_lora()
        check_engine(self)
        n = type(self).__name__
        k = self.num_samples_per_prompt
        check(
            self.rollout_batch_size * k % self.num_mini_batches == 0,
            f"{n}.rollout_batch_size = {self.rollout_batch_size} × num_samples_per_prompt = {k}: the "
            f"{self.rollout_batch_size * k} responses must be divisible by num_mini_batches = {self.num_mini_batches}",
        )
        if self.advantage_estimator in ("grpo", "rloo"):
            check(k >= 2, f"{n}.num_samples_per_prompt = {k}: advantage_estimator = {self.advantage_estimator!r} "
                          f"needs >= 2 samples per prompt (its baseline is the other samples of the prompt); set "
                          f"--num_samples_per_prompt 4, for example")
        if not self.uses_critic:  # the estimator decides whether a critic exists; no second flag to keep in sync
            unset = {f.name: f.default for f in dataclasses.fields(self) if f.name in CRITIC_FIELDS} | NO_CRITIC
            given = [f for f in CRITIC_FIELDS if getattr(self, f) != unset[f]]
            check(not given, f"{n}: advantage_estimator = {self.advantage_estimator!r} trains no critic, but critic "
                             f"option(s) {', '.join('--' + g for g in given)} were given; remove them (or use "
                             f"--advantage_estimator gae)")
        if self.metric_for_best_model is not None:
            from ppomax.ppo.best import check_best_model_settings

            check_best_model_settings(self)  # metric name, direction, --eval_steps
        check(not self.load_best_model_at_end or self.metric_for_best_model is not None,
              f"{n}.load_best_model_at_end needs --metric_for_best_model (which checkpoint is best)")
        # The ratio π_θ/π_old and the KL to π_ref score sampled tokens under the full softmax at the sampling
        # temperature (PPO_MAX.md); tokens drawn from a top-k/top-p truncation come from another distribution.
        for name, off in (("top_k", 0), ("top_p", 1.0)):
            check(getattr(self, name) == off,
                  f"{n}.{name} = {getattr(self, name)!r} is not supported in PPO: the ratio and the KL penalty are "
                  f"computed under the full temperature-scaled softmax, so truncated sampling would bias both. "
                  f"Leave {name} at {off!r} and lower --temperature instead (top_k / top_p are allowed in ppomax eval)")
        for name in ("rollout_cuda_graph", "rollout_bf16_weights"):
            check(not getattr(self, name) or self.rollout_engine == "hf", f"{n}.{name} is for --rollout_engine hf "
                  f"(vLLM captures its own CUDA graphs unless --vllm_enforce_eager)")
        check(not self.rollout_bf16_weights or (self.bf16 and self.sharding == "none"),
              f"{n}.rollout_bf16_weights needs --bf16 and no --sharding (a whole bf16 copy of the policy's linears)")
        check(self.frozen_bf16 != "on" or self.bf16, f"{n}.frozen_bf16 = 'on' needs --bf16")
        mini = self.mini_batch_size
        check(
            mini % self.per_device_train_batch_size == 0 or self.per_device_train_batch_size >= mini,
            f"{n}.per_device_train_batch_size = {self.per_device_train_batch_size} must divide the mini-batch size {mini} "
            f"(rollout_batch_size × num_samples_per_prompt / num_mini_batches)",
        )

    @property
    def uses_critic(self) -> bool:
        """Only GAE needs a value function; grpo, rloo and reinforce_pp are critic-free."""
        return self.advantage_estimator == "gae"

    @property
    def mini_batch_size(self) -> int:
        """Responses per mini-batch: the rollout's rollout_batch_size × num_samples_per_prompt, split."""
        return self.rollout_batch_size * self.num_samples_per_prompt // self.num_mini_batches

    @classmethod
    def from_preset(cls, preset: str = "ppo_max", **overrides: Any) -> PPOConfig:
        """Build a config from a preset, then apply ``overrides`` (any field). The same as
        ``PPOConfig(preset=preset, **overrides)``."""
        return cls(**overrides, preset=preset)


def _apply_preset(init):
    """Wrap PPOConfig's generated ``__init__`` so that the preset applies however the config is built
    (the constructor, ``from_preset``, YAML, the CLI): the preset's values first, then every field the
    caller passed. Without this, ``PPOConfig(preset="vanilla")`` would keep the dataclass defaults, which
    are PPO-max, under the label "vanilla". Fields are keyword-only for the same reason: a positional
    value could not be told apart from a preset value. ``dataclasses.replace`` passes every field, so it
    keeps the values it copies (change the preset with ``from_preset`` instead)."""

    @functools.wraps(init)
    def __init__(self, **kwargs: Any) -> None:
        preset = kwargs.get("preset", "ppo_max")
        if preset not in PRESETS:
            raise ConfigError(f"PPOConfig.preset = {preset!r} is invalid: allowed one of {', '.join(map(repr, PRESETS))}")
        values = {**PRESETS[preset]}
        if kwargs.get("advantage_estimator", "gae") != "gae":  # no critic: the preset's critic details do not apply
            values.update(NO_CRITIC)
        init(self, **{**values, **kwargs})

    return __init__


PPOConfig.__init__ = _apply_preset(PPOConfig.__init__)
