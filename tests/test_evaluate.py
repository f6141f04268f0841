"""One evaluation accumulator (issue #25 item 3): ``ppomax.evaluate.sample_and_score`` is the loop of
every evaluation (eval during PPO, ``ppomax eval``, the studies' evaluators through
``sample_responses``), the one place of the RNG rule, and :class:`ppomax.evaluate.Baseline` the one
base-vs-policy comparison."""

from __future__ import annotations

import random

import pytest
import torch

from ppomax import evaluate as E
from ppomax.config import PPOConfig
from ppomax.models import build_tiny_model, load_causal_lm, load_tokenizer

PROMPTS = ["hello there", "the cat sat", "a dog ran", "say words", "one more"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("ev") / "tiny", num_layers=1, hidden_size=32, num_heads=2)


def test_eval_during_ppo_and_sample_responses_share_the_accumulator(tiny, tmp_path, monkeypatch):
    """Both go through sample_and_score, with their own seeds and batch sizes, the judge inside."""
    from ppomax.ppo import evaluation
    from ppomax.ppo.trainer import PPOTrainer

    calls = []
    real = E.sample_and_score

    def spy(engine, sampling, prompt_ids, batch_size, pad_id, device, seed, score_batch, judge=None, **kw):
        calls.append((len(prompt_ids), batch_size, seed, judge is not None))
        return real(engine, sampling, prompt_ids, batch_size, pad_id, device, seed, score_batch, judge=judge, **kw)

    monkeypatch.setattr(E, "sample_and_score", spy)
    tr = PPOTrainer(PPOConfig.from_preset(
        "ppo_max", model_name_or_path=tiny, output_dir=str(tmp_path), critic_init="sft", rollout_batch_size=4,
        num_mini_batches=2, generation_batch_size=2, response_length=5, eval_steps=1, report_to="none",
        disable_tqdm=True, seed=11), prompts=PROMPTS, eval_prompts=PROMPTS,
        reward_fn=lambda p, r: [float(len(x)) for x in r], gold_fn=lambda p, r, t: [1.0] * len(r))
    metrics = evaluation.evaluate(tr, tr.eval_prompt_ids)
    policy, tok = load_causal_lm(tiny), load_tokenizer(tiny)
    s = E.sample_responses(policy, tok, [tok(p)["input_ids"] for p in PROMPTS], response_length=5, seed=3,
                           batch_size=4, judge=lambda p, r, t: [0.5] * len(r))
    assert calls == [(5, 2, 11 + 7919, True), (5, 4, 3, True)]
    assert metrics["eval/gold"] == 1.0 and s["gold"] == [0.5] * 5
    # the trainer's eval/* are summarize()'s metrics of the same per-response statistics
    assert set(metrics) == {f"eval/{k}" for k in evaluation.EVAL_KEYS}


def test_a_judge_that_draws_random_numbers_draws_on_the_evaluations_streams(tiny):
    """The RNG rule covers the judge: it draws the same numbers on every evaluation with the same seed, and
    the caller's Python and torch streams are where they were."""
    policy, tok = load_causal_lm(tiny), load_tokenizer(tiny)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    draws = []

    def noisy_judge(prompts, responses, truncated):
        draws.append((random.random(), torch.rand(1).item()))
        return [0.0] * len(responses)

    torch.manual_seed(123)
    random.seed(123)
    torch_before, py_before = torch.get_rng_state(), random.getstate()
    for _ in range(2):
        E.sample_responses(policy, tok, ids, response_length=4, seed=5, judge=noisy_judge)
    assert draws[0] == draws[1]  # the evaluation's own seed, not the caller's state
    assert torch.equal(torch.get_rng_state(), torch_before) and random.getstate() == py_before


def test_baseline_is_the_paired_win_rate_with_its_wilson_interval():
    """Scores [1, 1, 1] against the base's [0, 1, 2]: a win, a tie (½) and a loss = 1.5 / 3 = 0.5.
    Wilson at p = 0.5, n = 3, z = 1.96: centre (0.5 + 1.9208/3) / (1 + 3.8416/3) = 0.5,
    half 1.96·sqrt(0.25/3 + 3.8416/36) / 2.280533 = 1.96 · 0.4359408 / 2.280533 = 0.3746685."""
    base = E.Baseline([0.0, 1.0, 2.0], "sft")
    v = base.versus([1.0, 1.0, 1.0])
    assert list(v) == ["win_rate_vs_sft", "win_rate_ci"] and v["win_rate_vs_sft"] == 0.5
    assert v["win_rate_ci"] == pytest.approx([0.5 - 0.3746685, 0.5 + 0.3746685], abs=1e-7)
    samples = {"prompts": ["a"] * 3, "responses": ["x y", "x", "z"], "truncated": [False, True, False],
               "length": [2, 1, 1], "nll": [1.0, 2.0, 1.0], "kl": [0.1, 0.2, 0.3], "rm": [3.0, 1.0, 2.0]}
    report = base.report(samples, [1.0, 1.0, 1.0])
    assert report["gold"] == 1.0 and report["rm_reward"] == 2.0 and report["win_rate_vs_sft"] == 0.5
    assert report["perplexity"] == pytest.approx(torch.tensor(1.0).exp().item())  # exp(4 nats / 4 tokens)
    assert list(report)[-2:] == ["win_rate_vs_sft", "win_rate_ci"]  # after summarize()'s metrics
    assert base.report(samples, None, scores=[2.0, 2.0, 2.0])["win_rate_vs_sft"] == pytest.approx(2.5 / 3)


