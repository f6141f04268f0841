"""The SmolLM2 study's task (issues #13, #24): prompts, the gold judge and the targets. No model needed."""

from __future__ import annotations

import pytest

from ppomax.studies import smollm2_results as R
from ppomax.studies import smollm2_study as S
from ppomax.studies import smollm2_targets as G
from ppomax.studies import smollm2_task as T


def test_prompts_hold_out_whole_topics():
    train, held, dev = S.prompts("train"), S.prompts("eval"), S.prompts("dev")
    assert len(train) == 4 * (len(S.TOPICS) - S.N_HELD_OUT_TOPICS) and len(held) == 4 * S.N_HELD_OUT_TOPICS == 128
    assert len(dev) == 4 * len(S.DEV_TOPICS) == S.FULL.n_dev_prompts == 24
    assert len(set(S.TOPICS + S.DEV_TOPICS)) == len(S.TOPICS) + len(S.DEV_TOPICS)
    users = lambda ps: {p[1]["content"] for p in ps}  # noqa: E731
    assert not users(train) & users(held) and not users(dev) & (users(train) | users(held))
    assert all(p[0] == {"role": "system", "content": S.SYSTEM} for p in train + held + dev)


def test_topic_words_from_any_rendering():
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDescribe a crowded train in one sentence.<|im_end|>\n<|im_start|>assistant\n"
    plain = "system\nBe brief.\nuser\nDescribe a crowded train in one sentence.\nassistant\n"
    assert T.topic_words(chatml) == T.topic_words(plain) == {"crowded", "train"}
    assert T.topic_words("Write one sentence about the sea.") == {"sea"}
    assert T.topic_words("Say something nice about Mondays.") == {"monday"}  # plural folded


def test_repetition_by_hand():
    assert S.repetition("The sea is calm today.") == 0.0
    assert S.repetition("the sea sea sea") == pytest.approx(1 - 2 / 4)  # words of 3+ letters: the, sea ×3
    assert S.repetition("great great great great") == pytest.approx(3 / 4)
    assert S.repetition("ok") == 0.0


def test_gold_judge_terms():
    pytest.importorskip("vaderSentiment")
    j = S.GoldJudge()
    vader = j.vader.polarity_scores
    p = "Write one sentence about the sea."
    assert j.score(p, "The sea is calm.") == pytest.approx(vader("The sea is calm.")["compound"] + 0.5)
    assert j.score(p, "The sky is calm.") == pytest.approx(vader("The sky is calm.")["compound"])  # off topic
    loop = "The sea is lovely lovely lovely lovely"
    assert j.score(p, loop) == pytest.approx(vader(loop)["compound"] + 0.5 - 2 * (3 / 6))  # 6 words, 3 repeats
    assert j.score(p, "ok") == -1.0 and j.score(p, "") == -1.0  # degenerate
    # the blind spot: repetitive praise scores lower than one plain, positive, on-topic sentence
    assert j.score(p, "wonderful wonderful wonderful amazing amazing") < j.score(p, "The sea is lovely.")
    assert j([p, p], ["The sea is calm.", "ok"], [True, False]) == [j.score(p, "The sea is calm."), -1.0]


def test_gold_judge_set_level_term_by_hand():
    """gold_i = score_i − 2 · similarity_i, the similarity over responses to *other* prompts only
    (hand values of the overlaps: tests/test_diversity.py::test_similarity_to_others_by_hand)."""
    pytest.importorskip("vaderSentiment")
    j = S.GoldJudge()
    pa, pb = "Write one sentence about the sea.", "Describe a forest in one sentence."
    rs = ["The sea is calm", "the sea is rough!", "A cat"]
    assert j.similarity([pa, pb, pa], rs) == pytest.approx([5 / 9, 5 / 18, 0.0])  # R1 and R3 share a prompt
    expected = [j.score(pa, rs[0]) - 2 * 5 / 9, j.score(pb, rs[1]) - 2 * 5 / 18, j.score(pa, rs[2])]
    assert j([pa, pb, pa], rs) == pytest.approx(expected)
    assert j([pa, pb], ["ok", "ok"]) == [-1.0, -1.0]  # degenerate: −1, no set term on top
    assert j([pa], [rs[0]]) == [j.score(pa, rs[0])]  # alone in its set: nothing to be similar to


