"""PPO on one GPU: ppomax against TRL 1.12's PPOTrainer, measured in the same run (issue 22).

    bash .gpu/run.sh python benchmarks/gpu_ppo.py --json $OUT/gpu.json    # the lent H200: runs stop at 420 s (--budget-s)
    python benchmarks/gpu_ppo.py --smoke --json smoke.json                 # CPU, tiny shapes: checks the script

Models: random Llama weights of real shapes, built on the device in this run (nothing is downloaded),
fp32 master weights, bf16 autocast for both libraries; the tokenizer is ppomax's tiny BPE one (the
embedding and LM head still have the full vocabulary):

| config | shape | parameters |
|---|---|---|
| llama-0.8b | hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 5632, vocab 49 152 (GPU.md's) | 0.82 B |
| smollm2-135m | hidden 576, 30 layers, 9 heads, 3 KV heads, FFN 1536, vocab 49 152 | 0.13 B |
| llama-3b | hidden 3072, 28 layers, 24 heads, 8 KV heads, FFN 8192, vocab 49 152 | 2.9 B |

PPO shape (both libraries): 64 prompts of exactly 64 tokens, 256 new tokens (no EOS stop), 4
mini-batches of 16, 1 epoch, temperature 0.7, lr 1e-6; the policy is the reference, one scalar-head
checkpoint is the reward model and the critic's start (ppo_throughput.py's set-up, on a GPU).

Runs, each in its own process (GPU memory = that process's ``torch.cuda.max_memory_reserved``):
- ``roof``: a bf16 8192³ matmul on random data (TFLOP/s, median of 10), at the start and the end;
- ``decode``: the policy alone at B=64, P=64, N=256: ms per decode step of the eager loop, of the
  CUDA-graph decoder (``--rollout_cuda_graph``) and of the graph with bf16 rollout weights
  (``--rollout_bf16_weights``); the graph's tokens against the same steps run without a graph;
- ``ppomax`` (``fast``: ``--bf16 --rollout_cuda_graph --rollout_bf16_weights`` with the frozen models in bf16
  (``--frozen_bf16 auto``); ``eager``: ``--bf16 --frozen_bf16 off``, the set-up of GPU.md's first
  measurement), ``trl``: one warm-up
  iteration (graph capture, lazy initialisation) then ``--iters`` (2) measured ones. Order: on
  llama-0.8b fast, TRL, eager, fast, TRL (``--repeats`` 2), then smollm2-135m fast, TRL, eager,
  then llama-3b fast (ppomax only, with gradient checkpointing: two trained fp32 3 B models with
  AdamW are ~93 GB before anything else). Phases come from each library's own timers, with a CUDA
  synchronize at the end of each phase.

MFU: FLOPs the iteration needs (ppo_throughput.model_flops, grouped-query k/v width) over seconds
over the measured bf16 roof. Runs that would overrun ``--budget-s`` are skipped and say so; the
JSON is rewritten after every run, so a timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo_throughput as PT  # noqa: E402  (the children and FLOP counts are shared)

CONFIGS = {
    "llama-0.8b": dict(layers=16, hidden=2048, ffn=5632, heads=32, kv_heads=8, vocab=49152),
    "smollm2-135m": dict(layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3, vocab=49152),
    "llama-3b": dict(layers=28, hidden=3072, ffn=8192, heads=24, kv_heads=8, vocab=49152),
}
SHAPE = dict(batch=64, prompt=64, response=256)
SMOKE = {"tiny": dict(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=512, batch=4, prompt=8, response=8)}
FAST = {"rollout_cuda_graph": True, "rollout_bf16_weights": True, "frozen_bf16": "auto"}  # 'auto': bf16 on a GPU
EAGER = {"frozen_bf16": "off"}  # GPU.md's first measurement: fp32 weights everywhere, bf16 autocast
# (config, runs in order). The first config gets --repeats - 1 more (fast, TRL) rounds after these; later
# entries run while the time budget allows (the 3 B one is ppomax only: TRL's two trained fp32 3 B models
# with Adam alone need ~93 GB before its reference, reward model and activations)
PLAN = [("llama-0.8b", ("fast", "trl", "eager")), ("smollm2-135m", ("fast", "trl", "eager")), ("llama-3b", ("fast",))]
GUESS_S = {"fast": 60, "eager": 70, "trl": 120, "decode": 60, "build": 30}  # before a kind has run once


def _spec_cfg(name: str, smoke: bool) -> dict:
    cfg = dict(SMOKE[name]) if smoke else dict(CONFIGS[name], **SHAPE)
    cfg["kv_dim"] = cfg["hidden"] // cfg["heads"] * cfg["kv_heads"]
    return cfg


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def child_build(spec: dict) -> dict:
    """Policy (= reference) and scalar-head RM checkpoints of the config's shape, and the prompts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppomax.models import ScalarHeadModel, build_tiny_model, load_tokenizer, save_causal_lm

    c, root = spec["cfg"], Path(spec["root"])
    tok = load_tokenizer(build_tiny_model(root / "tok", num_layers=1, hidden_size=64, vocab_size=c["vocab"]))
    config = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["ffn"],
                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                         num_key_value_heads=c["kv_heads"], max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the GPU: seconds instead of minutes for 3 B
        model = LlamaForCausalLM(config)
    save_causal_lm(model, tok, root / "policy")
    torch.manual_seed(1)
    rm = ScalarHeadModel(model.model)  # the policy's backbone and a fresh head, as from_causal_lm
    rm.save_pretrained(root / "rm", tokenizer=tok)
    PT.write_prompts(tok, c, root)
    n = sum(p.numel() for p in model.parameters())
    return {"policy": str(root / "policy"), "rm": str(root / "rm"), "prompts": str(root / "prompts.json"), "params": n}


