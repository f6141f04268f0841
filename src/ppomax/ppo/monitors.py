"""Collapse monitors (paper Sec. 5.2, App. A) and the collapse guard.

Reward and loss curves do not reveal over-optimisation; the paper's indicators are KL to the
reference rising, the policy's perplexity on its own samples falling, response length drifting
(often to the cap), and a long tail in the reward distribution. Metric names are fixed and
documented in docs/metrics.md (generated from ``ppomax.metrics_doc.METRIC_DOCS``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ppomax import functional as F

logger = logging.getLogger("ppomax")

# A metric logged only by ranks with something to measure -> the row metric that weighs each rank's value.
_WEIGHTED = {"reward/truncated_mean": "response/truncated_frac"}


def reduce_row(row: dict, d) -> dict:
    """The numeric metrics of a row over ranks: the mean (``*_max``: the max), each over the ranks that logged
    it, ``reward/truncated_mean`` weighted by each rank's truncated share (so it is the mean over every
    truncated response). reduce_floats needs the same keys in the same order on every rank, and a metric such
    as reward/truncated_mean exists only on a rank with truncated responses: all ranks reduce the documented
    names (METRIC_DOCS) in its order, then any others (present on every rank)."""
    from ppomax import distributed as dist_lib
    from ppomax.metrics_doc import METRIC_DOCS

    if not d.enabled:
        return row
    nums = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    names = list(METRIC_DOCS) + sorted(k for k in nums if k not in METRIC_DOCS)
    sums, maxima = {}, {}
    for k in names:
        if k.endswith("_max"):
            maxima[k] = nums.get(k, -math.inf)
        else:
            w = (nums.get(_WEIGHTED[k], 0.0) if k in _WEIGHTED else 1.0) if k in nums else 0.0
            sums[k], sums[f"{k}#weight"] = nums.get(k, 0.0) * w, w
    sums, maxima = dist_lib.reduce_floats(sums, d, "sum"), dist_lib.reduce_floats(maxima, d, "max")
    out = dict(row)
    for k in names:
        if k.endswith("_max"):
            if maxima[k] > -math.inf:
                out[k] = maxima[k]
        elif sums[f"{k}#weight"] > 0:
            out[k] = sums[k] / sums[f"{k}#weight"]
    return out


def _pct(x: torch.Tensor, q: float) -> float:
    return torch.quantile(x.double(), q).item() if x.numel() else float("nan")


# The Experience fields the monitors read, (B, T) or (B,); gathered over ranks by gather_experience.
_MONITORED = ("mask", "truncated", "logprobs", "ref_logprobs", "values", "scores", "processed_scores", "advantages",
              "returns")


def gather_experience(exp, d):
    """Every rank's rollout in one buffer (rank order) on every rank, holding the fields the monitors read.

    Percentiles, standard deviations, perplexity and explained variance of the whole batch are not
    means of the ranks' values, so a multi-process run's monitors are computed on the gathered batch
    and equal a one-process run's on the same responses. Ranks stop sampling at different lengths:
    (B, T) fields are right-padded with zeros (mask 0) to the widest rank's T."""
    from ppomax import distributed as dist_lib
    from ppomax.ppo.rollout import Experience

    T = int(dist_lib.reduce_floats({"T": float(exp.mask.shape[1])}, d, "max")["T"])
    fields = {}
    for name in _MONITORED:
        x = getattr(exp, name)
        if x is None:  # None on every rank alike: the same code path built every rank's buffer
            continue
        if x.dim() == 2:
            x = torch.nn.functional.pad(x.float(), (0, T - x.shape[1]))
        fields[name] = dist_lib.all_gather(x.float(), d)  # float: NCCL and gloo both take it
    fields["truncated"] = fields["truncated"] > 0.5
    empty = fields["scores"].new_zeros(fields["scores"].shape[0], 0, dtype=torch.long)  # the monitors read no ids
    return Experience(prompt_ids=empty, prompt_mask=empty, response_ids=empty, **fields)


