"""Data parallelism: a 2-process PPO update equals the 1-process update on the same global batch.

The exactness test spawns two gloo processes with torch.multiprocessing; each takes its half of
one fixed experience buffer (built once here), and the loss statistics and the gradients reaching
the optimizers must match a single process that sees the whole buffer. The end-to-end test runs
`accelerate launch --multi_gpu --num_processes 2 -m ppomax ppo` on CPU (gloo): one metrics file
and one set of checkpoints, written by rank 0.

Devices: two ranks need two GPUs (NCCL). With fewer, the spawned ranks get CUDA_VISIBLE_DEVICES=""
(CPU and gloo) and the one-process reference runs on the CPU too, so a one-GPU machine runs these
tests as CI does; with two or more GPUs they run on cuda:0 / cuda:1 under NCCL (and
--full_determinism, for the exact comparisons). Every spawned rank runs with
PPOMAX_CHECK_COLLECTIVES=1: a collective handed a tensor off the rank's device, or called from a
ppomax module other than distributed.py / sharding.py, fails (distributed.check_collectives).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from ppomax import functional as F
from ppomax.config import PPOConfig
from ppomax.models import ScalarHeadModel, build_tiny_model

PROMPTS = ["hello there", "the cat sat", "a dog ran", "say words", "one two", "red blue"]
TWO_GPUS = torch.cuda.device_count() >= 2  # else the ranks (and the reference) run on CPU with gloo
REF = {} if TWO_GPUS else {"device": "cpu"}  # the one-process reference, on the ranks' kind of device


@pytest.fixture(autouse=True)
def _rank_environment(monkeypatch):
    """What every spawned rank inherits: hidden GPUs unless there is one per rank, checked collectives."""
    if not TWO_GPUS:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # read by CUDA when a child first asks for it
    monkeypatch.setenv("PPOMAX_CHECK_COLLECTIVES", "1")


def _cpu(x):
    """Tensors (in dicts) moved to the CPU: what a rank saves for the parent to compare."""
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_cpu(v) for v in x)
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def _experience_on(exp, device):
    import dataclasses

    return dataclasses.replace(exp, **{f.name: getattr(exp, f.name).to(device) for f in dataclasses.fields(exp)
                                       if getattr(exp, f.name) is not None})


def n_words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(model_dir: str, out: str, **kw) -> PPOConfig:
    values = dict(
        model_name_or_path=model_dir, output_dir=out, critic_init="sft", max_steps=1, critic_pretrain_steps=0,
        rollout_batch_size=4, num_mini_batches=1, per_device_train_batch_size=4, num_ppo_epochs=1,
        response_length=6, report_to="none", disable_tqdm=True, learning_rate=1e-3, critic_learning_rate=1e-3,
        max_grad_norm=None, seed=5, full_determinism=TWO_GPUS,
    )
    values.update(kw)
    return PPOConfig.from_preset("ppo_max", **values)


def _update_and_capture(model_dir: str, out: str, exp_path: str, rank: int, world: int, kw: dict) -> dict:
    """compute_advantages + update on this rank's slice; the gradients seen by each optimizer step."""
    import copy

    from ppomax.ppo.trainer import PPOTrainer

    torch.set_num_threads(1)
    trainer = PPOTrainer(_config(model_dir, out, **kw), prompts=PROMPTS, reward_fn=n_words)
    assert trainer.dist.world_size == world and trainer.dist.rank == rank
    exp = _experience_on(torch.load(exp_path, weights_only=False), trainer.device)
    n = exp.scores.numel() // world
    exp = copy.copy(exp).index(torch.arange(rank * n, (rank + 1) * n, device=trainer.device))
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, opt, model in (("policy", trainer.policy_opt, trainer.policy), ("critic", trainer.critic_opt, trainer.critic)):

        def capture(optimizer, args, kwargs, _name=name, _model=model):
            grads[_name] = {pn: _full(p.grad).detach().cpu() for pn, p in _model.named_parameters()
                            if p.grad is not None}

        opt.register_step_pre_hook(capture)
    trainer.compute_advantages(exp)
    stats = trainer.update(exp, train_policy=True)
    return {"stats": stats, "grads": grads, "moments": trainer.score_moments.state_dict(), "device": str(trainer.device)}


