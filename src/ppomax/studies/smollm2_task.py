"""The SmolLM2 study's task: prompts, the openings that steer preference pairs apart, the gold judge.

Used by :mod:`ppomax.studies.smollm2_study` (``ppomax demo --model smollm2``); docs/real_models.md states
the judge and the targets (pre-registered before the full run of issue #24).

The judge's blind spots (paper Sec. 5.2: a proxy reward is over-optimised where it is wrong):
- per response: topicality and repetition. SmolLM2's samples rarely repeat themselves and nearly
  always stay on topic, so the preference pairs carry almost no signal about either;
- across responses (issue #24): the similarity of a response to the policy's answers to *other*
  prompts. A labeller compares two answers to one prompt and never sees the policy's other answers,
  so no preference pair can teach the reward model this term: the pairs are labelled by the
  per-response part alone (:meth:`GoldJudge.score`). A policy that answers every prompt with one
  template (the paper's pattern collapse) keeps its RM reward and loses gold.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

SYSTEM = "Be brief."  # not SmolLM2's default system prompt: that one adds ~13 tokens to every row (issue #13, item 3)
TEMPLATES = ("Write one sentence about {}.", "Describe {} in one sentence.", "Say something nice about {}.",
             "Tell me about {} in a few words.")
TOPICS = (
    "the sea", "a rainy afternoon", "morning coffee", "a city at night", "a forest", "Mondays", "learning to cook",
    "winter", "public transport", "a long queue", "an old bicycle", "homework", "a small garden", "a crowded train",
    "the desert", "a thunderstorm", "a neighbour's dog", "an empty beach", "waking up early", "a busy kitchen",
    "a mountain road", "waiting for a bus", "an autumn park", "a broken phone", "a library", "a quiet village",
    "running in the rain", "a football match", "a traffic jam", "the moon", "a birthday party", "a hospital",
    "a river", "a snowy street", "a job interview", "a lighthouse", "a Saturday market", "cold soup", "an airport",
    "a museum", "a violin", "a bakery", "a school bus", "a paper boat", "an old castle", "a farm", "a bridge",
    "a candle", "a picnic", "a train station", "a waterfall", "a cat", "a chess game", "a sunrise", "a tent",
    "a mailbox", "a garden party", "a bookshop", "a marathon", "a rooftop", "a harbour", "a meadow", "a piano",
    "a hot summer day", "a power cut", "an empty office", "a ferry", "a cinema", "a snowman", "a vegetable soup",
    "a wedding", "a zoo", "a laptop", "a storm at sea", "a playground", "a pair of shoes", "a river boat",
    "a camping trip", "a new city", "a dentist", "a lazy Sunday", "a mountain lake", "a street musician",
    "an orchard", "a swimming pool", "a clock tower", "a spring morning", "a pizza", "a subway", "a kite",
    "the stars", "a bus driver", "a science lesson", "an island", "a garden hose", "a coffee shop",
    # held out (never trained on): the evaluation prompts
    "a village bakery", "a night train", "a windy hill", "a tea shop", "a fishing boat", "a quiet street",
    "a jazz concert", "a tram", "a sailing trip", "a flower shop", "a frozen lake", "a bicycle ride",
    "a farmers' market", "a rainy morning", "an old bookshop", "a hiking trail", "a birthday cake", "a snowstorm",
    "a city park", "a stone bridge", "a beach café", "a long flight", "a country road", "a music lesson",
    "a summer night", "a ski slope", "a busy market", "a warm fire", "a small harbour", "a school trip",
    "a sunny balcony", "a late train",
)
N_HELD_OUT_TOPICS = 32
# Neither trained on nor reported: the prompts of the evaluations during PPO that pick each run's
# best checkpoint (issue #24), so that the report's prompts never select what they report.
DEV_TOPICS = ("a pottery class", "a ferris wheel", "an ice rink", "a hot air balloon", "a lemon tree", "a rowing club")
# Openings that steer a pair's two samples apart in sentiment: one begins with a positive one, the
# other with a negative one (the opening stays part of the response the judge and the RM read).
STARTS = {"positive": ("I love", "What a joy:", "Wonderfully,", "Happily,", "How lovely:", "I adore"),
          "negative": ("Sadly,", "Unfortunately,", "Regrettably,", "How awful:", "I hate", "Painfully,")}


def prompts(split: str) -> list[list[dict]]:
    """Chat prompts (system + user): 'train' = the first topics × templates, 'eval' = the held-out
    topics (the report's prompts), 'dev' = :data:`DEV_TOPICS` (best-checkpoint selection)."""
    topics = {"train": TOPICS[:-N_HELD_OUT_TOPICS], "eval": TOPICS[-N_HELD_OUT_TOPICS:], "dev": DEV_TOPICS}[split]
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t.format(x)}]
            for x in topics for t in TEMPLATES]


