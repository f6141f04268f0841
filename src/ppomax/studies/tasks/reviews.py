"""The embedded ``reviews`` task: a toy review language with a deterministic gold judge.

The task stands in for real RLHF data so that the whole pipeline (SFT, reward model, PPO)
runs on a laptop CPU in minutes, while keeping the failure mode the PPO-max paper studies:
a learned reward model has blind spots that an unconstrained policy exploits.

Language
    A review is ``the NOUN was [not] [ADVERB] ADJ``, followed by 0-3 clauses
    ``(and|but|while) the NOUN was [not] [ADVERB] ADJ``, followed by the token ``.``.
    Tokens are separated by single spaces, e.g. ``the soup was great but the sauce was
    not very bad .``. Nouns come from two domains (food, movie); every clause noun must come
    from the same domain as the first noun. The end of a sequence is marked by the
    tokenizer's ``<eos>`` token, which is not part of the text.

Prompt / response
    The prompt is the opening ``the NOUN was``; the response is the rest of the review text.
    ppomax's convention: ``prompt_ids = tok(prompt).input_ids`` (which starts with ``<bos>``)
    and ``response_ids = tok(response, add_special_tokens=False).input_ids + [eos_id]``.

Gold judge (stands in for human raters)
    * A review is *well formed* if the full text ``prompt + " " + response`` is accepted by
      the grammar above (including the final ``.`` and the same-domain rule) and the response
      was not truncated (i.e. it ended with ``<eos>`` before the length cap).
    * Well formed: the score is VADER's ``compound`` polarity of the full review, in [-1, 1].
      Adjectives are VADER lexicon words (positive or negative) or neutral words absent
      from the lexicon; ``not`` flips and the adverbs (VADER boosters) amplify; VADER's
      ``but`` rule weighs the text after ``but`` more.
    * Otherwise the score is ``-1 - 0.5 * (1 - k / (n + 1))`` in [-1.5, -1), where ``n`` is
      the number of words in the response and ``k`` the number of them that belong to the
      longest prefix of the review that the grammar can still complete. The ``+ 1`` counts
      the end of the sequence as one more symbol, so a response that is a grammatical but
      unfinished (or truncated) review still scores below -1. Garbage scores -1.5, and the
      later the first error, the closer the score is to -1.

Cross-domain reviews ("the soup was great and the plot was great .") are malformed. A reward
model trained on well-formed samples rarely sees them, so it tends to score them high: the
reward hack that vanilla PPO finds and PPO-max's KL penalty guards against.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is heavy: import it only when a tokenizer is built
    from transformers import PreTrainedTokenizerFast

DOMAINS: dict[str, list[str]] = {
    "food": ["bread", "burger", "cake", "cheese", "coffee", "curry",
             "dessert", "pasta", "pizza", "salad", "sauce", "soup"],
    "movie": ["acting", "cast", "cinematography", "dialogue", "director", "editing",
              "ending", "music", "pacing", "plot", "script", "soundtrack"],
}  # fmt: skip
# VADER lexicon valence >= 1.8 (checked by the tests).
POSITIVE: list[str] = [
    "amazing", "awesome", "beautiful", "brilliant", "charming", "delicious", "delightful",
    "enjoyable", "excellent", "fabulous", "fantastic", "fun", "good", "gorgeous", "great",
    "impressive", "lovely", "nice", "outstanding", "perfect", "pleasant", "splendid",
    "superb", "terrific", "wonderful",
]  # fmt: skip
# VADER lexicon valence <= -1.7 (checked by the tests).
NEGATIVE: list[str] = [
    "annoying", "awful", "bad", "crappy", "disappointing", "disgusting", "dreadful", "dull",
    "gross", "horrendous", "horrible", "lame", "lousy", "miserable", "nasty", "painful",
    "pathetic", "poor", "rotten", "stupid", "terrible", "ugly", "weak",
]  # fmt: skip
# Not in the VADER lexicon and not VADER modifiers: they carry no sentiment.
NEUTRAL: list[str] = [
    "average", "cold", "dark", "familiar", "fast", "heavy", "hot", "light", "long", "loud",
    "plain", "quiet", "salty", "short", "simple", "slow", "spicy", "typical",
]  # fmt: skip
# VADER boosters (scalar +0.293), not lexicon words themselves.
ADVERBS: list[str] = ["absolutely", "extremely", "incredibly", "quite", "really", "totally", "very"]
CONJUNCTIONS: list[str] = ["and", "but", "while"]
FUNCTION_WORDS: list[str] = ["the", "was", "not", *CONJUNCTIONS, "."]
ADJECTIVES: list[str] = sorted(POSITIVE + NEGATIVE + NEUTRAL)
NOUN_DOMAIN: dict[str, str] = {noun: d for d, nouns in DOMAINS.items() for noun in nouns}
_ADJECTIVE_SET = frozenset(ADJECTIVES)
_ADVERB_SET = frozenset(ADVERBS)

SPECIAL_TOKENS: list[str] = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0, 1, 2, 3
VOCAB: list[str] = SPECIAL_TOKENS + FUNCTION_WORDS + sorted(NOUN_DOMAIN) + ADJECTIVES + ADVERBS

# Sampler knobs, chosen so that the corpus's mean gold score is close to 0.
P_NOT = 0.15
P_ADVERB = 0.3
CLAUSE_COUNT_WEIGHTS = (0.4, 0.3, 0.2, 0.1)  # P(0, 1, 2, 3 extra clauses)
MAX_CLAUSES = len(CLAUSE_COUNT_WEIGHTS) - 1
# Sentiment classes are drawn with equal probability, then a word uniformly within the class.
_ADJECTIVE_CLASSES = (POSITIVE, NEGATIVE, NEUTRAL)


# ----------------------------------------------------------------------------- sampling


def _sample_clause(rng: random.Random, domain: str) -> list[str]:
    words = ["the", rng.choice(DOMAINS[domain]), "was"]
    if rng.random() < P_NOT:
        words.append("not")
    if rng.random() < P_ADVERB:
        words.append(rng.choice(ADVERBS))
    words.append(rng.choice(rng.choice(_ADJECTIVE_CLASSES)))
    return words


def sample_review(rng: random.Random, domain: str | None = None) -> tuple[str, str]:
    """Sample one well-formed review; returns ``(prompt, response)``."""
    domain = domain if domain is not None else rng.choice(sorted(DOMAINS))
    words = _sample_clause(rng, domain)
    n_extra = rng.choices(range(MAX_CLAUSES + 1), weights=CLAUSE_COUNT_WEIGHTS)[0]
    for _ in range(n_extra):
        words += [rng.choice(CONJUNCTIONS), *_sample_clause(rng, domain)]
    words.append(".")
    return " ".join(words[:3]), " ".join(words[3:])


def sft_corpus(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` sampled reviews as ``{"prompt", "response"}`` rows (the SFT stage's format)."""
    rng = random.Random(seed)
    return [dict(zip(("prompt", "response"), sample_review(rng))) for _ in range(n)]


