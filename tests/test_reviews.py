"""Tests for the embedded ``reviews`` task (grammar, tokenizer, gold judge, labels)."""

from __future__ import annotations

import statistics

import pytest

from ppomax.studies.tasks import reviews as R

P = "the soup was"


@pytest.fixture(scope="module")
def tok():
    return R.build_tokenizer()


@pytest.fixture(scope="module")
def corpus():
    return R.sft_corpus(2000, seed=0)


# ----------------------------------------------------------------------------- word lists


def test_word_lists_match_vader():
    from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE, SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    assert (len(R.POSITIVE), len(R.NEGATIVE), len(R.NEUTRAL), len(R.ADVERBS)) == (25, 23, 18, 7)
    assert all(lexicon[w] >= 1.5 for w in R.POSITIVE)
    assert all(lexicon[w] <= -1.5 for w in R.NEGATIVE)
    # Everything else must be sentiment-free to VADER, except its own modifiers.
    plain = R.NEUTRAL + sorted(R.NOUN_DOMAIN) + ["the", "was", "and", "while"]
    assert not [w for w in plain if w in lexicon or w in BOOSTER_DICT or w in NEGATE]
    assert all(BOOSTER_DICT.get(w, 0) > 0 and w not in lexicon for w in R.ADVERBS)
    assert "not" in NEGATE
    for words in (R.POSITIVE, R.NEGATIVE, R.NEUTRAL, R.ADVERBS, *R.DOMAINS.values()):
        assert words == sorted(words) and all(w.isalpha() and w.islower() for w in words)
    assert all(len(nouns) == 12 for nouns in R.DOMAINS.values())