def test_gold_judge_sees_the_template_the_reward_model_cannot():
    """The paper's pattern collapse: one positive, on-topic template for every prompt. Judged one response
    at a time (what a pair labeller sees, so what the RM can learn) it beats varied answers; with the
    set-level term it loses to them."""
    pytest.importorskip("vaderSentiment")
    j = S.GoldJudge()
    topics = ["a night train", "a windy hill", "a tea shop", "a fishing boat"]
    ps = [f"Write one sentence about {t}." for t in topics]
    template = [f"A beautiful and inspiring {t.split()[-1]} with endless love makes every moment special!" for t in topics]
    varied = ["The night train hums gently through the dark, sleepy countryside.",
              "The windy hill offers a fresh, wild view over the valley.",
              "A small tea shop smells of mint and warm honey cake.",
              "The fishing boat rocks softly in the calm blue morning harbour."]
    per_response = {n: sum(j.score(p, r) for p, r in zip(ps, rs)) / 4 for n, rs in (("t", template), ("v", varied))}
    with_set = {n: sum(j(ps, rs)) / 4 for n, rs in (("t", template), ("v", varied))}
    assert per_response["t"] > per_response["v"] + 0.5 and with_set["t"] < with_set["v"] - 0.5


def _methods(**over):
    m = {"base": {"gold": 0.2, "rm_reward": 1.0, "kl": 0.0, "distinct_2": 0.8},
         "ppo_max": {"gold": 0.5, "win_rate_ci": [0.55, 0.7], "kl": 2.0, "rm_reward": 2.0, "distinct_2": 0.7},
         "vanilla": {"gold": 0.1, "kl": 9.0, "rm_reward": 3.0, "distinct_2": 0.3}}
    for k, v in over.items():
        name, field = k.split("__")
        m[name][field] = v
    return m


DROP = {0: {"best": [1.0, 1.0, 1.0, 1.0], "final": [0.5, 0.4, 0.6, 0.5]}}  # per-prompt drops .5 .6 .4 .5
FLAT = {0: {"best": [0.5, 0.4, 0.6, 0.5], "final": [0.5, 0.4, 0.6, 0.5]}}  # best is the final checkpoint


def test_check_targets():
    gold = {"vanilla": DROP, "ppo_max": FLAT}
    ok, notes, details = G.check_targets(_methods(), gold)
    assert ok and len(notes) == 8 and all(n.startswith("✔") for n in notes), notes
    assert set(details) == {"vanilla_gold_drop", "stability_tax"}
    for over, failing in [({"ppo_max__win_rate_ci": [0.45, 0.6]}, "interval above 0.5"),
                          ({"ppo_max__gold": 0.2}, "PPO-max's gold is above"),
                          ({"vanilla__kl": 5.9}, "3×"),
                          ({"ppo_max__distinct_2": 0.63}, "keeps its diversity"),
                          ({"vanilla__distinct_2": 0.41}, "vanilla collapses"),
                          ({"vanilla__rm_reward": 1.0}, "RM reward rose"),
                          ({"ppo_max__kl": 11.0, "vanilla__kl": 40.0}, "bounded")]:
        ok, notes, _ = G.check_targets(_methods(**over), gold)
        assert not ok and [n for n in notes if n.startswith("✘")] == [n for n in notes if failing in n], (over, notes)
    ok, notes, _ = G.check_targets(_methods(), {"vanilla": FLAT, "ppo_max": FLAT})  # vanilla never dropped
    assert not ok and [n for n in notes if n.startswith("✘")] == [n for n in notes if "below its own peak" in n]