def prompts(n: int, seed: int) -> list[str]:
    """``n`` review openings ``the NOUN was`` (domain, then noun, uniformly at random)."""
    rng = random.Random(seed)
    return [f"the {rng.choice(DOMAINS[rng.choice(sorted(DOMAINS))])} was" for _ in range(n)]


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """Word-level ``PreTrainedTokenizerFast`` over :data:`VOCAB` (``<pad>``=0 ... ``<unk>``=3).

    ``tok(text)`` prepends ``<bos>`` (``add_special_tokens=False`` does not); nothing appends
    ``<eos>``: the pipeline adds it to responses itself. ``decode(ids, skip_special_tokens=True)``
    returns the single-spaced text exactly.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Registering the specials makes decode(skip_special_tokens=True) drop them; they keep
    # their vocabulary ids because they already are in the WordLevel vocabulary.
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", VOCAB.index("<bos>"))]
    )
    # No decoder on purpose: without one, `tokenizers` joins tokens with single spaces,
    # which is this language's surface form. (WordPiece/BPE decoders would glue " ." on.)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        # transformers' clean-up would turn "great ." into "great." and break round trips.
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class ParseResult:
    """Outcome of :func:`parse` on a full review text.

    ``n_valid`` is the length (in words) of the longest prefix that the grammar can still
    complete; ``error`` says why parsing stopped ("" when ``well_formed``).
    """

    well_formed: bool
    n_words: int
    n_valid: int
    domain: str | None
    n_clauses: int
    error: str


def parse(text: str) -> ParseResult:
    """Recognise ``text`` (prompt + " " + response, without special tokens) with the grammar."""
    words = text.split()
    domain: str | None = None
    n_clauses = 0
    # The grammar is LL(1): the state names what may come next; None means "rejected".
    state: str | None = "the"
    for i, w in enumerate(words):
        if state == "the":
            state = "noun" if w == "the" else None
        elif state == "noun":
            same_domain = w in NOUN_DOMAIN and NOUN_DOMAIN[w] == (domain or NOUN_DOMAIN[w])
            state, domain = ("was", NOUN_DOMAIN[w]) if same_domain else (None, domain)
        elif state == "was":
            state = "not" if w == "was" else None
        elif state in ("not", "adverb", "adjective"):  # [not] [ADVERB] ADJ
            if w == "not" and state == "not":
                state = "adverb"
            elif w in _ADVERB_SET and state != "adjective":
                state = "adjective"
            else:
                state = "conjunction" if w in _ADJECTIVE_SET else None
        elif state == "conjunction":
            if w == ".":
                state = "end"
            elif w in CONJUNCTIONS and n_clauses < MAX_CLAUSES:
                state, n_clauses = "the", n_clauses + 1
            else:
                state = None
        else:  # nothing may follow the final "."
            state = None
        if state is None:
            return ParseResult(False, len(words), i, domain, n_clauses, f"unexpected {w!r} at word {i}")
    done = state == "end"
    error = "" if done else "incomplete review (no final '.')"
    return ParseResult(done, len(words), len(words), domain, n_clauses, error)


def is_well_formed(prompt: str, response: str) -> bool:
    """True if ``prompt + " " + response`` is a complete review of the grammar."""
    return parse(f"{prompt} {response}").well_formed


# ----------------------------------------------------------------------------- gold judge

_ANALYZER = None


def _analyzer():
    """VADER's analyzer reads its lexicon file on construction: build it once, lazily."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def gold_score(prompt: str, response: str, truncated: bool = False) -> float:
    """Gold judgement of one review (rules in the module docstring): [-1, 1] if well
    formed and not truncated, else ``-1 - 0.5 * (1 - k / (n + 1))`` in [-1.5, -1)."""
    text = f"{prompt} {response}"
    result = parse(text)
    if result.well_formed and not truncated:
        return float(_analyzer().polarity_scores(text)["compound"])
    n_prompt = len(prompt.split())
    n = len(response.split())
    k = min(n, max(0, result.n_valid - n_prompt))
    return -1.0 - 0.5 * (1.0 - k / (n + 1))


