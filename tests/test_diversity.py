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


def test_ppo_evaluation_logs_them_and_calls_the_judge_once_with_every_held_out_response(tmp_path):
    """eval/<collapse metric> during PPO is the metric of the decoded held-out responses, and the gold
    judge sees all of them in one call (a set-level judge would see only one generation batch before)."""
    from ppomax.config import PPOConfig
    from ppomax.metrics_doc import METRIC_DOCS
    from ppomax.models import build_tiny_model
    from ppomax.ppo.trainer import PPOTrainer

    calls = []

    def set_judge(prompts, responses, truncated):  # gold = the size of the set it was given
        calls.append(list(responses))
        return [float(len(responses))] * len(responses)

    tiny = build_tiny_model(tmp_path / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    eval_prompts = [f"Say {w} words:" for w in ("some", "a few", "three", "two", "more", "odd")]
    cfg = PPOConfig.from_preset(
        "vanilla", model_name_or_path=str(tiny), output_dir=str(tmp_path / "run"), critic_init="sft", max_steps=1,
        rollout_batch_size=2, num_mini_batches=1, per_device_train_batch_size=2, generation_batch_size=2,
        response_length=6, eval_steps=1, report_to="none", disable_tqdm=True, num_sample_generations=0)
    rows = PPOTrainer(cfg, prompts=["hello there", "the cat"], reward_fn=lambda p, r: [len(x) for x in r],
                      gold_fn=set_judge, eval_prompts=eval_prompts).train()
    held_out = calls[-1]  # the last call is the evaluation's (the training batch's come first)
    assert len(held_out) == 6 and rows[-1]["eval/gold"] == 6.0  # 3 generation batches of 2, one judge call
    for name, value in D.collapse_metrics(held_out).items():
        assert rows[-1][f"eval/{name}"] == value and f"eval/{name}" in METRIC_DOCS


def test_ppomax_eval_reports_them_for_policy_and_baseline(tmp_path):
    import json

    from ppomax.cli import main
    from ppomax.data import write_jsonl
    from ppomax.models import ScalarHeadModel, build_tiny_model, load_tokenizer

    tiny = build_tiny_model(tmp_path / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    ScalarHeadModel.from_causal_lm(tiny).save_pretrained(tmp_path / "rm", tokenizer=load_tokenizer(tiny))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {w} words:"} for w in ("some", "three", "two", "odd", "x")])
    assert main(["eval", "--model_name_or_path", str(tiny), "--baseline_model_path", str(tiny), "--judge", "rm",
                 "--reward_model_path", str(tmp_path / "rm"), "--dataset", str(tmp_path / "p.jsonl"),
                 "--num_samples", "5", "--response_length", "8", "--output_dir", str(tmp_path / "ev"),
                 "--disable_tqdm"]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    expected = D.collapse_metrics([s["response"] for s in res["samples"]])  # all 5 responses are samples
    for name, value in expected.items():
        assert res["metrics"][name] == value
        assert res["baseline"][name] == value  # the baseline is the same model with the same seed
        assert f"| {name} | {value:.4g} | {value:.4g} |" in (tmp_path / "ev" / "eval.md").read_text()