def test_gold_drop_one_seed_is_judged_against_sampling_noise():
    d = G.gold_drop(DROP)
    # drops .5 .6 .4 .5: mean .5, s = sqrt(.02/3) = .08165, t(3) = 3.182 -> half 3.182 · .08165 / 2 = .1299
    assert d["drop"] == pytest.approx(0.5) and d["spread"] is None and d["holds"]
    assert d["ci"] == pytest.approx([0.5 - 0.1299, 0.5 + 0.1299], abs=1e-4) and "one seed" in d["rule"]
    noisy = G.gold_drop({0: {"best": [1.0, 1.0, 1.0, 1.0], "final": [0.0, 0.5, 0.5, 1.0]}})
    # drops 1 .5 .5 0: mean .5, s = sqrt(.5/3) = .4082, half 3.182 · .4082 / 2 = .6495 -> lower bound < 0
    assert noisy["drop"] == pytest.approx(0.5) and noisy["ci"][0] == pytest.approx(-0.1495, abs=1e-4)
    assert not noisy["holds"] and not G.gold_drop(FLAT)["holds"]


def test_gold_drop_over_seeds_beats_the_spread():
    two = {0: {"best": [1.0, 1.0], "final": [0.5, 0.5]}, 1: {"best": [0.9, 0.9], "final": [0.3, 0.3]}}
    d = G.gold_drop(two)  # drops .5 and .6 -> .55; spread of the finals .5 − .3 = .2
    assert d["drop"] == pytest.approx(0.55) and d["spread"] == pytest.approx(0.2) and d["holds"]
    two[1]["final"] = [-0.2, -0.2]  # drops .5 and 1.1 -> .8, spread .7: still holds
    assert G.gold_drop(two)["holds"]
    two[1] = {"best": [0.9, 0.9], "final": [0.9, 0.9]}  # drops .5 and 0 -> .25 < spread .4
    d = G.gold_drop(two)
    assert d["drop"] == pytest.approx(0.25) and d["spread"] == pytest.approx(0.4) and not d["holds"]


def test_stability_tax_by_hand():
    pm = {0: {"best": [1.0, 1.0, 1.0]}}
    tax = G.stability_tax({0: {"best": [1.0, 2.0, 3.0]}}, pm)
    # differences 0 1 2: mean 1, s = 1, t(2) = 4.303 -> [1 − 2.484, 1 + 2.484]: not above 0, the claim holds
    assert tax["value"] == pytest.approx(1.0) and tax["ci"] == pytest.approx([-1.4843, 3.4843], abs=1e-4)
    assert tax["claim_holds"] and G.stability_line(tax).startswith("✔")
    tax = G.stability_tax({0: {"best": [2.0, 2.1, 1.9]}}, pm)  # vanilla's best clearly better: a tax
    assert not tax["claim_holds"] and G.stability_line(tax).startswith("✘")


def test_mean_over_seeds_pools_the_win_rate():
    per = {0: {"gold": 1.0, "win_rate_vs_base": 1.0, "win_rate_ci": [0.3, 1.0], "kl": 2.0, "best_step": 16,
               "best": {k: 1.0 for k in R.BEST_KEYS}},
           1: {"gold": 0.0, "win_rate_vs_base": 0.5, "win_rate_ci": [0.1, 0.9], "kl": 4.0, "best_step": 32,
               "best": {k: 0.0 for k in R.BEST_KEYS}}}
    gold = {0: {"final": [1.0, 1.0]}, 1: {"final": [0.0, 0.5]}}
    m = R.mean_over_seeds(per, gold, base_gold=[0.5, 0.5])
    # wins: 1 > .5, 1 > .5, 0 < .5, .5 = .5 -> (2 + .5) / 4
    assert (m["gold"], m["kl"], m["win_rate_vs_base"], m["best_step"]) == (0.5, 3.0, 0.625, [16, 32])
    assert m["best"]["gold"] == 0.5 and m["seeds"]["1"] is per[1] and list(m)[:3] == ["gold", "win_rate_vs_base", "win_rate_ci"]
    assert R.mean_over_seeds({0: per[0]}, {0: gold[0]}, [0.5, 0.5]) == per[0]  # one seed: its own numbers


