"""Pattern collapse across a policy's responses: word statistics over a whole set of responses.

A collapsed policy answers different prompts with one template (Zheng et al. 2023, Sec. 5.2: "fixed
generative patterns"). Each response can look fine on its own, so a score of one response at a time
(a reward model, a per-response judge) does not see it; these statistics compare the responses of
one policy with each other. They are text statistics, not tensor math, so they live here rather
than in ``ppomax.functional``; ``docs/metrics.md`` gives each formula and what collapse looks like.

Words (:func:`words`): the lower-cased runs of letters and digits (an inner apostrophe kept:
"don't"), so case and punctuation never make two texts differ. n-grams never cross two responses.

- :func:`distinct_n`: distinct n-grams / all n-grams over the set (Li et al. 2016, distinct-1/-2).
- :func:`similarity_to_others`: per response, its mean Jaccard overlap with the other responses
  (word 1- and 2-gram sets); :func:`self_similarity` is their mean, the mean pairwise overlap.
- :func:`template_share`: the share of responses that open with the set's most common first k words.

Every statistic depends on the number of responses and their length: compare sets of the same
size (one sample per prompt of the same prompts), as ``ppomax eval`` and the studies do.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
TEMPLATE_WORDS = 4  # k of template_share: 3 words ("The sea is") repeat in natural answers to one template


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``: 'The sea, isn't it?' -> ['the', 'sea', "isn't", 'it']."""
    return _WORD.findall(text.lower())


def _ngrams(w: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]


def distinct_n(responses: Sequence[str], n: int) -> float:
    """|distinct n-grams| / |n-grams|, counted over all responses together (0.0 if none has n words).

    1 when no n-gram repeats anywhere in the set; a policy repeating one template gives ~1/N."""
    grams = [g for r in responses for g in _ngrams(words(r), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def gram_set(text: str) -> frozenset[tuple[str, ...]]:
    """The word 1-grams and 2-grams of ``text``: what :func:`similarity_to_others` compares.

    Unigrams make two one-word responses comparable ('yes' vs 'no' share nothing), bigrams add word
    order; the set is empty only for a text without words."""
    w = words(text)
    return frozenset(_ngrams(w, 1) + _ngrams(w, 2))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a ∩ b| / |a ∪ b|; 1.0 for two empty sets (two responses without words are the same)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def similarity_to_others(responses: Sequence[str], groups: Sequence[Hashable] | None = None) -> list[float]:
    """s_i = mean over the responses j with groups[j] ≠ groups[i] of jaccard(gram_set(r_i), gram_set(r_j)).

    ``groups``: e.g. each response's prompt, so that only responses to *other* prompts count (the
    SmolLM2 study's judge); None: every other response counts. s_i = 0.0 when there is no such j.
    O(N²) set operations: 128 responses take milliseconds."""
    n = len(responses)
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} responses")
    sets = [gram_set(r) for r in responses]
    total, count = [0.0] * n, [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            if groups is not None and groups[i] == groups[j]:
                continue
            s = jaccard(sets[i], sets[j])
            total[i] += s
            total[j] += s
            count[i] += 1
            count[j] += 1
    return [t / c if c else 0.0 for t, c in zip(total, count)]


def self_similarity(responses: Sequence[str]) -> float:
    """Mean pairwise Jaccard overlap of the responses' word 1- and 2-gram sets (0.0 for fewer than two).

    Equal to the mean over unordered pairs, since every response has the same N − 1 partners."""
    s = similarity_to_others(responses)
    return sum(s) / len(s) if len(s) > 1 else 0.0


def template_share(responses: Sequence[str], k: int = TEMPLATE_WORDS) -> float:
    """Share of the responses whose first ``k`` words (all of them if fewer) equal the most common
    such opening in the set (0.0 for no responses). 1/N when every response opens differently."""
    if not responses:
        return 0.0
    openings = Counter(tuple(words(r)[:k]) for r in responses)
    return max(openings.values()) / len(responses)


COLLAPSE_METRICS = ("distinct_1", "distinct_2", "self_similarity", "template_share")


def collapse_metrics(responses: Sequence[str]) -> dict[str, float]:
    """The four set-level collapse metrics (names as logged: ``eval/<name>`` during PPO)."""
    return {"distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2),
            "self_similarity": self_similarity(responses), "template_share": template_share(responses)}