def experience_metrics(exp, with_critic: bool = True, d=None) -> dict[str, float]:
    """Monitors of one experience buffer (before the update); ``with_critic=False`` (a critic-free
    estimator) leaves out the value and return statistics. ``d``: the processes (``distributed.Dist``);
    with several, every rank computes them on the gathered batch (:func:`gather_experience`), a collective
    that every rank must reach."""
    if d is not None and d.enabled:
        exp = gather_experience(exp, d)
    mask = exp.mask
    raw = exp.scores.float()
    lengths = mask.sum(-1)
    nll = -F.masked_mean(exp.logprobs, mask)  # token mean NLL of the policy on its own samples
    seq_kl = F.masked_sum(exp.logprobs - exp.ref_logprobs, mask, dim=-1)  # k1 summed per response
    m = {
        "reward/raw_mean": raw.mean().item(),
        "reward/raw_std": raw.std().item() if raw.numel() > 1 else 0.0,
        "reward/raw_p50": _pct(raw, 0.5),
        "reward/raw_p90": _pct(raw, 0.9),
        "reward/raw_p99": _pct(raw, 0.99),
        "reward/raw_max": raw.max().item(),
        "kl/ref": seq_kl.mean().item(),
        "policy/perplexity": math.exp(min(nll.item(), 50.0)),
        "response/length_mean": lengths.mean().item(),
        "response/truncated_frac": exp.truncated.float().mean().item(),
    }
    if exp.truncated.any():  # the RM never saw a response without EOS: is the cap being exploited?
        m["reward/truncated_mean"] = raw[exp.truncated].mean().item()
    if exp.processed_scores is not None:
        m["reward/processed_mean"] = exp.processed_scores.float().mean().item()
    if exp.advantages is not None:
        m["adv/mean"] = F.masked_mean(exp.advantages, mask).item()
        m["adv/std"] = F.masked_var(exp.advantages, mask).sqrt().item()
    if exp.advantages is not None and with_critic:
        m["returns/mean"] = F.masked_mean(exp.returns, mask).item()
        m["returns/std"] = F.masked_var(exp.returns, mask).sqrt().item()
        m["critic/explained_variance"] = F.explained_variance(exp.values, exp.returns, mask).item()
        m["critic/value_mean"] = F.masked_mean(exp.values, mask).item()
    return m


def judge_rollouts(gold_fn, prompts: list[str], responses: list[str], truncated: list[bool],
                   d=None) -> tuple[list[float], list[float]]:
    """The judge's scores of this rank's responses, and of the whole batch: with several processes the
    texts are gathered and every rank judges the whole batch, so a set-level judge (the SmolLM2 study's
    similarity term) sees every response of the iteration and every rank logs the same ``gold/*``."""
    from ppomax import distributed as dist_lib

    mine = [prompts, responses, truncated]
    parts = dist_lib.gather_json(mine, d) if d is not None else [mine]
    every = [sum((p[i] for p in parts), []) for i in range(3)]
    gold = [float(x) for x in gold_fn(*every)]
    start = sum(len(p[0]) for p in parts[: d.rank]) if d is not None and d.enabled else 0
    return gold[start : start + len(prompts)], gold


def gold_metrics(gold: list[float]) -> dict[str, float]:
    """The judge's mean score, and the share it accepts as well formed (a gold score >= −1)."""
    g = torch.tensor(gold, dtype=torch.float64)
    return {"gold/mean": g.mean().item(), "gold/well_formed": (g >= -1.0).float().mean().item()}


def write_samples(path, row: dict, prompts: list[str], responses: list[str], scores: list[float],
                  gold: list[float] | None) -> None:
    """Append one JSON line per sample generation to samples.jsonl (the report's start/middle/end)."""
    import json

    with open(path, "a", encoding="utf-8") as fh:
        for i in range(len(prompts)):
            fh.write(json.dumps({"step": row["step"], "ppo_step": row["ppo_step"], "phase": row["phase"],
                                 "prompt": prompts[i], "response": responses[i], "score": scores[i],
                                 "gold": gold[i] if gold else None}) + "\n")


