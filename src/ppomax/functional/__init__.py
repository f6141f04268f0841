"""Pure RL math for PPO-max: functions of tensors and masks, nothing else.

Conventions (paper: Zheng et al. 2023, arXiv 2307.04964, "Secrets of RLHF ... Part I: PPO"):

- ``mask`` is ``(B, T)``, 1.0 on response tokens and 0.0 elsewhere. Responses are right-padded,
  so the response tokens of row ``b`` are positions ``0 .. mask[b].sum() - 1``.
- ``logprobs`` are ``log π(a_t | s_t)`` of the sampled tokens, ``(B, T)``.
- Token losses are reduced by :func:`masked_mean` with an optional ``num_tokens`` normaliser:
  this is the one place that decides the reduction. Passing the token count of the whole
  mini-batch makes split-and-accumulate over micro-batches equal to the full mini-batch loss.

Nothing here knows about models, data or accelerate; every function is unit-tested against
hand-derived values in ``tests/test_functional.py``.

``ppomax.functional`` is the public contract: import every name from here. The code lives in
one submodule per kind of math:

- :mod:`~ppomax.functional.reductions`: masked sum / mean / variance, whitening;
- :mod:`~ppomax.functional.logprobs`: log-probabilities and entropy, from logits or chunked from
  hidden states;
- :mod:`~ppomax.functional.rewards`: KL estimators, reward shaping, score processing (Eq. 18),
  the adaptive KL controller;
- :mod:`~ppomax.functional.estimators`: GAE and the critic-free advantage estimators;
- :mod:`~ppomax.functional.losses`: policy, value and pairwise losses, explained variance.
"""

from __future__ import annotations

from ppomax.functional.estimators import gae, grpo_advantages, reinforce_pp_advantages, rloo_advantages
from ppomax.functional.logprobs import (
    CHUNK_LOGITS,
    chunked_logprobs,
    entropy_from_logits,
    logprobs_from_logits,
    next_token_nll,
)
from ppomax.functional.losses import (
    PolicyLossStats,
    ValueLossStats,
    explained_variance,
    pairwise_loss,
    policy_loss,
    value_loss,
)
from ppomax.functional.reductions import masked_mean, masked_sum, masked_var, whiten
from ppomax.functional.rewards import (
    AdaptiveKLController,
    RunningMoments,
    kl_penalty,
    last_token_index,
    normalize_and_clip,
    penalise_missing_eos,
    scale_rewards,
    shape_rewards,
)

__all__ = [
    "CHUNK_LOGITS", "AdaptiveKLController", "PolicyLossStats", "RunningMoments", "ValueLossStats",
    "chunked_logprobs", "entropy_from_logits", "explained_variance", "gae", "grpo_advantages", "kl_penalty",
    "last_token_index", "logprobs_from_logits", "masked_mean", "masked_sum", "masked_var", "next_token_nll",
    "normalize_and_clip", "pairwise_loss", "penalise_missing_eos", "policy_loss", "reinforce_pp_advantages",
    "rloo_advantages", "scale_rewards", "shape_rewards", "value_loss", "whiten",
]