def openings(n: int, steer: float, seed: int) -> list[tuple[str, str]]:
    """Openings of each pair's two samples: with probability ``steer`` one positive and one negative
    STARTS entry (in random order), else both plain ("")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < steer:
            pos, neg = rng.choice(STARTS["positive"]), rng.choice(STARTS["negative"])
            out.append((pos, neg) if rng.random() < 0.5 else (neg, pos))
        else:
            out.append(("", ""))
    return out


# ---------------------------------------------------------------------------------------------
# The gold judge
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z']+")
_STOP = {"a", "an", "the", "of", "in", "at", "on", "for", "to", "old", "new", "small", "long", "busy", "quiet"}
SIMILARITY_WEIGHT = 2.0  # λ: as much as the within-response repetition weight (pre-registered, issue #24)


def topic_words(prompt: str) -> set[str]:
    """Content words of the prompt's topic, read back from any of the templates."""
    # a rendered ChatML prompt (with or without its special tokens), or the plain instruction
    user = prompt.split("user\n")[-1].split("<|im_end|>")[0].strip().split("\n")[0]
    for t in TEMPLATES:
        head, tail = t.split("{}")
        if user.startswith(head) and user.endswith(tail):
            user = user[len(head): len(user) - len(tail)]
            break
    return {w.rstrip("s") for w in _WORD.findall(user.lower()) if w not in _STOP and len(w) > 2}


def repetition(text: str) -> float:
    """Share of the words (3+ letters) that repeat an earlier word: 0 for varied text, → 1 for a loop."""
    words = [w for w in _WORD.findall(text.lower()) if len(w) > 2]
    return 0.0 if len(words) < 2 else 1.0 - len(set(words)) / len(words)


class GoldJudge:
    """gold = VADER sentiment (−1…1) + 0.5 · on-topic − 2 · repetition − 2 · similarity to the other prompts' answers.

    Callable as a ppomax ``gold_fn(prompts, responses, truncated)`` on one policy's set of
    responses. similarity_i = the mean, over the responses j of the same call whose prompt differs
    from response i's, of the Jaccard overlap of their word 1- and 2-gram sets
    (:func:`ppomax.diversity.similarity_to_others`). Degenerate text (fewer than two words) scores
    −1 whatever its sentiment. :meth:`score` is the per-response part (the pairs' labels).
    """

    similarity_weight = SIMILARITY_WEIGHT

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.vader = SentimentIntensityAnalyzer()

    def degenerate(self, response: str) -> bool:
        return len(_WORD.findall(response.lower())) < 2

    def score(self, prompt: str, response: str) -> float:
        """The per-response part: what a labeller comparing two answers to one prompt can judge."""
        if self.degenerate(response):
            return -1.0
        on_topic = bool(topic_words(prompt) & {w.rstrip("s") for w in _WORD.findall(response.lower())})
        return self.vader.polarity_scores(response)["compound"] + 0.5 * on_topic - 2.0 * repetition(response)

    def similarity(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The set-level term's similarity_i of each response (responses to the same prompt excluded)."""
        from ppomax.diversity import similarity_to_others

        return similarity_to_others(responses, groups=prompts)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 truncated: Sequence[bool] | None = None) -> list[float]:
        # Truncation is not judged: at the study's 24-token cap most of SmolLM2's answers are cut (it is
        # reported as `truncated`); PPO-max's missing_eos_penalty acts on it through the reward instead.
        sim = self.similarity(prompts, responses)
        return [self.score(p, r) - (0.0 if self.degenerate(r) else self.similarity_weight * s)
                for p, r, s in zip(prompts, responses, sim)]
