"""The metric names and what they mean: the single source for logs, plots, reports and ``docs/metrics.md``.

``docs/metrics.md``'s PPO table is generated from :data:`METRIC_DOCS` (:func:`update_metrics_doc`);
``tests/test_docs.py`` checks that it is in step and that every logged metric is documented.
"""

from __future__ import annotations

import os
from pathlib import Path

# name -> (meaning, what a collapse looks like). Indicators follow Zheng et al. 2023, Sec. 5.2.
METRIC_DOCS: dict[str, tuple[str, str]] = {
    "reward/raw_mean": ("mean reward-model score of the sampled responses, before normalisation", "keeps rising while gold/mean falls (reward hacking)"),
    "reward/raw_p50": ("median raw RM score in the batch", "stays flat while p99 pulls away"),
    "reward/raw_p90": ("90th percentile of the raw RM score", "separates from the median"),
    "reward/raw_p99": ("99th percentile of the raw RM score", "grows a long tail far above p50"),
    "reward/raw_max": ("largest raw RM score in the batch", "outlier scores explode"),
    "reward/raw_std": ("standard deviation of the raw RM scores in the batch", "collapses to ~0: every response gets the same score (one fixed pattern)"),
    "reward/truncated_mean": ("mean raw RM score of the responses that hit the length cap without EOS (logged when "
                              "there are any; the score is before missing_eos_penalty)",
                              "above reward/raw_mean: the RM rates unfinished text highly and PPO can exploit the cap"),
    "reward/processed_mean": ("mean reward fed to PPO (r̃): after normalisation, clipping and the missing-EOS penalty", "pinned at the clip bound"),
    "gold/mean": ("mean gold (judge) score of the sampled responses", "peaks early, then falls while RM reward still rises"),
    "gold/well_formed": ("fraction of responses the judge accepts as well-formed", "drops: degenerate or repetitive text"),
    "kl/ref": ("KL(π‖π_ref) per response on the sampled tokens (nats)", "rises steadily without levelling off"),
    "kl/coef": ("KL penalty coefficient η in use (Sec. 5.3.1)", "an adaptive η keeps climbing: the policy keeps pulling away"),
    "policy/perplexity": ("perplexity of the policy on its own samples", "falls towards 1: over-confident fixed patterns"),
    "policy/entropy": ("mean token entropy of the policy on its samples (nats)", "falls towards 0"),
    "policy/approx_kl": ("KL(π_old‖π_θ) within one update, k3 estimator (nats)", "spikes: updates too large"),
    "policy/clipfrac": ("fraction of tokens whose PPO ratio was clipped", "high (≳ 0.3): the policy moves too far per update"),
    "policy/loss": ("PPO clipped surrogate loss", "uninformative: looks normal during a collapse"),
    "response/length_mean": ("mean response length (tokens)", "drifts, often up to the length cap"),
    "response/truncated_frac": ("fraction of responses cut at the length cap", "climbs towards 1"),
    "critic/value_loss": ("critic (clipped) value loss", "spikes or diverges"),
    "critic/explained_variance": ("1 − Var(returns − values) / Var(returns)", "stays ≤ 0: the critic does not track returns, advantages are noise"),
    "critic/clipfrac": ("fraction of value predictions clipped", "high: value targets jump between iterations"),
    "adv/mean": ("mean advantage before whitening", "drifts far from 0"),
    "adv/std": ("std of the advantages before whitening", "explodes or vanishes"),
    "returns/mean": ("mean GAE return (value target)", "follows the reward tail upwards"),
    "returns/std": ("std of the GAE returns", "shrinks to ~0 with a collapsed, uniform policy"),
    "critic/value_mean": ("mean critic value V_old on response tokens", "drifts away from returns/mean"),
    "ptx/loss": ("PPO-ptx LM loss on SFT / pre-training rows (Eq. 17)", "rises: the alignment tax grows, the policy forgets the SFT data"),
    "eval/rm_reward": ("--eval_steps: mean reward (RM or reward_fn) of one sample per held-out prompt, fixed seed", "rises while eval/gold falls"),
    "eval/gold": ("--eval_steps: mean gold-judge score on the held-out prompts (with a gold_fn)", "peaks, then falls: keep best/ (--metric_for_best_model gold)"),
    "eval/kl": ("--eval_steps: mean summed KL(π‖π_ref) per held-out response (nats)", "rises without levelling off"),
    "eval/length": ("--eval_steps: mean held-out response length (tokens, EOS included)", "drifts to the cap"),
    "eval/truncated": ("--eval_steps: share of held-out responses that hit the cap without EOS", "climbs towards 1"),
    "eval/perplexity": ("--eval_steps: policy perplexity on its held-out samples", "falls towards 1"),
    "eval/distinct_1": ("--eval_steps: distinct words / all words over the held-out responses together (ppomax.diversity)", "falls: the same words in every answer"),
    "eval/distinct_2": ("--eval_steps: distinct word bigrams / all bigrams over the held-out responses together", "falls towards 1/N (N responses): one template for every prompt"),
    "eval/self_similarity": ("--eval_steps: mean pairwise Jaccard overlap of the held-out responses' word 1- and 2-gram sets", "rises towards 1: the answers to different prompts read alike"),
    "eval/template_share": ("--eval_steps: share of held-out responses opening with the most common first 4 words", "rises towards 1: every answer starts the same way"),
    "skipped": ("share of the iteration's optimizer steps (mini-batches × epochs) skipped for a non-finite value, "
                "logged when > 0; 1: the whole update was skipped (cause in skip_cause)",
                "1 in max_consecutive_skips iterations in a row stops the run"),
    "grad_norm/policy": ("policy gradient norm before clipping", "spikes by orders of magnitude"),
    "grad_norm/critic": ("critic gradient norm before clipping", "spikes by orders of magnitude"),
    "lr/policy": ("policy learning rate (schedule)", "not a collapse signal"),
    "lr/critic": ("critic learning rate (schedule)", "not a collapse signal"),
    "time/generate": ("seconds per iteration spent sampling responses", "grows with response length"),
    "rollout/logprob_gap_mean": (
        "--rollout_engine vllm: mean over response tokens of abs(vLLM's sampled-token log-prob − the trainer's log π_old) "
        "(numerical gap between the two kernels; ~1e-6 in fp32, ~1e-2 in bf16)",
        "a gap that grows while the policy does not move (lr 0) is a weight-sync bug (allenai/open-instruct#1473)"),
    "rollout/logprob_gap_max": (
        "--rollout_engine vllm: the largest such gap over the batch's response tokens",
        "as rollout/logprob_gap_mean; a few large values point at one layer or token the sync missed"),
    "time/score": ("seconds per iteration in the reward model and gold judge", "not a collapse signal"),
    "time/forward": ("seconds per iteration in policy/reference/critic forward passes", "not a collapse signal"),
    "time/train": ("seconds per iteration in PPO updates", "not a collapse signal"),
    "time/iteration": ("wall-clock seconds per PPO iteration", "grows with response length"),
    "tokens_per_s": ("generated response tokens per second", "not a collapse signal"),
}  # fmt: skip