def test_vocabulary():
    assert len(R.VOCAB) == len(set(R.VOCAB)) == 108
    assert R.VOCAB[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_deterministic_by_seed(corpus):
    assert R.sft_corpus(50, seed=0) == corpus[:50]
    assert R.sft_corpus(50, seed=1) != corpus[:50]
    assert R.prompts(20, seed=3) == R.prompts(20, seed=3) != R.prompts(20, seed=4)


def test_sampled_reviews_are_well_formed(corpus):
    assert R.well_formed_fraction([r["prompt"] for r in corpus], [r["response"] for r in corpus]) == 1.0
    results = [R.parse(f"{r['prompt']} {r['response']}") for r in corpus]
    assert {res.n_clauses for res in results} == {0, 1, 2, 3}
    assert {res.domain for res in results} == {"food", "movie"}
    for row in corpus[:20]:
        assert row["prompt"].startswith("the ") and row["prompt"].endswith(" was")
        assert len(row["prompt"].split()) == 3 and row["response"].endswith(" .")


def test_sample_review_respects_domain():
    import random

    rng = random.Random(0)
    for _ in range(50):
        prompt, response = R.sample_review(rng, domain="movie")
        assert R.parse(f"{prompt} {response}").domain == "movie"


def test_prompts_are_openings():
    ps = R.prompts(200, seed=0)
    assert all(p.split()[0] == "the" and p.split()[2] == "was" and p.split()[1] in R.NOUN_DOMAIN for p in ps)
    assert {R.NOUN_DOMAIN[p.split()[1]] for p in ps} == {"food", "movie"}


def test_corpus_mean_gold_near_zero(corpus):
    gold = R.gold_scores([r["prompt"] for r in corpus], [r["response"] for r in corpus])
    assert abs(statistics.mean(gold)) < 0.15
    assert all(-1 <= g <= 1 for g in gold)
    # Mixed sentiment: both signs and neutral reviews are common.
    assert sum(g > 0.05 for g in gold) > 600 and sum(g < -0.05 for g in gold) > 600
    assert sum(g == 0 for g in gold) > 100


# ----------------------------------------------------------------------------- grammar / gold


def test_parse_accepts_and_rejects():
    assert R.is_well_formed(P, "not very bad but the sauce was great .")
    assert R.is_well_formed(P, "salty and the cake was good while the bread was bad but the curry was nice .")
    assert not R.is_well_formed(P, "great and the plot was great .")  # cross-domain
    assert not R.is_well_formed(P, "great")  # no final period
    assert not R.is_well_formed(P, "great . great")  # text after the period
    assert not R.is_well_formed(P, "not not great .")
    assert not R.is_well_formed(P, "very not great .")  # order is [not] [ADVERB]
    assert not R.is_well_formed(P, "great" + " and the cake was good" * 4 + " .")  # 4 clauses
    res = R.parse(f"{P} great and the plot was great .")
    assert (res.well_formed, res.n_valid, res.domain) == (False, 6, "food") and "plot" in res.error


def test_gold_of_clear_reviews():
    assert R.gold_score(P, "great .") > 0.5
    assert R.gold_score(P, "very great and the cake was delicious .") > 0.8
    assert R.gold_score(P, "terrible .") < -0.3
    assert R.gold_score(P, "not great .") < -0.3  # negation flips
    assert R.gold_score(P, "salty .") == 0.0
    assert R.gold_score(P, "great .") == R.gold_score(P, "great .")


def test_malformed_scores_below_minus_one_and_graded():
    assert R.gold_score(P, "great and the plot was great .") < -1  # cross-domain
    assert R.gold_score(P, "great") < -1  # missing period
    assert R.gold_score(P, "zzz qqq .") == -1.5  # garbage
    assert R.gold_score(P, "") == -1.5
    assert R.gold_score(P, "great .", truncated=True) < -1
    # Formula: -1 - 0.5 * (1 - k / (n + 1)).
    assert R.gold_score(P, "great and the") == pytest.approx(-1 - 0.5 * (1 - 3 / 4))
    assert R.gold_score(P, "great the the") == pytest.approx(-1 - 0.5 * (1 - 1 / 4))
    # The later the first error, the higher (less bad) the score.
    assert R.gold_score(P, "great the the") < R.gold_score(P, "great and the")
    assert R.gold_score(P, "zzz and the") < R.gold_score(P, "great the the")
    assert R.gold_scores([P, P], ["great .", "great"], truncated=[False, False]) == [
        R.gold_score(P, "great ."),
        R.gold_score(P, "great"),
    ]


def test_well_formed_fraction_counts_truncation():
    ps, rs = [P] * 4, ["great .", "bad .", "great", "nice ."]
    assert R.well_formed_fraction(ps, rs) == 0.75
    assert R.well_formed_fraction(ps, rs, truncated=[True, False, False, False]) == 0.5
    with pytest.raises(ValueError):
        R.well_formed_fraction(ps, rs, truncated=[True])


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_specials(tok):
    assert len(tok) == len(R.VOCAB)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.model_max_length == 64
    assert tok(P).input_ids == [1, *(R.VOCAB.index(w) for w in P.split())]
    assert tok(P, add_special_tokens=False).input_ids == [R.VOCAB.index(w) for w in P.split()]
    assert tok("the soup was yummy").input_ids[-1] == tok.unk_token_id
    # Every grammar word is in the vocabulary.
    assert tok.unk_token_id not in tok(" ".join(R.VOCAB[4:]), add_special_tokens=False).input_ids


def test_tokenizer_round_trip(tok, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for row in corpus[:100]:
        prompt_ids = tok(row["prompt"]).input_ids
        response_ids = tok(row["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert tok.decode(response_ids, skip_special_tokens=True) == row["response"]
        assert (
            tok.decode(prompt_ids + response_ids, skip_special_tokens=True)
            == f"{row['prompt']} {row['response']}"
        )
        assert loaded(row["prompt"]).input_ids == prompt_ids
        assert loaded(row["response"], add_special_tokens=False).input_ids == response_ids[:-1]
        assert loaded.decode(response_ids, skip_special_tokens=True) == row["response"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert loaded.get_vocab() == tok.get_vocab() and loaded.model_max_length == 64


# ----------------------------------------------------------------------------- preferences


def _pairs(n: int):
    rows = R.sft_corpus(2 * n, seed=5)
    prompts = [r["prompt"] for r in rows[:n]]
    a = [r["response"] for r in rows[:n]]
    b = [r["response"] for r in rows[n:]]
    return prompts, a, b, R.gold_scores(prompts, a), R.gold_scores(prompts, b)


def _gold_order(rows):
    """Per row: +1 if chosen has the higher gold score, -1 if lower, 0 on ties."""
    signs = []
    for r in rows:
        diff = R.gold_score(r["prompt"], r["chosen"]) - R.gold_score(r["prompt"], r["rejected"])
        signs.append((diff > 0) - (diff < 0))
    return signs


def test_label_pairs_huge_beta_follows_gold():
    rows, dropped = R.label_pairs(*_pairs(400), beta=1e6, seed=0)
    assert len(rows) + dropped == 400 and len(rows) > 350
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert min(_gold_order(rows)) >= 0  # never prefers the worse response


def test_label_pairs_beta_zero_is_a_coin_flip():
    pairs = _pairs(1000)
    rows, dropped = R.label_pairs(*pairs, beta=0.0, seed=0)
    signs = [s for s in _gold_order(rows) if s != 0]
    assert 0.4 < signs.count(1) / len(signs) < 0.6
    assert R.label_pairs(*pairs, beta=0.0, seed=0) == (rows, dropped)  # deterministic
    assert R.label_pairs(*pairs, beta=0.0, seed=1) != (rows, dropped)


def test_label_pairs_moderate_beta_and_drops():
    rows, _ = R.label_pairs(*_pairs(1000), beta=5.0, seed=0)
    signs = [s for s in _gold_order(rows) if s != 0]
    assert 0.7 < signs.count(1) / len(signs) < 0.97  # noisy but informative, like raters
    rows, dropped = R.label_pairs(
        [P, P], ["great .", "bad ."], ["great .", "nice ."], [0.6, -0.5], [0.6, 0.4], 5.0, 0
    )
    assert dropped == 1 and len(rows) == 1
    assert {rows[0]["chosen"], rows[0]["rejected"]} == {"bad .", "nice ."}
    # responses equal up to whitespace are a tie too: the preference loader would reject the row
    rows, dropped = R.label_pairs([P], [" great ."], ["great . "], [0.6], [0.4], 5.0, 0)
    assert (rows, dropped) == ([], 1)
    with pytest.raises(ValueError):
        R.label_pairs([P], ["great ."], [], [0.6], [], 1.0, 0)


def test_label_pairs_carry_each_sides_truncation():
    # huge beta: the higher gold wins; the flags follow their sample to the chosen / rejected side
    args = ([P, P, P], ["great .", "bad", "fine ."], ["bad .", "great", "nice ."], [1.0, -1.0, 0.0], [-1.0, 1.0, 0.5])
    rows, _ = R.label_pairs(*args, 1e6, 0, truncated_a=[True, True, False], truncated_b=[False, False, True])
    assert [(r["chosen"], r["chosen_truncated"], r["rejected_truncated"]) for r in rows] == [
        ("great .", True, False), ("great", False, True), ("nice .", True, False)]
    assert "chosen_truncated" not in R.label_pairs(*args, 1e6, 0)[0][0]  # without the flags: the plain rows


def test_label_pairs_drops_pairs_with_an_empty_response():
    rows, dropped = R.label_pairs(
        ["the soup was"] * 3, ["great .", "", "bad ."], ["bad .", "good .", " "], [0.6, -1.5, -0.5], [-0.5, 0.4, -1.5],
        beta=5.0, seed=0,
    )
    assert dropped == 2 and len(rows) == 1
    assert rows[0]["chosen"] and rows[0]["rejected"]