def test_best_checkpoint_is_the_one_best_json_names(tmp_path):
    import json

    from ppomax.ppo.best import best_checkpoint

    assert best_checkpoint(tmp_path) is None
    for n in (8, 16):
        (tmp_path / "best" / f"checkpoint-{n}").mkdir(parents=True)
        (tmp_path / "best" / f"checkpoint-{n}" / "COMPLETE").write_text("")
    assert best_checkpoint(tmp_path) is None  # no best.json: no guess (the study then reports the final one)
    (tmp_path / "best" / "best.json").write_text(json.dumps({"checkpoint": "checkpoint-8", "step": 8}))
    assert best_checkpoint(tmp_path).name == "checkpoint-8"  # the study uses the library's reader
    assert [S.run_name("vanilla", s, 0) for s in (0, 1)] == ["vanilla", "vanilla_seed1"]
    # checkpoint names count critic pre-training iterations; the report gives the PPO iteration
    rows = [{"step": 1, "ppo_step": 0, "phase": "critic_pretrain"}, {"step": 8, "ppo_step": 7, "phase": "ppo"}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert R.ppo_step(tmp_path, tmp_path / "best" / "checkpoint-8") == 7
    assert R.ppo_step(tmp_path, tmp_path / "best" / "checkpoint-16") == 16  # no row: the name's number


def test_stage_cache_keys_ignore_the_ppo_budget():
    import dataclasses

    b = S.FULL
    assert S._key(b, S.RM_FIELDS, 0) == S._key(dataclasses.replace(b, ppo_steps=3, learning_rate=1e-5), S.RM_FIELDS, 0)
    assert S._key(b, S.PAIR_FIELDS, 0) != S._key(dataclasses.replace(b, response_length=8), S.PAIR_FIELDS, 0)
    assert S._key(b, S.RM_FIELDS, 0) != S._key(dataclasses.replace(b, rm_lr=1e-4), S.RM_FIELDS, 0)
    assert S._key(b, S.PAIR_FIELDS, 0) != S._key(b, S.PAIR_FIELDS, 1)


def test_openings_steer_a_share_of_the_pairs_apart():
    o = S.openings(3000, 0.75, seed=0)
    assert o == S.openings(3000, 0.75, seed=0) and o != S.openings(3000, 0.75, seed=1)  # seeded
    plain = [p for p in o if p == ("", "")]
    steered = [p for p in o if p != ("", "")]
    assert len(plain) + len(steered) == 3000 and len(steered) / 3000 == pytest.approx(0.75, abs=0.03)
    pos, neg = S.STARTS["positive"], S.STARTS["negative"]
    assert all((a in pos and b in neg) or (a in neg and b in pos) for a, b in steered)  # always opposite signs
    assert sum(a in pos for a, _ in steered) / len(steered) == pytest.approx(0.5, abs=0.04)  # either side first
    assert S.openings(50, 0.0, seed=0) == [("", "")] * 50  # steer 0: two plain samples per pair
    assert {a for a, _ in S.openings(300, 1.0, seed=0)} == set(pos + neg)


def test_openings_move_the_judges_sentiment():
    pytest.importorskip("vaderSentiment")
    j = S.GoldJudge()
    for sign, starts in S.STARTS.items():  # each opening alone carries the sign it is meant to
        for o in starts:
            v = j.vader.polarity_scores(o)["compound"]
            assert (v > 0.3) if sign == "positive" else (v < -0.3), o


def test_ppo_runs_of_another_budget_are_not_reused(tmp_path):
    runs = tmp_path / "runs"
    key = {"budget": {"ppo_steps": 64}, "seed": 0}
    S._reset_runs_if_budget_changed(runs, key)
    (runs / "vanilla").mkdir()
    (runs / "vanilla" / "DONE").write_text("ok")
    S._reset_runs_if_budget_changed(runs, key)  # same budget: an interrupted or finished run is kept
    assert (runs / "vanilla" / "DONE").exists()
    S._reset_runs_if_budget_changed(runs, {"budget": {"ppo_steps": 128}, "seed": 0})
    assert not (runs / "vanilla").exists() and (runs / "budget.json").exists()
    (runs / "budget.json").unlink()
    (runs / "ppo_max").mkdir()
    S._reset_runs_if_budget_changed(runs, key)  # runs without a marker (older ppomax): not trusted
    assert not (runs / "ppo_max").exists()
