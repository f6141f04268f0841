"""Hand-derived checks of the set-level collapse metrics (ppomax.diversity; issue #24)."""

import pytest

from ppomax import diversity as D


def test_words_ignore_case_and_punctuation():
    assert D.words("The sea, isn't it? Sea_side 42!") == ["the", "sea", "isn't", "it", "sea", "side", "42"]
    assert D.words("Don’t STOP") == ["don’t", "stop"]
    assert D.words("...!") == [] and D.words("") == []


def test_distinct_n_by_hand():
    # words a b a | b a: unigrams a,b,a,b,a -> 2 distinct / 5; bigrams (a b),(b a) | (b a) -> 2 / 3.
    # Were n-grams to cross responses, (a b) across the boundary would make it 2 / 4.
    assert D.distinct_n(["a b a", "B, a."], 1) == pytest.approx(2 / 5)
    assert D.distinct_n(["a b a", "B, a."], 2) == pytest.approx(2 / 3)
    assert D.distinct_n(["x y z"] * 4, 1) == pytest.approx(3 / 12)  # one template: 1/N
    assert D.distinct_n(["x y z"] * 4, 2) == pytest.approx(2 / 8)
    assert D.distinct_n(["one", "two"], 2) == 0.0 and D.distinct_n([], 1) == 0.0  # no n-grams at all


R1, R2, R3 = "The sea is calm", "the sea is rough!", "A cat"


def test_gram_set_and_jaccard_by_hand():
    assert D.gram_set("A b") == {("a",), ("b",), ("a", "b")}
    # R1: the sea is calm + (the sea)(sea is)(is calm) = 7; R2 the same with rough: 7.
    # shared: the, sea, is, (the sea), (sea is) = 5; union 7 + 7 - 5 = 9.
    assert D.jaccard(D.gram_set(R1), D.gram_set(R2)) == pytest.approx(5 / 9)
    assert D.jaccard(D.gram_set(R1), D.gram_set(R3)) == 0.0
    assert D.jaccard(D.gram_set("yes"), D.gram_set("no")) == 0.0  # one-word answers compare by their word
    assert D.jaccard(D.gram_set(""), D.gram_set("?!")) == 1.0  # two texts without words are the same
    assert D.jaccard(D.gram_set(""), D.gram_set("a")) == 0.0


def test_similarity_to_others_by_hand():
    # pairs: (1,2) = 5/9, (1,3) = (2,3) = 0 -> per response the mean over its two partners
    assert D.similarity_to_others([R1, R2, R3]) == pytest.approx([5 / 18, 5 / 18, 0.0])
    # groups (e.g. prompts): only responses to another group count
    assert D.similarity_to_others([R1, R2, R3], groups=["p", "q", "p"]) == pytest.approx([5 / 9, 5 / 18, 0.0])
    assert D.similarity_to_others([R1, R2, R3], groups=["p", "p", "q"]) == pytest.approx([0.0, 0.0, 0.0])
    assert D.similarity_to_others([R1]) == [0.0] and D.similarity_to_others([]) == []  # no partner: 0
    with pytest.raises(ValueError, match="groups has 1 entries for 2 responses"):
        D.similarity_to_others([R1, R2], groups=["p"])


def test_self_similarity_is_the_mean_pairwise_overlap():
    assert D.self_similarity([R1, R2, R3]) == pytest.approx((5 / 9 + 0 + 0) / 3)
    assert D.self_similarity(["x y z"] * 5) == 1.0
    assert D.self_similarity([R1]) == 0.0 and D.self_similarity([]) == 0.0


def test_template_share_by_hand():
    rs = ["The sea is calm today", "the sea is calm.", "The sea is rough", "A cat"]
    assert D.template_share(rs, k=4) == pytest.approx(2 / 4)  # (the sea is calm) twice
    assert D.template_share(rs, k=3) == pytest.approx(3 / 4)  # (the sea is) three times
    assert D.template_share(rs, k=1) == pytest.approx(3 / 4)
    assert D.template_share(["a", "b", "c"]) == pytest.approx(1 / 3)  # all different: 1/N
    assert D.template_share(["", "!", "a"]) == pytest.approx(2 / 3)  # two empty openings
    assert D.template_share([]) == 0.0


def test_collapse_moves_every_metric_the_way_the_docs_say():
    varied = ["The sea is calm today.", "A forest smells of pine after rain.", "Coffee wakes me up slowly.",
              "Trains at night feel quiet and long."]
    template = [f"A beautiful and inspiring {x} with endless love makes every moment special!"
                for x in ("sea", "forest", "coffee", "train")]
    v, t = D.collapse_metrics(varied), D.collapse_metrics(template)
    assert list(v) == list(D.COLLAPSE_METRICS)
    assert v["distinct_1"] == 1.0 and v["distinct_2"] == 1.0 and v["template_share"] == 0.25
    assert t["distinct_1"] < 0.5 * v["distinct_1"] and t["distinct_2"] < 0.5 * v["distinct_2"]
    assert t["self_similarity"] > 0.5 > 0.1 > v["self_similarity"] and t["template_share"] == 1.0
