"""Data parallelism: a 2-process PPO update equals the 1-process update on the same global batch.

The exactness test spawns two gloo processes with torch.multiprocessing; each takes its half of
one fixed experience buffer (built once here), and the loss statistics and the gradients reaching
the optimizers must match a single process that sees the whole buffer. The end-to-end test runs
`accelerate launch --multi_gpu --num_processes 2 -m ppomax ppo` on CPU (gloo): one metrics file
and one set of checkpoints, written by rank 0.
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

from ppomax.config import PPOConfig
from ppomax.models import ScalarHeadModel, build_tiny_model

PROMPTS = ["hello there", "the cat sat", "a dog ran", "say words", "one two", "red blue"]


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
        max_grad_norm=None, seed=5,
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
    exp = torch.load(exp_path, weights_only=False)
    n = exp.scores.numel() // world
    exp = copy.copy(exp).index(torch.arange(rank * n, (rank + 1) * n))
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, opt, model in (("policy", trainer.policy_opt, trainer.policy), ("critic", trainer.critic_opt, trainer.critic)):

        def capture(optimizer, args, kwargs, _name=name, _model=model):
            grads[_name] = {pn: p.grad.detach().clone() for pn, p in _model.named_parameters() if p.grad is not None}

        opt.register_step_pre_hook(capture)
    trainer.compute_advantages(exp)
    stats = trainer.update(exp, train_policy=True)
    return {"stats": stats, "grads": grads, "moments": trainer.score_moments.state_dict()}


def _worker(rank: int, world: int, port: int, model_dir: str, out: str, exp_path: str, kw: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    res = _update_and_capture(model_dir, out, exp_path, rank, world, kw)
    torch.save(res, os.path.join(out, f"result-{rank}.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model and one fixed experience buffer of 4 responses (sampled once, saved)."""
    from ppomax.ppo.trainer import PPOTrainer

    root = tmp_path_factory.mktemp("dist")
    model_dir = build_tiny_model(root / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = PPOTrainer(_config(model_dir, str(root / "sample")), prompts=PROMPTS, reward_fn=n_words)
        exp, _ = trainer.make_experience()
    finally:
        torch.set_num_threads(n)
    assert exp.mask.sum(-1).min() >= 1
    torch.save(exp, root / "exp.pt")
    return root, model_dir


@pytest.mark.parametrize("kw", [{}, {"use_peft": True, "critic_use_peft": True}], ids=["full", "lora"])
def test_two_processes_equal_one_process(setup, tmp_path, kw):
    if kw and not __import__("importlib").util.find_spec("peft"):
        pytest.skip("LoRA needs the optional extra peft")
    root, model_dir = setup
    n = torch.get_num_threads()
    try:
        one = _update_and_capture(model_dir, str(tmp_path / "one"), str(root / "exp.pt"), 0, 1, kw)
    finally:
        torch.set_num_threads(n)
    out = tmp_path / "two"
    out.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), model_dir, str(out), str(root / "exp.pt"), kw), nprocs=2,
                       join=True, start_method="spawn")
    two = [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(2)]
    for r in two:
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


def test_accelerate_launch_two_processes_on_cpu(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m ppomax ppo` on CPU: gloo, rank 0 writes."""
    if shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")):
        pytest.skip("accelerate launcher not on PATH")
    from ppomax.data import write_jsonl

    model_dir = build_tiny_model(tmp_path / "tiny", num_layers=1, hidden_size=32, num_heads=2)
    torch.manual_seed(0)
    ScalarHeadModel.from_causal_lm(model_dir).save_pretrained(tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "run"
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "ppomax", "ppo",
           "--model_name_or_path", model_dir, "--reward_model_path", str(tmp_path / "rm"),
           "--dataset", str(tmp_path / "prompts.jsonl"), "--output_dir", str(out), "--max_steps", "2",
           "--critic_pretrain_steps", "1", "--rollout_batch_size", "4", "--num_mini_batches", "2",
           "--per_device_train_batch_size", "1", "--response_length", "5", "--report_to", "none",
           "--disable_tqdm", "--learning_rate", "1e-3", "--save_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by rank 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# SFT and reward model: 2 processes × (per-device batch 2) == 1 process × (batch 2, accumulation 2)
# ---------------------------------------------------------------------------------------------

SFT_ROWS = [{"prompt": f"Question {i}:", "response": " ".join(["the cat sat"] * (1 + i % 3))} for i in range(12)]
PAIR_ROWS = [{"prompt": f"Pick {i}:", "chosen": "the cat sat", "rejected": "a dog " * (1 + i % 3)} for i in range(12)]


def _supervised(stage: str, model_dir: str, out: str, accum: int):
    from ppomax.config import RewardConfig, SFTConfig
    from ppomax.data import write_jsonl
    from ppomax.reward import train_reward_model
    from ppomax.sft import train_sft

    torch.set_num_threads(1)
    data = os.path.join(out, "data.jsonl")
    write_jsonl(data, SFT_ROWS if stage == "sft" else PAIR_ROWS)
    kw = dict(model_name_or_path=model_dir, dataset=data, output_dir=os.path.join(out, "run"), max_steps=3,
              per_device_train_batch_size=2, gradient_accumulation_steps=accum, learning_rate=1e-2,
              eval_split=0.0, report_to="none", disable_tqdm=True, max_length=64, max_prompt_length=16, seed=3)
    if stage == "sft":
        return train_sft(SFTConfig(**kw))["metrics"]
    return train_reward_model(RewardConfig(**kw))["metrics"]


def _supervised_worker(rank: int, world: int, port: int, stage: str, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    rows = _supervised(stage, model_dir, out, accum=1)
    torch.save(rows, os.path.join(out, f"rows-{rank}.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_two_process_sft_and_rm_equal_one_process(setup, tmp_path, stage):
    from safetensors.torch import load_file

    root, model_dir = setup
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    n = torch.get_num_threads()
    try:
        one = _supervised(stage, model_dir, str(one_dir), accum=2)
    finally:
        torch.set_num_threads(n)
    mp.start_processes(_supervised_worker, args=(2, _free_port(), stage, model_dir, str(two_dir)), nprocs=2,
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