# SFT and reward-model stages (metrics.jsonl of `ppomax sft` / `ppomax rm`).
STAGE_METRIC_DOCS: dict[str, str] = {
    "train/loss": "training loss (SFT: response-token NLL; RM: pairwise loss + β_rm · LM loss), mean since the last log",
    "train/pair_loss": "RM: −log σ(r_w − r_l) (Eq. 2)",
    "train/lm_loss": "RM with rm_lm_coef > 0: NLL of the chosen response",
    "train/accuracy": "RM: share of training pairs with r_w > r_l",
    "eval/loss": "held-out loss (SFT: token-mean NLL of response tokens; RM: pairwise loss)",
    "eval/perplexity": "SFT: exp(eval/loss)",
    "eval/accuracy": "RM: held-out pairwise accuracy (the paper warns it alone does not predict PPO success)",
    "eval/margin": "RM: mean r_w − r_l on held-out pairs",
    "grad_norm": "global gradient norm before clipping",
    "lr": "learning rate after the schedule step",
    "epoch": "fractional epoch",
}


METRICS_DOC_START, METRICS_DOC_END = "<!-- generated: METRIC_DOCS -->", "<!-- end generated -->"


def update_metrics_doc(path: str | os.PathLike) -> None:
    """Rewrite the generated PPO table of docs/metrics.md (between the two markers) from the code."""
    text = Path(path).read_text(encoding="utf-8")
    head, rest = text.split(METRICS_DOC_START, 1)
    _, tail = rest.split(METRICS_DOC_END, 1)
    Path(path).write_text(f"{head}{METRICS_DOC_START}\n{metrics_table_markdown()}\n{METRICS_DOC_END}{tail}", encoding="utf-8")


def metrics_table_markdown() -> str:
    """Render :data:`METRIC_DOCS` as a markdown table (the body of ``docs/metrics.md``)."""
    rows = [[f"`{name}`", meaning, collapse] for name, (meaning, collapse) in METRIC_DOCS.items()]
    return "\n".join(["| metric | meaning | what a collapse looks like |", "|---|---|---|",
                      *("| " + " | ".join(r) + " |" for r in rows)])