def child_decode(spec: dict) -> dict:
    """ms per decode step of the policy alone: eager loop, CUDA graph, CUDA graph + bf16 weights."""
    import torch

    from ppomax.engines import Sampling
    from ppomax.engines.graph_decode import GraphDecoder
    from ppomax.engines.hf import Bf16RolloutCopy
    from ppomax.models import load_causal_lm
    from ppomax.ppo import rollout

    c, m = spec["cfg"], spec["models"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_causal_lm(m["policy"]).to(dev).eval()
    ids = torch.tensor(json.loads(Path(m["prompts"]).read_text())["ids"][: c["batch"]], device=dev)
    mask = torch.ones_like(ids)
    s = Sampling(c["response"], (), 0, temperature=PT.TEMPERATURE, stop_at_eos=False)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n: int) -> float:
        fn()  # warm-up: capture, lazy initialisation
        times = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    copy = Bf16RolloutCopy(policy)
    graph, static = GraphDecoder(), GraphDecoder(capture=False)
    eager_run = lambda n: rollout.generate(policy, ids, mask, n, None, 0, PT.TEMPERATURE, stop_at_eos=False,  # noqa: E731
                                           return_logprobs=True)
    out: dict = {}
    with torch.no_grad(), amp:
        prefill = timed(lambda: eager_run(1), spec["iters"])
        runs = {"eager": lambda: eager_run(c["response"]),
                "graph": lambda: graph.generate(policy, ids, mask, s, True),
                "graph_bf16_weights": lambda: graph.generate(copy.module, ids, mask, s, True)}
        for name, fn in runs.items():
            t = timed(fn, spec["iters"])
            out[name] = {"s": round(t, 4), "ms_per_step": round(1000 * (t - prefill) / (c["response"] - 1), 3),
                         "tokens_per_s": round(c["batch"] * c["response"] / t, 1)}
        torch.manual_seed(7)
        a = graph.generate(policy, ids, mask, s, True)
        torch.manual_seed(7)
        b = static.generate(policy, ids, mask, s, True)
        same = (a[0] == b[0]).all(dim=0).long().cumprod(0)  # columns equal in every row, up to the first difference
        k = int(same.sum())
        out["graph_vs_static"] = {"equal_columns": k, "columns": int(a[0].shape[1]), "tokens_equal": bool(torch.equal(a[0], b[0])),
                                  "logp_max_abs_diff_before_divergence": float((a[3][:, :k] - b[3][:, :k]).abs().max()) if k else None}
        if dev.type == "cuda" and spec.get("profile", True):
            try:  # a profiler API change must not cost the timings above
                out["profile_one_step"] = _profile_step(policy, copy.module, ids, mask)
            except Exception as e:
                out["profile_one_step"] = f"failed: {type(e).__name__}: {e}"
    out.update(prefill_s=round(prefill, 4), decoder_counts=graph.counts, fallback=sorted(graph.told), **PT._gpu_memory())
    return out