def _direct_collective_from_ppomax() -> str:
    """What the collective check says to a torch.distributed call made from a ppomax module other
    than distributed.py / sharding.py (the check fails before the collective starts, on every rank)."""
    import ppomax

    fake = os.path.join(os.path.dirname(ppomax.__file__), "ppo", "new_module.py")
    try:
        exec(compile("torch.distributed.all_reduce(torch.zeros(1))", fake, "exec"), {"torch": torch})
    except RuntimeError as e:
        return str(e)
    return "allowed"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) gradient gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, world: int, port: int, model_dir: str, out: str, exp_path: str, kw: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    res = _update_and_capture(model_dir, out, exp_path, rank, world, kw)
    res["direct_call"] = _direct_collective_from_ppomax()
    torch.save(res, os.path.join(out, f"result-{rank}.pt"))
    from ppomax.distributed import shutdown

    shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model and one fixed experience buffer of 4 responses (sampled once, saved)."""
    from ppomax.ppo.trainer import PPOTrainer

    root = tmp_path_factory.mktemp("dist")
    model_dir = build_tiny_model(root / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = PPOTrainer(_config(model_dir, str(root / "sample"), **REF), prompts=PROMPTS, reward_fn=n_words)
        exp, _ = trainer.make_experience()
    finally:
        torch.set_num_threads(n)
    assert exp.mask.sum(-1).min() >= 1
    torch.save(_experience_on(exp, "cpu"), root / "exp.pt")  # loadable by ranks that see no GPU
    return root, model_dir


@pytest.mark.parametrize("kw", [{}, {"use_peft": True, "critic_use_peft": True}, {"sharding": "zero2"},
                                {"sharding": "zero3"}, {"use_peft": True, "critic_use_peft": True, "sharding": "zero3"},
                                {"sharding": "zero3", "gradient_checkpointing": True}],
                         ids=["full", "lora", "zero2", "zero3", "lora-zero3", "zero3-checkpointing"])
def test_two_processes_equal_one_process(setup, tmp_path, kw):
    if kw and not __import__("importlib").util.find_spec("peft"):
        pytest.skip("LoRA needs the optional extra peft")
    root, model_dir = setup
    n = torch.get_num_threads()
    try:
        one = _update_and_capture(model_dir, str(tmp_path / "one"), str(root / "exp.pt"), 0, 1, {**kw, **REF})
    finally:
        torch.set_num_threads(n)
    out = tmp_path / "two"
    out.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), model_dir, str(out), str(root / "exp.pt"), kw), nprocs=2,
                       join=True, start_method="spawn")
    two = [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(2)]
    assert [r["device"] for r in two] == (["cuda:0", "cuda:1"] if TWO_GPUS else ["cpu", "cpu"])
    for r in two:
        assert "ppo/new_module.py calls torch.distributed.all_reduce directly" in r["direct_call"]  # the check is on
        # Loss statistics: the global token means, on every rank.
        for k in ("policy/loss", "critic/value_loss", "policy/clipfrac", "policy/approx_kl", "policy/entropy"):
            assert r["stats"][k] == pytest.approx(one["stats"][k], rel=1e-5, abs=1e-7), k
        assert r["moments"] == pytest.approx(one["moments"], rel=1e-9)
        for model in ("policy", "critic"):
            g1, g2 = one["grads"][model], r["grads"][model]
            assert g1.keys() == g2.keys() and g1
            for name in g1:
                torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=f"{model}.{name}")
    assert one["stats"]["grad_norm/policy"] > 0


def _whitening_experience():
    """8 responses of lengths 1-5 (T = 5); rows 0-3 (rank 0's half) score low, rows 4-7 high, so per-rank
    moments differ from the global ones."""
    from ppomax.ppo.rollout import Experience

    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5, 2, 4])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    B, T = mask.shape
    return Experience(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                      response_ids=torch.zeros(B, T, dtype=torch.long), mask=mask, truncated=torch.zeros(B, dtype=torch.bool),
                      logprobs=-torch.rand(B, T, generator=g) * mask, ref_logprobs=-torch.rand(B, T, generator=g) * mask,
                      values=torch.randn(B, T, generator=g) * mask,
                      scores=torch.cat([torch.randn(4, generator=g), 3 + 2 * torch.randn(4, generator=g)]))


WHITENING = {"reinforce_pp": dict(advantage_estimator="reinforce_pp"),
             "whiten_rewards": dict(whiten_rewards=True, kl_coef=0.1)}


def _advantages_on_rank(d) -> dict:
    """PPOTrainer.compute_advantages on this rank's half of _whitening_experience (no models needed)."""
    from types import SimpleNamespace

    from ppomax import functional as F
    from ppomax.ppo.trainer import PPOTrainer

    out = {}
    for name, kw in WHITENING.items():
        cfg = PPOConfig.from_preset("ppo_max", **kw)
        exp = _whitening_experience()
        n = exp.scores.numel() // d.world_size
        exp = exp.index(torch.arange(d.rank * n, (d.rank + 1) * n))
        tr = SimpleNamespace(cfg=cfg, dist=d, score_moments=F.RunningMoments(), kl_coef=cfg.kl_coef)
        PPOTrainer.compute_advantages(tr, exp)
        out[name] = {"rewards": exp.rewards, "advantages": exp.advantages}
    return out


def _advantages_worker(rank: int, world: int, port: int, out: str) -> None:
    from ppomax import distributed as dist_lib

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.save(_advantages_on_rank(dist_lib.setup()), os.path.join(out, f"adv-{rank}.pt"))
    dist_lib.shutdown()


def test_batch_whitening_over_two_processes_equals_one_process(tmp_path):
    """Issue 21 item 7: REINFORCE++ whitened its returns per rank (and --whiten_rewards its rewards), so a
    2-process run differed from the 1-process update; both now use moments over every rank's tokens."""
    from ppomax.distributed import Dist

    one = _advantages_on_rank(Dist())
    mp.start_processes(_advantages_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    two = [torch.load(tmp_path / f"adv-{r}.pt", weights_only=True) for r in range(2)]
    for name in WHITENING:
        for field in ("rewards", "advantages"):
            joined = torch.cat([two[0][name][field], two[1][name][field]])
            # before the fix: 'reinforce_pp advantages' (and the whitened rewards) differed: per-rank moments
            torch.testing.assert_close(joined, one[name][field], rtol=1e-5, atol=1e-6, msg=f"{name} {field}")
    mask = _whitening_experience().mask
    adv = one["reinforce_pp"]["advantages"]  # whitened over the whole batch: mean 0, unbiased variance 1
    assert F.masked_mean(adv, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert F.masked_var(adv, mask).item() == pytest.approx(1.0, rel=1e-5)


def _monitored_experience():
    """8 responses of lengths 5,2,4,1 (rank 0's half) and 3,2,3,1 (rank 1's: T = 3, so the ranks' widths
    differ); rank 1 scores higher and has the truncated ones, so per-rank percentiles, stds and
    perplexities differ from the batch's."""
    from ppomax.ppo.rollout import Experience

    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([5, 2, 4, 1, 3, 2, 3, 1])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    B, T = mask.shape

    def tok(scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(B, T, generator=g)) * mask

    return Experience(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                      response_ids=torch.zeros(B, T, dtype=torch.long), mask=mask,
                      truncated=torch.tensor([False] * 5 + [True, False, True]),
                      logprobs=-torch.rand(B, T, generator=g) * mask * torch.tensor([1.0] * 4 + [3.0] * 4)[:, None],
                      ref_logprobs=-torch.rand(B, T, generator=g) * mask, values=tok(),
                      scores=torch.cat([torch.randn(4, generator=g), 3 + 2 * torch.randn(4, generator=g)]),
                      processed_scores=torch.randn(B, generator=g), advantages=tok(2.0, 0.5), returns=tok(1.0, 1.0))


def _rank_half(exp, rank: int):
    """This rank's 4 responses, cut to their own widest response (as its sampler would stop)."""
    half = exp.index(torch.arange(rank * 4, rank * 4 + 4))
    T = int(half.mask.sum(-1).max())
    for name in ("response_ids", "mask", "logprobs", "ref_logprobs", "values", "advantages", "returns"):
        setattr(half, name, getattr(half, name)[:, :T])
    return half


def _json_rank_worker(rank: int, world: int, port: int, out: str, fn) -> None:
    """One of ``world`` gloo ranks: writes ``fn(d)`` (``d``: this rank's ``distributed.Dist``) to rank-<r>.json."""
    from ppomax import distributed as dist_lib

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    d = dist_lib.setup()
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as fh:
        json.dump(fn(d), fh)
    dist_lib.shutdown()


def _on_two_ranks(fn, out) -> list:
    """``fn(d)`` on two spawned gloo processes; their JSON results in rank order."""
    mp.start_processes(_json_rank_worker, args=(2, _free_port(), str(out), fn), nprocs=2, join=True,
                       start_method="spawn")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def _rank_metrics(d) -> dict:
    from ppomax.ppo.monitors import experience_metrics

    return experience_metrics(_rank_half(_monitored_experience(), d.rank), True, d)


def test_batch_monitors_over_two_processes_equal_one_process(tmp_path):
    """The reward percentiles and std, perplexity, advantage/return stds and explained variance of a
    2-process run are the whole batch's (before: each rank's, averaged by reduce_row)."""
    from ppomax.ppo.monitors import experience_metrics

    one = experience_metrics(_monitored_experience(), True)
    assert _rank_half(_monitored_experience(), 1).mask.shape[1] == 3  # the ranks' widths differ
    per_rank = [experience_metrics(_rank_half(_monitored_experience(), r), True) for r in range(2)]
    for k in ("reward/raw_p50", "reward/raw_p99", "reward/raw_std", "policy/perplexity", "adv/std",
              "critic/explained_variance"):  # the test can fail: averaging the ranks' values is wrong here
        assert (per_rank[0][k] + per_rank[1][k]) / 2 != pytest.approx(one[k], rel=1e-3), k
    for two in _on_two_ranks(_rank_metrics, tmp_path):
        assert two.keys() == one.keys()
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-6, abs=1e-9), k


def _set_judge(prompts, responses, truncated):
    """A set-level judge: each response's score is the number of distinct responses in the whole set."""
    return [float(len(set(responses))) + (0.5 if t else 0.0) for t in truncated]


_JUDGED = [["p0", "p1", "p2"], ["a", "b", "a"], [False, True, False]], [["p3", "p4", "p5"], ["c", "a", "d"],
                                                                       [False, False, True]]


def _rank_judge(d) -> tuple:
    from ppomax.ppo.monitors import judge_rollouts

    return judge_rollouts(_set_judge, *_JUDGED[d.rank], d)


def test_the_judge_sees_every_ranks_rollouts(tmp_path):
    """gold/* during a 2-process run: every rank judges the whole batch (a set-level term counts all 6
    responses: 4 distinct), keeps its own responses' scores, and logs the batch's mean."""
    from ppomax.ppo.monitors import judge_rollouts

    one = judge_rollouts(_set_judge, *[a + b for a, b in zip(*_JUDGED)])
    assert one[0] == one[1] == [4.0, 4.5, 4.0, 4.0, 4.0, 4.5]
    assert judge_rollouts(_set_judge, *_JUDGED[0])[1] == [2.0, 2.5, 2.0]  # one rank alone sees 2 distinct
    two = _on_two_ranks(_rank_judge, tmp_path)
    assert [t[0] for t in two] == [one[0][:3], one[0][3:]]  # each rank's own scores
    assert two[0][1] == two[1][1] == one[1]  # the whole batch's, on every rank


def _rank_row(rank: int) -> dict:
    """Rank 0 of 8 responses has 2 truncated ones (mean raw score 1.0), rank 1 none: only rank 0 logs
    reward/truncated_mean, as experience_metrics does."""
    row = {"reward/raw_mean": [0.5, 1.5][rank], "response/truncated_frac": [0.25, 0.0][rank],
           "rollout/logprob_gap_max": [0.1, 0.3][rank], "skip_cause": "x"}
    if rank == 0:
        row["reward/truncated_mean"] = 1.0
    return row


def _rank_reduced_row(d) -> dict:
    from ppomax.ppo.monitors import reduce_row

    return reduce_row(_rank_row(d.rank), d)


def test_row_metrics_that_only_some_ranks_log_are_reduced_without_a_collective_mismatch(tmp_path):
    """Issue 21 (found with item 8): reward/truncated_mean exists only on a rank with truncated responses, and
    the row's all-reduce took each rank's own keys: 33 floats against 32, a gloo abort ('Received data size
    doesn't match'). Now every rank reduces the same keys, each over the ranks that logged it."""
    rows = _on_two_ranks(_rank_reduced_row, tmp_path)
    assert rows[0] == rows[1]
    row = rows[0]
    assert row["reward/raw_mean"] == 1.0 and row["response/truncated_frac"] == 0.125
    assert row["reward/truncated_mean"] == 1.0  # the mean over every truncated response (all on rank 0)
    assert row["rollout/logprob_gap_max"] == 0.3 and row["skip_cause"] == "x"


def _launch_setup(tmp_path, num_layers: int) -> tuple[str, str, list[str]]:
    """(accelerate launcher, tiny model dir, the `-m ppomax ppo ...` arguments shared by the launch tests)."""
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    if not os.path.exists(launcher):
        pytest.skip("accelerate launcher not on PATH")
    from ppomax.data import write_jsonl

    model_dir = build_tiny_model(tmp_path / "tiny", num_layers=num_layers, hidden_size=32, num_heads=2)
    torch.manual_seed(0)
    ScalarHeadModel.from_causal_lm(model_dir).save_pretrained(tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    args = ["-m", "ppomax", "ppo", "--model_name_or_path", model_dir, "--reward_model_path", str(tmp_path / "rm"),
            "--dataset", str(tmp_path / "prompts.jsonl"), "--output_dir", str(tmp_path / "run"),
            "--critic_pretrain_steps", "1", "--rollout_batch_size", "4", "--num_mini_batches", "2",
            "--per_device_train_batch_size", "1", "--response_length", "5", "--report_to", "none",
            "--disable_tqdm", "--learning_rate", "1e-3"]
    return launcher, model_dir, args


@pytest.mark.parametrize("mode", ["--multi_gpu", "--cpu"])
def test_accelerate_launch_two_processes_on_cpu(tmp_path, mode):
    """`accelerate launch --multi_gpu|--cpu --num_processes 2 -m ppomax ppo` on CPU: two gloo processes
    (with --cpu, accelerate starts one and ppomax starts the two), rank 0 writes."""
    launcher, _, args = _launch_setup(tmp_path, num_layers=1)
    out = tmp_path / "run"
    cmd = [launcher, "launch", mode, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args, "--max_steps", "2",
           "--save_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by rank 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert "rank 0 of 2 (gloo)" in res.stderr and "rank 1 of 2 (gloo)" in res.stderr
    assert ("asked for 2 processes and started one" in res.stderr) == (mode == "--cpu")


def test_accelerate_fsdp_config_shards_and_one_process_resumes(tmp_path):
    """examples/accelerate/fsdp_zero3.yaml with 2 processes on CPU: the models are sharded (ZeRO-3),
    rank 0 writes ordinary checkpoints, and one unsharded process resumes from them."""
    from ppomax.models import load_causal_lm

    launcher, model_dir, args = _launch_setup(tmp_path, num_layers=2)
    args += ["--save_steps", "1", "--save_total_limit", "5"]
    out = tmp_path / "run"
    config = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate", "fsdp_zero3.yaml")
    cmd = [launcher, "launch", "--config_file", config, "--num_processes", "2",
           "--main_process_port", str(_free_port()), *args, "--max_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sharding = zero3" in res.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    policy = load_causal_lm(out / "checkpoint-3" / "policy")  # an ordinary, whole model
    start = load_causal_lm(model_dir)
    moved = [n for n, p in policy.named_parameters() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert moved and policy.num_parameters() == start.num_parameters()
    # One plain process resumes the sharded run's checkpoint-2 (weights and name-keyed optimizer state).
    res = subprocess.run([sys.executable, *args, "--max_steps", "3", "--resume_from", str(out / "checkpoint-2")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "COMPLETE").exists()


# ---------------------------------------------------------------------------------------------
# SFT and reward model: 2 processes × (per-device batch 2) == 1 process × (batch 2, accumulation 2)
# ---------------------------------------------------------------------------------------------

SFT_ROWS = [{"prompt": f"Question {i}:", "response": " ".join(["the cat sat"] * (1 + i % 3))} for i in range(12)]
PAIR_ROWS = [{"prompt": f"Pick {i}:", "chosen": "the cat sat", "rejected": "a dog " * (1 + i % 3)} for i in range(12)]


def _supervised(stage: str, model_dir: str, out: str, accum: int, sharding: str = "none", device: str = "auto"):
    from ppomax.config import RewardConfig, SFTConfig
    from ppomax.data import write_jsonl
    from ppomax.reward import train_reward_model
    from ppomax.sft import train_sft

    torch.set_num_threads(1)
    data = os.path.join(out, "data.jsonl")
    write_jsonl(data, SFT_ROWS if stage == "sft" else PAIR_ROWS)
    kw = dict(model_name_or_path=model_dir, dataset=data, output_dir=os.path.join(out, "run"), max_steps=3,
              per_device_train_batch_size=2, gradient_accumulation_steps=accum, learning_rate=1e-2,
              eval_split=0.0, report_to="none", disable_tqdm=True, max_length=64, max_prompt_length=16, seed=3,
              sharding=sharding, save_steps=2, device=device, full_determinism=TWO_GPUS)
    if stage == "sft":
        return train_sft(SFTConfig(**kw))["metrics"]
    return train_reward_model(RewardConfig(**kw, rm_lm_coef=0.5))["metrics"]  # with the LM term (tied head)


def _supervised_worker(rank: int, world: int, port: int, stage: str, model_dir: str, out: str,
                       sharding: str = "none") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    rows = _supervised(stage, model_dir, out, accum=1, sharding=sharding)
    torch.save(rows, os.path.join(out, f"rows-{rank}.pt"))
    from ppomax.distributed import shutdown

    shutdown()


@pytest.mark.parametrize("stage,sharding", [("sft", "none"), ("rm", "none"), ("sft", "zero3"), ("rm", "zero2"),
                                            ("rm", "zero3")])
def test_two_process_sft_and_rm_equal_one_process(setup, tmp_path, stage, sharding):
    from safetensors.torch import load_file

    root, model_dir = setup
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    n = torch.get_num_threads()
    try:
        one = _supervised(stage, model_dir, str(one_dir), accum=2, **REF)
    finally:
        torch.set_num_threads(n)
    mp.start_processes(_supervised_worker, args=(2, _free_port(), stage, model_dir, str(two_dir), sharding), nprocs=2,
                       join=True, start_method="spawn")
    two = [torch.load(two_dir / f"rows-{r}.pt", weights_only=False) for r in range(2)]
    assert (two_dir / "run" / "metrics.jsonl").exists() and two[1]  # rank 0 wrote; rank 1 kept rows in memory
    for k in ("train/loss", "grad_norm"):
        assert two[0][-1][k] == pytest.approx(one[-1][k], rel=1e-4), k
    w1 = load_file(one_dir / "run" / "model.safetensors")
    w2 = load_file(two_dir / "run" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def _sharded_save_load_worker(rank: int, world: int, port: int, model_dir: str, out: str, kw: dict) -> None:
    """One sharded (ZeRO-3) iteration with a checkpoint; perturb weights and optimizer state; load the
    checkpoint back into the shards; report whether everything came back."""
    from ppomax import sharding
    from ppomax.ppo.trainer import PPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = PPOTrainer(_config(model_dir, out, sharding="zero3", save_steps=1, **kw), prompts=PROMPTS,
                         reward_fn=n_words)
    assert trainer.sharding == "zero3" and sharding.is_sharded(trainer.policy)
    trainer.train()

    def snapshot():
        params = {n: _full(p).detach().clone() for n, p in trainer.critic.named_parameters() if p.requires_grad}
        opt = sharding.optimizer_state(trainer.critic, trainer.critic_opt).get("state", {})  # whole on rank 0
        return params, {k: {s: v.clone() for s, v in st.items()} for k, st in opt.items()}

    before = snapshot()
    with torch.no_grad():
        for p in trainer.critic.parameters():
            if p.requires_grad:  # with LoRA: the adapters and the value head (the base stays frozen)
                sharding.local(p).add_(1.0)
        for st in trainer.critic_opt.state.values():
            sharding.local(st["exp_avg"]).add_(1.0)
    changed = snapshot()
    trainer.load_checkpoint(trainer.out / "checkpoint-1")
    after = snapshot()
    if rank == 0:
        torch.save(_cpu({"before": before, "changed": changed, "after": after}), os.path.join(out, "snap.pt"))
    trainer = None  # drop the sharded models before the process group goes
    from ppomax.distributed import shutdown

    shutdown()


@pytest.mark.parametrize("kw", [{}, {"use_peft": True, "critic_use_peft": True}], ids=["full", "lora"])
def test_sharded_checkpoint_loads_back_into_the_shards(setup, tmp_path, kw):
    root, model_dir = setup
    out = tmp_path / "run"
    mp.start_processes(_sharded_save_load_worker, args=(2, _free_port(), model_dir, str(out), kw), nprocs=2,
                       join=True, start_method="spawn")
    snap = torch.load(out / "snap.pt", weights_only=False)
    for what in (0, 1):  # parameters, optimizer state
        b, c, a = snap["before"][what], snap["changed"][what], snap["after"][what]
        assert b.keys() == a.keys() and b
        for k in b:
            if what == 0:
                assert not torch.equal(c[k], b[k]), k
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
            else:
                for s in b[k]:
                    torch.testing.assert_close(a[k][s], b[k][s], rtol=0, atol=0, msg=f"{k}.{s}")
                assert not torch.equal(c[k]["exp_avg"], b[k]["exp_avg"]), k


# ---------------------------------------------------------------------------------------------
# Launch environments: which sharding an accelerate config asks for, what is refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,mode", [
    ({}, "none"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, "zero3"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "zero2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "zero2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "1"}, "zero3"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "none"),
])
def test_sharding_mode_from_accelerate_environment(monkeypatch, env, mode):
    from ppomax import sharding

    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_SHARDING_STRATEGY",
              "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sharding.resolve_mode("none", world_size=2) == mode
    assert sharding.resolve_mode("zero2", world_size=2) == "zero2"  # an explicit flag wins
    assert sharding.resolve_mode("zero3", world_size=1) == "none"  # nothing to shard in one process


def test_deepspeed_and_param_offload_are_refused_by_name(monkeypatch):
    from ppomax import distributed, sharding
    from ppomax.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="--sharding zero2\\|zero3"):
        distributed.setup()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(UserError, match="fsdp_offload_params"):
        sharding.resolve_mode("none", world_size=2)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(UserError, match="HYBRID_SHARD"):
        sharding.resolve_mode("none", world_size=2)


def test_cpu_launch_process_count_from_the_launcher_command_line(monkeypatch):
    from ppomax.distributed import cpu_launch_processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    launcher = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu"]
    assert cpu_launch_processes([*launcher, "--num_processes", "2", "-m", "ppomax", "ppo"]) == 2
    assert cpu_launch_processes([*launcher, "--num_processes=3", "-m", "ppomax"]) == 3
    assert cpu_launch_processes([*launcher, "--num_processes", "1", "-m", "ppomax"]) is None
    assert cpu_launch_processes(["/bin/bash", "run.sh", "--num_processes", "2"]) is None  # not accelerate
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a launched rank (torchrun): never relaunch
    assert cpu_launch_processes([*launcher, "--num_processes", "2"]) is None


def _train_worker(rank: int, world: int, port: int, model_dir: str, out: str, kw: dict) -> None:
    from ppomax.ppo.trainer import PPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    PPOTrainer(_config(model_dir, out, **kw), prompts=PROMPTS, reward_fn=n_words).train()
    from ppomax.distributed import shutdown

    shutdown()


@pytest.mark.parametrize("sharding", ["none", "zero3"])
def test_two_process_resume_equals_an_uninterrupted_run(setup, tmp_path, sharding):
    """Each rank's sampling stream is stored in the checkpoint, so stopping after iteration 2 and
    resuming gives iteration 3 exactly as the uninterrupted 2-process run does."""
    from safetensors.torch import load_file

    root, model_dir = setup
    kw = dict(max_steps=3, save_steps=2, logging_steps=1, sharding=sharding, max_grad_norm=1.0)

    def run(out, **extra):
        mp.start_processes(_train_worker, args=(2, _free_port(), model_dir, str(out), {**kw, **extra}), nprocs=2,
                           join=True, start_method="spawn")
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full")
    run(tmp_path / "cut", max_steps=2)
    resumed = run(tmp_path / "cut", resume_from="latest")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for k in ("reward/raw_mean", "kl/ref", "policy/loss", "critic/value_loss", "response/length_mean"):
        assert resumed[-1][k] == pytest.approx(full[-1][k], rel=1e-6, abs=1e-9), k
    w_full = load_file(tmp_path / "full" / "checkpoint-3" / "policy" / "model.safetensors")
    w_cut = load_file(tmp_path / "cut" / "checkpoint-3" / "policy" / "model.safetensors")
    for name in w_full:
        torch.testing.assert_close(w_cut[name], w_full[name], rtol=1e-6, atol=1e-7, msg=name)


def _eval_worker(rank: int, world: int, port: int, model_dir: str, out: str, kw: dict) -> None:
    """A 2-iteration run evaluating 3 prompts at every iteration; records each evaluation's eval/* before
    the reduction over ranks and how many prompts this rank's engine sampled."""
    from ppomax.ppo import evaluation
    from ppomax.ppo.trainer import PPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen, results, real = [], [], evaluation.evaluate

    def spy(tr, ids):
        generate = tr.engine.generate

        def counting(p_ids, *a, **k):
            seen.append(int(p_ids.shape[0]))
            return generate(p_ids, *a, **k)

        tr.engine.generate = counting
        try:
            results.append(real(tr, ids))
        finally:
            del tr.engine.generate
        return results[-1]

    evaluation.evaluate = spy
    PPOTrainer(_config(model_dir, out, max_steps=2, eval_steps=1, **kw), prompts=PROMPTS, reward_fn=n_words,
               eval_prompts=PROMPTS[:3]).train()
    with open(os.path.join(out, f"eval-{rank}.json"), "w") as fh:
        json.dump({"seen": seen, "results": results}, fh)
    from ppomax.distributed import shutdown

    shutdown()


@pytest.mark.parametrize("sharding", ["none", "zero3"])
def test_two_processes_split_the_evaluation_prompts(setup, tmp_path, sharding):
    """Each rank samples ⌈3 / 2⌉ = 2 of the 3 eval prompts (before: all 3 on every rank), the padded
    share keeps a sharded model's forwards in step, and every rank summarises the same whole set."""
    _, model_dir = setup
    mp.start_processes(_eval_worker, args=(2, _free_port(), model_dir, str(tmp_path), {"sharding": sharding}),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"eval-{r}.json").read_text()) for r in range(2)]
    assert [r["seen"] for r in ranks] == [[2, 2], [2, 2]]  # two evaluations, 2 prompts each
    assert ranks[0]["results"] == ranks[1]["results"] and len(ranks[0]["results"]) == 2
    assert {"eval/rm_reward", "eval/kl", "eval/length", "eval/distinct_2"} <= set(ranks[0]["results"][0])


def _vllm_sync_weights_worker(rank: int, world: int, port: int, model_dir: str, out: str, kw: dict) -> None:
    """What the vLLM engine's sync pushes (engines.vllm.merged_weights) from a sharded policy after an
    update: every rank gathers; rank 0 saves the tensors and the policy's own gathered weights."""
    from ppomax import sharding
    from ppomax.engines.vllm import merged_weights
    from ppomax.ppo.trainer import PPOTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = PPOTrainer(_config(model_dir, out, sharding="zero3", **kw), prompts=PROMPTS, reward_fn=n_words)
    assert sharding.is_sharded(trainer.policy)
    trainer.step()  # the weights moved: the sync must carry the updated (and, with LoRA, merged) weights
    from torch.distributed.tensor import DTensor

    real_full, gathers = DTensor.full_tensor, []

    def counted(self, *a, **k):
        gathers.append(1)
        return real_full(self, *a, **k)

    DTensor.full_tensor = counted  # a second all-gather per tensor, after FSDP's own unshard
    try:
        pushed = dict(merged_weights(trainer.policy))
    finally:
        DTensor.full_tensor = real_full
    gathered = sharding.GatheredModel(trainer.policy)  # the checkpoint path's gather, independent of the sync's
    if rank == 0:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            gathered.save_pretrained(d)
            torch.save({"pushed": _cpu(pushed), "full_tensor_calls": len(gathers)}, os.path.join(out, "pushed.pt"))
            import shutil

            shutil.copytree(d, os.path.join(out, "policy"))
    trainer = None
    from ppomax.distributed import shutdown

    shutdown()


@pytest.mark.parametrize("kw", [{}, {"use_peft": True}], ids=["full", "lora"])
def test_vllm_sync_gathers_a_sharded_policy(setup, tmp_path, kw):
    """Issue #12: a sharded (FSDP2) policy is gathered for the vLLM weight sync; with LoRA the pushed
    weights are the merged ones. Compared with the saved (gathered, and for LoRA merged) policy."""
    from ppomax.models import load_causal_lm

    _, model_dir = setup
    out = tmp_path / "run"
    out.mkdir()
    mp.start_processes(_vllm_sync_weights_worker, args=(2, _free_port(), model_dir, str(out), kw), nprocs=2,
                       join=True, start_method="spawn")
    result = torch.load(out / "pushed.pt", weights_only=True)
    pushed = result["pushed"]
    # issue 21 item 9: the sync gathered each unit (sharding.gathered), then state_dict() re-sharded it and every
    # tensor was all-gathered again (before the fix: 12 full_tensor() calls here, 16 with LoRA)
    assert result["full_tensor_calls"] == 0
    saved = load_causal_lm(out / "policy").state_dict()  # a LoRA checkpoint loads merged (load_merged_lora)
    start = load_causal_lm(model_dir).state_dict()
    assert set(saved) <= set(pushed), sorted(set(saved) - set(pushed))[:3]
    for k, v in saved.items():
        torch.testing.assert_close(pushed[k], v, rtol=0, atol=2e-6, msg=k)
    assert any(not torch.equal(pushed[k], start[k]) for k in start)  # the update is in what is pushed