def test_a_task_needs_its_judge_from_the_caller_before_any_model_loads(tmp_path):
    """The library does not import the studies' tasks: ``ppomax eval --task reviews`` gets the judge from the
    CLI (tests/test_demo.py runs it); in Python, EvalConfig(task=...) without gold_fn is a ConfigError naming
    the field, raised before the (missing) model is touched."""
    from ppomax.config import ConfigError, EvalConfig

    cfg = EvalConfig(model_name_or_path=str(tmp_path / "no_model"), output_dir=str(tmp_path / "o"), task="reviews",
                     device="cpu")
    with pytest.raises(ConfigError, match=r"EvalConfig.task = 'reviews'.*gold_fn="):
        E.evaluate(cfg)
    assert not (tmp_path / "o").exists()


def test_shard_and_merge_by_hand():
    from types import SimpleNamespace

    ranks = [SimpleNamespace(enabled=True, rank=r, world_size=2) for r in range(2)]
    assert E.shard(5) == [0, 1, 2, 3, 4]
    assert [E.shard(5, d) for d in ranks] == [[0, 2, 4], [1, 3, 1]]  # rank 1 pads with its first prompt
    assert [E.shard(1, d) for d in ranks] == [[0], [0]]  # a rank without a prompt still runs one batch
    parts = [{k: [] for k in E.SAMPLE_KEYS} for _ in ranks]
    for d, part in zip(ranks, parts):
        part["prompts"] = [f"p{i}" for i in E.shard(5, d)]
        part["rm"] = [float(i) for i in E.shard(5, d)]
    merged = E.merge_shards(parts, 5)
    assert merged["prompts"] == ["p0", "p1", "p2", "p3", "p4"] and merged["rm"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert merged["kl"] == []  # a statistic no rank computed stays empty


class _Echo:
    """A deterministic engine: the response is a function of the prompt's last token (no random numbers),
    so a 2-process evaluation and a 1-process one must give the same set."""

    name = "echo"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def generate(self, p_ids, p_mask, sampling, return_logprobs=False):
        from ppomax.engines import Generation

        self.seen += p_ids[:, -1].tolist()
        resp = p_ids[:, -1:] * 2 + torch.arange(3, device=p_ids.device)
        return Generation(resp, torch.ones(resp.shape, device=p_ids.device), p_ids[:, -1] % 2 == 0)


def _echo_eval(d=None) -> dict:
    engine = _Echo()

    def score_batch(idx, parts, gen):
        p_ids, _, resp, mask = parts
        texts = ([" ".join(map(str, r.tolist())) for r in p_ids], [" ".join(map(str, r.tolist())) for r in resp])
        return dict(texts=texts, logp=-0.5 * mask * (1 + resp % 3), rm=resp[:, 0].float() / 10)

    def judge(prompts, responses, truncated):  # set-level: every score counts the whole set's responses
        return [float(len(set(responses))) + (0.5 if t else 0.0) for t in truncated]

    prompts = [[1, 2 + i] for i in range(5)]
    out, gold = E.sample_and_score(engine, None, prompts, 2, 0, torch.device("cpu"), 0, score_batch, judge=judge, d=d)
    return {"out": out, "gold": gold, "seen": engine.seen}


def _echo_worker(rank: int, world: int, port: int, out: str) -> None:
    import json
    import os

    from ppomax import distributed as dist_lib

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    d = dist_lib.setup()
    with open(os.path.join(out, f"eval-{rank}.json"), "w") as fh:
        json.dump(_echo_eval(d), fh)
    dist_lib.shutdown()


def test_two_processes_each_evaluate_their_share_and_return_the_whole_set(tmp_path):
    """With several processes each rank samples and scores only its share of the eval prompts (before,
    every rank evaluated all of them); every rank gets the whole set, in prompt order, judged whole."""
    import json
    import socket

    import torch.multiprocessing as mp

    one = _echo_eval()
    assert one["seen"] == [2, 3, 4, 5, 6]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_echo_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    two = [json.loads((tmp_path / f"eval-{r}.json").read_text()) for r in range(2)]
    assert [t["seen"] for t in two] == [[2, 4, 6], [3, 5, 3]]  # 3 prompts each (rank 1 pads one)
    for t in two:
        assert t["out"] == one["out"] and t["gold"] == one["gold"]
    assert one["gold"][0] == 5.5 and one["out"]["rm"] == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.2])