def _profile_step(policy, copy_module, ids, mask) -> dict:
    """Kernel launches and cast ops in one eager decode step, with fp32 weights under autocast and with
    the bf16 copy (what autocast's cast cache does and does not cover)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ppomax.ppo import rollout

    res = {}
    for name, model in (("fp32_weights_autocast", policy), ("bf16_copy", copy_module)):
        rollout.generate(model, ids, mask, 2, None, 0, stop_at_eos=False)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            rollout.generate(model, ids, mask, 2, None, 0, stop_at_eos=False)  # prefill + one step
            torch.cuda.synchronize()
        ev = prof.key_averages()
        res[name] = {"cuda_kernels": sum(e.count for e in ev if e.device_type.name == "CUDA"),
                     "aten_to_copy_calls": sum(e.count for e in ev if e.key == "aten::_to_copy")}
    return res


def child_roof(spec: dict) -> dict:
    import torch

    if not torch.cuda.is_available():
        return PT.child_matmul_roof({"threads": 2, "bf16": True, "n": 256})
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return {"bf16_gflops": round(2 * n**3 / statistics.median(times) / 1e9, 1), "device": torch.cuda.get_device_name()}


CHILDREN = {"build": child_build, "decode": child_decode, "roof": child_roof, "ppomax": PT.child_ppomax,
            "trl": PT.child_trl}


def run_child(kind: str, spec: dict, timeout: float | None = None) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    try:
        res = subprocess.run([sys.executable, __file__, "--_child", kind, json.dumps(spec)], capture_output=True,
                             text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        return {"error": f"{kind} killed after {timeout:.0f} s (time budget)", "log_tail": text[0][-1500:] + text[1][-3000:]}
    if res.returncode != 0:
        tail = (res.stdout[-1500:] + res.stderr[-3000:]).strip()
        return {"error": f"{kind} exited {res.returncode}", "log_tail": tail}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Parent: plan, time budget, summary
# ---------------------------------------------------------------------------------------------

TARGETS = {  # issue 22, the 0.82 B shape on one H200
    "decode_ms_per_step": ("<=", 2.0), "generate_tokens_per_s": (">=", 25000), "speedup_vs_trl": (">=", 5.0),
    "peak_memory_vs_trl": ("<=", 0.6), "iteration_mfu": (">=", 0.30),
}


def _stats(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4), "n": len(xs)}


def summarize(cfg: dict, runs: dict[str, list[dict]], roof_gflops: float) -> dict:
    fl = PT.model_flops(cfg)
    tokens = cfg["batch"] * cfg["response"]
    out: dict = {"flops": fl}
    for label, rs in runs.items():
        rs = [r for r in rs if "error" not in r]
        if not rs:
            continue
        s = _stats([x for r in rs for x in r["s_per_iter"]])
        ph = {k.split("/")[1]: round(statistics.median(r["phases"][k] for r in rs), 4) for k in rs[0]["phases"]}
        gen = ph["generate"]
        row = {"s_per_iter": s, "phase_s": ph, "generate_tokens_per_s": round(tokens / gen, 1),
               "peak_gpu_reserved_gib": max(r.get("peak_gpu_reserved_gib", 0.0) for r in rs),
               "iteration_mfu": round(fl["iteration"] / s["median"] / 1e9 / roof_gflops, 4),
               "generate_mfu": round(fl["generate"] / gen / 1e9 / roof_gflops, 4)}
        if "train" in ph:
            row["train_mfu"] = round(fl["train"] / ph["train"] / 1e9 / roof_gflops, 4)
        out[label] = row
    if "fast" in out and "trl" in out:
        out["speedup_vs_trl"] = round(out["trl"]["s_per_iter"]["median"] / out["fast"]["s_per_iter"]["median"], 2)
        if out["trl"]["peak_gpu_reserved_gib"]:
            out["peak_memory_vs_trl"] = round(out["fast"]["peak_gpu_reserved_gib"] / out["trl"]["peak_gpu_reserved_gib"], 2)
    if "fast" in out and "eager" in out:
        out["fast_vs_eager"] = round(out["eager"]["s_per_iter"]["median"] / out["fast"]["s_per_iter"]["median"], 2)
    return out


def check_targets(summary: dict, decode: dict | None) -> dict:
    got = {"speedup_vs_trl": summary.get("speedup_vs_trl"), "peak_memory_vs_trl": summary.get("peak_memory_vs_trl")}
    if "fast" in summary:
        got["generate_tokens_per_s"] = summary["fast"]["generate_tokens_per_s"]
        got["iteration_mfu"] = summary["fast"]["iteration_mfu"]
    if decode and "graph_bf16_weights" in decode:
        got["decode_ms_per_step"] = decode["graph_bf16_weights"]["ms_per_step"]
    out = {}
    for k, (op, bound) in TARGETS.items():
        v = got.get(k)
        out[k] = {"target": f"{op} {bound}", "measured": v,
                  "met": None if v is None else (v <= bound if op == "<=" else v >= bound)}
    return out


def print_table(results: dict) -> None:
    roof = results.get("roof", {}).get("start", {})
    print(f"\nbf16 matmul roof: {roof.get('bf16_gflops')} GFLOP/s ({roof.get('device', 'cpu')}); "
          f"elapsed {results.get('elapsed_s')} s")
    head = f"{'config':13s} {'run':6s} {'s/iter':>8s} {'generate':>9s} {'fwd+score':>9s} {'train':>7s} " \
           f"{'gen tok/s':>10s} {'peak GiB':>9s} {'iter MFU':>9s} {'gen MFU':>8s} {'train MFU':>9s}"
    print(head)
    for name, r in results["configs"].items():
        sm = r.get("summary", {})
        for label in ("fast", "eager", "trl"):
            x = sm.get(label)
            if not x:
                continue
            ph = x["phase_s"]
            fwd = ph.get("forward", 0) + ph.get("score", 0)
            train = ph.get("train", ph.get("train_and_rest", float("nan")))
            print(f"{name:13s} {label:6s} {x['s_per_iter']['median']:8.3f} {ph['generate']:9.3f} {fwd:9.3f} "
                  f"{train:7.3f} {x['generate_tokens_per_s']:10.0f} {x['peak_gpu_reserved_gib']:9.1f} "
                  f"{x['iteration_mfu']:9.1%} {x['generate_mfu']:8.1%} "
                  f"{format(x['train_mfu'], '9.1%') if 'train_mfu' in x else '-':>9s}")
        extra = {k: sm[k] for k in ("speedup_vs_trl", "peak_memory_vs_trl", "fast_vs_eager") if k in sm}
        if extra:
            print(f"{'':13s} {extra}")
        if "decode" in r and "eager" in r["decode"]:
            d = r["decode"]
            print(f"{'':13s} decode ms/step: eager {d['eager']['ms_per_step']}, graph {d['graph']['ms_per_step']}, "
                  f"graph + bf16 weights {d['graph_bf16_weights']['ms_per_step']}; graph vs static {d['graph_vs_static']}")
    for k, v in results.get("targets", {}).items():
        print(f"target {k:24s} {v['target']:>10s}  measured {v['measured']}  met {v['met']}")
    for s in results.get("skipped", []):
        print(f"skipped: {s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny model, 1 iteration: checks the script, measures nothing")
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every run)")
    ap.add_argument("--iters", type=int, default=None, help="measured iterations per run (default 2; smoke 1)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="(fast, TRL) rounds on the first config, the first with eager ppomax too (default 2; smoke 1)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip runs that would end after this many seconds (default 420; smoke 3600)")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--skip-trl", action="store_true", help="only ppomax")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a PPOConfig field for both ppomax runs, e.g. per_device_train_batch_size=32 (repeatable)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        kind, spec = args._child
        print(json.dumps(CHILDREN[kind](json.loads(spec))))
        return
    import importlib.util

    iters = args.iters or (1 if args.smoke else 2)
    budget = args.budget_s or (3600.0 if args.smoke else 420.0)
    repeats = args.repeats or (1 if args.smoke else 2)
    plan = [("tiny", ("fast", "trl", "eager"))] if args.smoke else PLAN
    if args.configs:
        plan = [(n, k) for n, k in plan if n in args.configs.split(",")]
    trl_ok = importlib.util.find_spec("trl") is not None and not args.skip_trl
    user_set = {}
    for item in args.set:
        k, _, v = item.partition("=")
        try:
            user_set[k] = json.loads(v)
        except json.JSONDecodeError:
            user_set[k] = v
    t0 = time.time()
    results: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": PT.machine_info(),
                     "settings": {"iters": iters, "repeats": repeats, "budget_s": budget, "fast": FAST,
                                  "shape": SHAPE if not args.smoke else "smoke", "temperature": PT.TEMPERATURE,
                                  "num_mini_batches": PT.NUM_MINI_BATCHES, "bf16_autocast": True, "set": user_set},
                     "configs": {}, "skipped": []}
    if not trl_ok:
        note = "TRL's side skipped: trl is not installed (pip install trl==1.12.0)" if not args.skip_trl else "--skip-trl"
        results["skipped"].append(note)
        print(note, flush=True)

    def save() -> None:
        results["elapsed_s"] = round(time.time() - t0, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    took: dict[tuple[str, str], float] = {}
    first = plan[0][0] if plan else None

    def estimate(kind: str, name: str) -> float:
        if (kind, name) in took:
            return took[(kind, name)]
        if (kind, first) in took and name in CONFIGS and first in CONFIGS:  # scale by parameter count
            ratio = PT.model_flops(_spec_cfg(name, False))["params_body"] / PT.model_flops(_spec_cfg(first, False))["params_body"]
            return took[(kind, first)] * max(ratio, 0.5)
        return GUESS_S.get(kind, 60)

    def run(kind: str, name: str, spec: dict, label: str | None = None) -> dict | None:
        label = label or kind
        if time.time() - t0 + estimate(label, name) > budget - 15:
            results["skipped"].append(f"{name} {label}: over the time budget (~{estimate(label, name):.0f} s)")
            save()
            return None
        t = time.time()
        # a run that hangs or overruns its estimate badly is stopped where the budget (and 60 s more) ends
        r = run_child(kind, spec, timeout=max(60.0, budget + 60 - (t - t0)))
        took[(label, name)] = time.time() - t
        if "error" in r:
            print(f"  [{name}] {label} failed: {r['error']}\n{r['log_tail'][-1200:]}", flush=True)
        return r

    results["roof"] = {"start": run_child("roof", {})}
    roof = results["roof"]["start"]["bf16_gflops"]
    print(f"bf16 matmul roof: {results['roof']['start']}", flush=True)
    save()
    with tempfile.TemporaryDirectory(dir=os.environ.get("GPU_PPO_TMP")) as tmp:
        for name, kinds in plan:
            cfg = _spec_cfg(name, args.smoke)
            entry: dict = {"settings": cfg, "runs": {}}
            results["configs"][name] = entry
            models = run("build", name, {"cfg": cfg, "root": str(Path(tmp) / name)})
            if models is None or "error" in models:
                entry["build"] = models
                save()
                continue
            entry["params"] = models.pop("params")
            base = {"cfg": cfg, "models": models, "iters": iters, "threads": 2, "seed": 0, "bf16": True}
            if name == first:
                entry["decode"] = run("decode", name, dict(base, iters=2))
                save()
            extra = {"gradient_checkpointing": True} if name == "llama-3b" else {}  # to fit 2 trained 3 B models
            extra.update(user_set)
            specs = {"fast": ("ppomax", dict(base, ppomax_options={**FAST, **extra})),
                     "eager": ("ppomax", dict(base, ppomax_options={**EAGER, **extra})), "trl": ("trl", base)}
            order = [*kinds, *(("fast", "trl") * (repeats - 1) if name == first else ())]
            order = [k for k in order if k != "trl" or trl_ok]
            for label in order:
                kind, spec = specs[label]
                r = run(kind, name, spec, label)
                if r is None:
                    continue
                entry["runs"].setdefault(label, []).append(r)
                if "error" not in r:
                    print(f"  [{name}] {label:5s}: median {statistics.median(r['s_per_iter']):.3f} s/iter, "
                          f"peak GPU {r.get('peak_gpu_reserved_gib', '-')} GiB", flush=True)
                entry["summary"] = summarize(cfg, entry["runs"], roof)
                save()
            if name == "llama-0.8b":
                results["targets"] = check_targets(entry.get("summary", {}), entry.get("decode"))
            import shutil

            shutil.rmtree(Path(tmp) / name, ignore_errors=True)  # a 3 B pair of checkpoints is 24 GB of disk
    if not args.smoke:
        results["roof"]["end"] = run_child("roof", {})
    save()
    print_table(results)
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
