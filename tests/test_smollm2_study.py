"""The SmolLM2 study's task (issue #13): prompts, the gold judge and the targets. No model needed."""

from __future__ import annotations

import pytest

from ppomax import smollm2_study as S


def test_prompts_hold_out_whole_topics():
    train, held = S.prompts("train"), S.prompts("eval")
    assert len(train) == 4 * (len(S.TOPICS) - S.N_HELD_OUT_TOPICS) and len(held) == 4 * S.N_HELD_OUT_TOPICS == 128
    assert len(set(S.TOPICS)) == len(S.TOPICS)
    users = lambda ps: {p[1]["content"] for p in ps}  # noqa: E731
    assert not users(train) & users(held)
    assert all(p[0] == {"role": "system", "content": S.SYSTEM} for p in train + held)


def test_topic_words_from_any_rendering():
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDescribe a crowded train in one sentence.<|im_end|>\n<|im_start|>assistant\n"
    plain = "system\nBe brief.\nuser\nDescribe a crowded train in one sentence.\nassistant\n"
    assert S._topic_words(chatml) == S._topic_words(plain) == {"crowded", "train"}
    assert S._topic_words("Write one sentence about the sea.") == {"sea"}
    assert S._topic_words("Say something nice about Mondays.") == {"monday"}  # plural folded


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


def _methods(**over):
    m = {"base": {"gold": 0.2, "rm_reward": 1.0, "kl": 0.0},
         "ppo_max": {"gold": 0.5, "win_rate_ci": [0.55, 0.7], "kl": 2.0, "rm_reward": 2.0},
         "vanilla": {"gold": 0.1, "gold_peak": 0.6, "kl": 9.0, "rm_reward": 3.0}}
    for k, v in over.items():
        name, field = k.split("__")
        m[name][field] = v
    return m


def test_check_targets():
    ok, notes = S.check_targets(_methods())
    assert ok and len(notes) == 6 and all(n.startswith("✔") for n in notes)
    for over, failing in [({"ppo_max__win_rate_ci": [0.45, 0.6]}, "interval above 0.5"),
                          ({"vanilla__kl": 5.9}, "3×"),
                          ({"vanilla__gold": 0.55, "vanilla__gold_peak": 0.6}, "below its peak"),
                          ({"ppo_max__kl": 11.0, "vanilla__kl": 40.0}, "bounded")]:
        ok, notes = S.check_targets(_methods(**over))
        assert not ok and [n for n in notes if n.startswith("✘")] == [n for n in notes if failing in n]


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
