"""Per-process memory of PPO with --sharding none | zero2 | zero3 (PyTorch FSDP2), 2 processes.

    python benchmarks/sharding_memory.py                  # hidden 512, 8 layers (~38 M params per model)
    python benchmarks/sharding_memory.py --hidden 768 --layers 12

For each mode, two gloo processes (torch.multiprocessing, like tests/test_distributed.py) build
PPOTrainer with a reward model and a critic from one scalar-head checkpoint, run 2 iterations
(1 critic pre-training + 1 PPO) and report, per rank:
- the bytes of model state this rank holds at rest: its parameters (shards under FSDP) of the
  four models plus the AdamW states of policy and critic;
- VmRSS after the iterations and the peak (VmHWM); the peak includes the transient gathered
  blocks, and rank 0's full fp32 copy of each model at start-up (see docs/real_models.md).
Results are in docs/real_models.md §3.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _local_bytes(tensors) -> int:
    from ppomax.sharding import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def _worker(rank: int, world: int, port: int, root: str, mode: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    from ppomax.config import PPOConfig
    from ppomax.ppo.trainer import PPOTrainer

    prompts = [f"Write about topic {i}." for i in range(8)]
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig.from_preset(
            "ppo_max", model_name_or_path=os.path.join(root, "model"), reward_model_path=os.path.join(root, "rm"),
            critic_init="reward_model", output_dir=out, sharding=mode, max_steps=1, critic_pretrain_steps=1,
            rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=1, response_length=16,
            report_to="none", disable_tqdm=True, learning_rate=1e-5, save_steps=10**6, stop_at_eos=False,
        )
        t = time.perf_counter()
        trainer = PPOTrainer(cfg, prompts=prompts)
        rss_init = _status_mb("VmRSS")
        for it in (1, 2):
            trainer.iteration = it
            trainer.step(train_policy=it == 2)
        seconds = time.perf_counter() - t
    models = [m for m in (trainer.policy, trainer.ref_policy, trainer.reward_model, trainer.critic) if m is not None]
    params = _local_bytes(p for m in models for p in m.parameters())
    opt = _local_bytes(t for o in (trainer.policy_opt, trainer.critic_opt) for s in o.state.values()
                       for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    import gc

    from ppomax.sharding import release_host_memory

    rss_after = _status_mb("VmRSS")
    gc.collect()
    release_host_memory()  # freed pages back to the OS: what the process really holds
    rss_trimmed = _status_mb("VmRSS")
    row = {"mode": mode, "rank": rank, "params_mb": round(params / 2**20, 1), "adam_mb": round(opt / 2**20, 1),
           "state_mb": round((params + opt) / 2**20, 1),
           "rss_init_mb": round(rss_init), "rss_trimmed_mb": round(rss_trimmed), "rss_mb": round(rss_after),
           "peak_rss_mb": round(_status_mb("VmHWM")), "seconds": round(seconds, 1)}
    with open(f"{result}-{rank}.json", "w") as fh:
        json.dump(row, fh)
    del trainer, models
    from ppomax.distributed import shutdown

    shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--modes", default="none,zero2,zero3")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    import torch
    import torch.multiprocessing as mp

    from ppomax.models import ScalarHeadModel, build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as root:
        build_tiny_model(os.path.join(root, "model"), num_layers=args.layers, hidden_size=args.hidden,
                         num_heads=max(1, args.hidden // 64), vocab_size=args.vocab)
        torch.manual_seed(0)
        ScalarHeadModel.from_causal_lm(os.path.join(root, "model")).save_pretrained(os.path.join(root, "rm"))
        n = sum(p.numel() for p in ScalarHeadModel.from_pretrained(os.path.join(root, "rm")).parameters())
        print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {n / 1e6:.1f} M parameters "
              f"per scalar-head model; 2 processes", file=sys.stderr)
        for mode in args.modes.split(","):
            result = os.path.join(root, f"res-{mode}")
            mp.start_processes(_worker, args=(2, _free_port(), root, mode, result), nprocs=2, join=True,
                               start_method="spawn")
            for r in range(2):
                with open(f"{result}-{r}.json") as fh:
                    rows.append(json.load(fh))
    print("| mode | rank | parameters held (MB) | AdamW states (MB) | model state (MB) | RSS after set-up (MB) "
          "| RSS after (MB) | RSS after, trimmed (MB) | peak RSS (MB) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['rank']} | {r['params_mb']} | {r['adam_mb']} | {r['state_mb']} | {r['rss_init_mb']} | {r['rss_mb']} | {r['rss_trimmed_mb']} | "
              f"{r['peak_rss_mb']} | {r['seconds']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
