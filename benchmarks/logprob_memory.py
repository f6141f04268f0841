"""Memory and time of the PPO log-prob head: plain (B, T, V) logits vs ``functional.chunked_logprobs``.

    python benchmarks/logprob_memory.py                         # SmolLM2 shape: V 49 152, H 576, B 16, T 64
    python benchmarks/logprob_memory.py --bf16 --repeats 3      # under bf16 autocast
    python benchmarks/logprob_memory.py --vocab 152064 --hidden 3584 --device cuda   # a Qwen2-7B-sized head

A random fp32 ``nn.Linear`` head (V, H) over random hidden states (B, T + 1, H) stands in for the
model, so nothing is downloaded; the head is all that differs between the two paths. What each
variant computes is what ``ppo.rollout.response_logprobs`` does with its head output:

- ``plain``: logits = head(hidden) over the T + 1 kept positions (``logits_to_keep``), the first T
  sliced, divided by the temperature, ``logprobs_from_logits`` and ``entropy_from_logits``;
- ``chunked``: ``chunked_logprobs(hidden[:, :T], head.weight, tokens, τ, with_entropy=True)``.

Two phases per variant: ``train`` = forward with grad + backward of a PPO-like loss
(−Â·log π, the entropy detached as with ``entropy_coef = 0``, PPO-max's default; ``--entropy-grad``
puts −0.01·H in the loss), and ``rollout`` = the no-grad forward of π_old / π_ref.

Every run is its own subprocess, runs alternate plain, chunked, plain, ... (``--repeats`` pairs) so
that drift in machine load hits both. Each child does one warm-up and ``--iters`` measured
iterations per phase and reports, per phase:

- ``saved_mb``: bytes of the distinct storages autograd saves for the backward
  (``torch.autograd.graph.saved_tensors_hooks``; train only), and ``saved_mb_no_weight`` the same
  without the head's weight (a parameter: saving it costs nothing);
- ``peak_mb``: the peak memory above what was allocated before the phase started. On CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each iteration) minus the RSS before it, with glibc's mmap
  threshold pinned at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go back to the
  OS and each iteration's peak is its own (no tracemalloc: it would not see torch's allocations);
- ``ms``: median wall-clock milliseconds per iteration.

The parent prints medians over the runs and the chunked / plain ratios (and ``--json`` writes
every run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _Peak:
    """Peak memory (MiB) of a block above the memory in use when it starts."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kb("VmHWM") * 1024
        self.mb = (peak - self.base) / 2**20
        return False


def run_child(args) -> dict:
    import torch

    from ppomax import functional as F

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, V = args.batch, args.length, args.hidden, args.vocab
    head = torch.nn.Linear(H, V, bias=False, device=device)
    with torch.no_grad():  # logits of a few nats, like a trained LM head's
        head.weight.copy_(torch.randn(V, H, generator=g, device=device) / H**0.5 * 3.0)
    hidden_data = torch.randn(B, T + 1, H, generator=g, device=device)
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)
    adv = torch.randn(B, T, generator=g, device=device)
    mask = torch.ones(B, T, device=device)
    tau = 0.7

    def logprobs(hidden):
        if args.variant == "plain":
            logits = head(hidden)[:, :-1] / tau  # logits_to_keep = T + 1, then the T predicting positions
            logp = F.logprobs_from_logits(logits, tokens)
            if args.entropy_grad:
                return logp, F.entropy_from_logits(logits)
            with torch.no_grad():
                return logp, F.entropy_from_logits(logits.detach())
        logp, ent = F.chunked_logprobs(hidden[:, :-1], head.weight, tokens, tau, with_entropy=True)
        return logp, (ent if args.entropy_grad else ent.detach())

    def train_step():
        hidden = hidden_data.clone().requires_grad_()
        logp, ent = logprobs(hidden)
        loss = F.masked_mean(-adv * logp, mask) - (0.01 * F.masked_mean(ent, mask) if args.entropy_grad else 0.0)
        loss.backward()
        return hidden.grad

    def rollout_step():
        with torch.no_grad():
            return logprobs(hidden_data)[0]

    def saved_mb() -> tuple[float, float]:
        """(all saved storages, those other than the head's weight, which is alive anyway), MiB."""
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        hidden = hidden_data.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, _ = logprobs(hidden)
        del logp
        total = sum(storages.values())
        return total / 2**20, (total - storages.get(head.weight.untyped_storage().data_ptr(), 0)) / 2**20

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    out = {"variant": args.variant}
    with autocast:
        out["saved_mb"], out["saved_mb_no_weight"] = (round(x, 2) for x in saved_mb())
        for phase, step in (("train", train_step), ("rollout", rollout_step)):
            step()  # warm-up: thread pools, kernels, the weight's .grad buffer
            head.weight.grad = None
            peaks, times = [], []
            for _ in range(args.iters):
                with _Peak(device) as p:
                    t = time.perf_counter()
                    r = step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                    del r
                    head.weight.grad = None  # the (V, H) gradient is the same in both; keep it out of the next peak
                peaks.append(p.mb)
            out[phase] = {"peak_mb": round(max(peaks), 1), "ms": round(1000 * statistics.median(times), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64, help="response tokens T")
    ap.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    ap.add_argument("--entropy-grad", action="store_true", help="the entropy bonus enters the loss")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="alternating plain/chunked run pairs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", choices=("plain", "chunked"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant is not None:
        print(json.dumps(run_child(args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--json") and a != args.json]
    runs = []
    for r in range(args.repeats):
        for variant in ("plain", "chunked"):
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--variant", variant]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.exit(f"{variant} run failed:\n{res.stderr}")
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"run {r + 1} {variant}: {runs[-1]}", flush=True)

    def med(variant, *keys):
        vals = []
        for run in runs:
            if run["variant"] == variant:
                x = run
                for k in keys:
                    x = x[k]
                vals.append(x)
        return statistics.median(vals)

    print(f"\nB={args.batch} T={args.length} H={args.hidden} V={args.vocab} {'bf16 autocast' if args.bf16 else 'fp32'} "
          f"on {args.device} ({args.threads} threads), entropy grad {'on' if args.entropy_grad else 'off'}; "
          f"medians of {args.repeats} runs x {args.iters} iterations")
    print("| measure | plain | chunked | chunked / plain |\n|---|---|---|---|")
    for keys, name in ((("saved_mb",), "saved for backward, MiB"),
                       (("saved_mb_no_weight",), "saved for backward beyond the weight, MiB"), (("train", "peak_mb"), "train peak, MiB"),
                       (("train", "ms"), "train ms"), (("rollout", "peak_mb"), "rollout peak, MiB"),
                       (("rollout", "ms"), "rollout ms")):
        a, b = med("plain", *keys), med("chunked", *keys)
        print(f"| {name} | {a:g} | {b:g} | {b / a:.3f} |" if a else f"| {name} | {a:g} | {b:g} | - |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