def write_sample_rows(path, row: dict, exp, n: int, decode, gold: list[float] | None) -> None:
    """The first ``n`` responses of the rollout ``exp`` (a ppo/rollout.Experience) into samples.jsonl, as text
    (``decode``: (prompt_ids, prompt_mask, response_ids, mask) -> (prompts, responses)), with their scores and
    the judge's ``gold`` scores when there is a judge."""
    n = min(n, exp.scores.numel())
    if n:
        texts = decode(exp.prompt_ids[:n], exp.prompt_mask[:n], exp.response_ids[:n], exp.mask[:n])
        write_samples(path, row, *texts, exp.scores[:n].tolist(), gold)


@dataclass
class CollapseGuard:
    """Thresholds on the monitors; ``check`` returns the reasons a step looks collapsed.

    The perplexity threshold is relative to the first PPO step's perplexity (the SFT policy's),
    the reward-tail one (``max_tail_ratio``, None: off) to the first step's raw p99 − p50.
    """

    max_kl: float
    min_ppl_ratio: float
    max_truncated: float
    max_tail_ratio: float | None = None
    start_ppl: float | None = None
    start_truncated: float | None = None
    start_tail: float | None = None
    last_warning: int = -10**9  # iteration of the last collapse warning in the log (not checkpointed)

    def act(self, row: dict, mode: str, iteration: int) -> str | None:
        """The guard's decision on a PPO row under ``mode`` (--collapse_guard): None, 'rollback' or 'stop'.
        The reasons go into ``row["collapse"]``; the log gets the first signal, then (under 'warn') at most
        one every 25 iterations: every signal is in metrics.jsonl."""
        if mode == "off":
            return None
        reasons = self.check(row)
        if not reasons:
            return None
        row["collapse"] = reasons
        if mode != "warn" or iteration - self.last_warning >= 25:
            self.last_warning = iteration
            logger.warning("iteration %d: collapse signal: %s", iteration, "; ".join(reasons))
        return None if mode == "warn" else mode

    def check(self, metrics: dict[str, float]) -> list[str]:
        reasons = []
        ppl = metrics.get("policy/perplexity")
        trunc = metrics.get("response/truncated_frac", 0.0)
        if self.start_ppl is None and ppl is not None:
            self.start_ppl = ppl
        if self.start_truncated is None:
            self.start_truncated = trunc
        tail = None
        if "reward/raw_p99" in metrics and "reward/raw_p50" in metrics:
            tail = metrics["reward/raw_p99"] - metrics["reward/raw_p50"]
            if self.start_tail is None:
                self.start_tail = tail
        if metrics.get("kl/ref", 0.0) > self.max_kl:
            reasons.append(f"KL to reference {metrics['kl/ref']:.2f} > {self.max_kl}")
        if ppl is not None and self.start_ppl and ppl < self.min_ppl_ratio * self.start_ppl:
            reasons.append(f"perplexity {ppl:.2f} < {self.min_ppl_ratio} × start {self.start_ppl:.2f}")
        # Relative to the start: an SFT policy that already runs into a short cap is not a collapse.
        if trunc > self.max_truncated and trunc > self.start_truncated + 0.2:
            reasons.append(f"{trunc:.0%} of responses hit the length cap (start {self.start_truncated:.0%})")
        if self.max_tail_ratio is not None and tail is not None and self.start_tail and tail > self.max_tail_ratio * self.start_tail:
            reasons.append(f"reward tail p99 − p50 = {tail:.3g} > {self.max_tail_ratio} × start {self.start_tail:.3g}")
        return reasons

    def state_dict(self) -> dict:
        return {"start_ppl": self.start_ppl, "start_truncated": self.start_truncated, "start_tail": self.start_tail}

    def load_state_dict(self, state: dict) -> None:
        self.start_ppl = state.get("start_ppl")
        self.start_truncated = state.get("start_truncated")
        self.start_tail = state.get("start_tail")