def _truncation_flags(n: int, truncated: Sequence[bool] | None) -> Sequence[bool]:
    if truncated is None:
        return [False] * n
    if len(truncated) != n:
        raise ValueError(f"got {len(truncated)} truncation flags for {n} responses")
    return truncated


def gold_scores(
    prompts: Sequence[str], responses: Sequence[str], truncated: Sequence[bool] | None = None
) -> list[float]:
    """Batch :func:`gold_score`; ``truncated`` defaults to all False."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    flags = _truncation_flags(len(responses), truncated)
    return [gold_score(p, r, bool(t)) for p, r, t in zip(prompts, responses, flags)]


def well_formed_fraction(
    prompts: Sequence[str], responses: Sequence[str], truncated: Sequence[bool] | None = None
) -> float:
    """Fraction of reviews that are well formed and not truncated (0.0 for no reviews)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    flags = _truncation_flags(len(responses), truncated)
    good = sum(is_well_formed(p, r) and not t for p, r, t in zip(prompts, responses, flags))
    return good / len(responses) if responses else 0.0


# ----------------------------------------------------------------------------- preferences


def _sigmoid(x: float) -> float:
    # Branch so that exp never overflows for a huge |beta * margin|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def label_pairs(
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    gold_a: Sequence[float],
    gold_b: Sequence[float],
    beta: float,
    seed: int,
    truncated_a: Sequence[bool] | None = None,
    truncated_b: Sequence[bool] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Bradley-Terry preference labels from gold scores, like noisy human raters.

    Response a is preferred with probability ``sigmoid(beta * (gold_a - gold_b))``
    (``beta`` -> infinity: always the better one; ``beta = 0``: a coin flip). Pairs with
    identical responses carry no preference and are dropped; so are pairs with an empty side
    (a sample that was only EOS), which no preference-data format accepts as text. Returns
    ``(rows, n_dropped)`` with rows ``{"prompt", "chosen", "rejected"}``; with ``truncated_a`` /
    ``truncated_b`` (whether each sample hit the length cap) also ``chosen_truncated`` and
    ``rejected_truncated``, so that the ``rm`` stage gives a cut side no EOS.
    """
    n = len(prompts)
    if not (len(responses_a) == len(responses_b) == len(gold_a) == len(gold_b) == n):
        raise ValueError("prompts, responses and gold scores must have the same length")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    n_dropped = 0
    ta, tb = truncated_a or [False] * n, truncated_b or [False] * n
    for p, a, b, ga, gb, cut_a, cut_b in zip(prompts, responses_a, responses_b, gold_a, gold_b, ta, tb):
        # Draw for every pair, so a pair's label does not depend on which others were dropped.
        a_wins = rng.random() < _sigmoid(beta * (ga - gb))
        if a.strip() == b.strip() or not a.strip() or not b.strip():  # as the preference loader compares them
            n_dropped += 1
            continue
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
        if truncated_a is not None or truncated_b is not None:
            rows[-1].update(chosen_truncated=bool(cut_a if a_wins else cut_b),
                            rejected_truncated=bool(cut_b if a_wins else cut_a))
    return rows, n_dropped
