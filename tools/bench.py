"""Benchmark one Quiet-STaR step: fast path vs dense path vs a plain causal-LM step.

    python tools/bench.py                          # SmolLM2-135M shape, n=128, r=2, t=8, K=4, batch 1
    python tools/bench.py --preset ref_tiny_mistral
    python tools/bench.py --sweep 4,8,16,24        # fast path over thought lengths
    python tools/bench.py --device cuda --dtype bfloat16 --preset smollm2_360m --batch 4 --peak_tflops 989

Modes, each measured in its own subprocess (so that peak memory is its own):
  fast   rollout (no grad) + learn pass forward + backward, the --backend attention backend
         (auto: split; --backend flex for FlexAttention on CUDA) and vocabulary-chunked log-probs
         (loss_chunk_tokens=1024)
  dense  the same with the dense reference backend and unchunked log-probs
  plain  an ordinary causal-LM forward + backward on the same n base tokens
Random weights of the preset's shape, random token ids; medians over --reps after --warmup.
On CPU every mode runs with qstar_ds.cpu_memory's malloc settings, as training does
(--glibc_malloc_defaults: without them).
Each Quiet-STaR row also gives the medians of its parts: rollout, learn forward, backward.
MFU (with --peak_tflops, the device's dense peak for the dtype) = model FLOPs / time / peak.
Peak memory: ru_maxrss of the subprocess on CPU (includes the model and Python), peak
torch.cuda.max_memory_allocated on GPU.

FLOP accounting (model FLOPs, attention score/value products excluded; P = parameters in the
transformer layers + the output head, i.e. all but the input embedding):
  plain step      6 P n
  Quiet-STaR step 2 P S_roll + 6 P S_learn, with S = n + M (t + K + 1) tokens per sequence,
                  M = (n - K) r streams: the rollout runs every stream token forward once, the
                  learn pass forward and backward once.
  FLOP efficiency = (Quiet-STaR FLOPs / its time) / (plain FLOPs / plain time): how close the
  Quiet-STaR step comes to the throughput of ordinary training on the same hardware. These are
  nominal FLOPs: the fast path skips the log-probs of thoughts whose REINFORCE weight is 0 (about
  half of them, with clipped negative rewards), so its ratio can exceed 1.
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    "smollm2": dict(arch="llama", vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536,
                    tie=True, n=128, r=2, t=8, K=4, batch=1),
    "ref_tiny_mistral": dict(arch="mistral", vocab=32002, hidden=256, layers=4, heads=8, kv_heads=2,
                             intermediate=512, tie=False, n=256, r=2, t=9, K=4, batch=1),
    "smollm2_360m": dict(arch="llama", vocab=49152, hidden=960, layers=32, heads=15, kv_heads=5,
                         intermediate=2560, tie=True, n=256, r=2, t=8, K=4, batch=1),
}


def build(p: dict, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM
    from qstar_ds.model import QuietStarModel, ThoughtTokens, randomize_mixing_head
    from qstar_ds.tiny import tiny_config
    cfg = tiny_config(p["arch"], p["vocab"], hidden=p["hidden"], layers=p["layers"], heads=p["heads"],
                      kv_heads=p["kv_heads"], intermediate=p["intermediate"], tie=p["tie"])
    cfg.max_position_embeddings = 16384
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
    model = QuietStarModel(base, ThoughtTokens(p["vocab"] - 2, p["vocab"] - 1))   # last two ids as markers
    # A non-zero mixing head, as after the first optimizer step: with the zero-initialised head every
    # reward is exactly 0, REINFORCE has no gradient and the fast path's backward (which skips
    # zero-gradient rows) would look better than in training, where about half the thoughts count.
    randomize_mixing_head(model, 0.05, 0)
    params = sum(q.numel() for n_, q in model.base.named_parameters() if "embed_tokens" not in n_)
    if p["tie"]:
        params += base.get_output_embeddings().weight.numel()
    return model, params


def worker(args) -> dict:
    import torch
    from qstar_ds.config import ThoughtConfig
    from qstar_ds.learn import learn_pass
    from qstar_ds.rollout import rollout
    p = dict(PRESETS[args.preset], t=args.thought_len)
    if args.batch:
        p["batch"] = args.batch
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    if dev.type == "cpu" and not args.glibc_malloc_defaults:   # as the trainer does on CPU, every mode
        from qstar_ds.cpu_memory import keep_freed_memory
        keep_freed_memory()
    model, params = build(p, dtype, dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, p["vocab"] - 2, (p["batch"], p["n"]), generator=g).to(dev)
    am = torch.ones_like(x)
    from qstar_ds.attention import resolve_backend
    fast = args.mode == "fast"
    backend = resolve_backend(args.backend) if fast else "dense"
    cfg = ThoughtConfig(thought_len=p["t"], n_thoughts=p["r"], talk_len=p["K"],
                        attention_backend=backend, loss_chunk_tokens=1024 if fast else 0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    parts: dict[str, list[float]] = {"rollout": [], "learn_fwd": [], "backward": []}

    def step():
        sync()
        t0 = time.perf_counter()
        if args.mode == "plain":
            out = model.base(input_ids=x, attention_mask=am, labels=x)
            out.loss.backward()
        else:
            ro = rollout(model, cfg, x, am, generator=torch.Generator(device=dev).manual_seed(0))
            sync()
            t1 = time.perf_counter()
            out = learn_pass(model, cfg, x, am, ro.anchor, ro.thoughts, rewards=ro.rewards)
            sync()
            t2 = time.perf_counter()
            out.loss.backward()
            sync()
            for k, v in zip(parts, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                parts[k].append(v)
        sync()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for v in parts.values():
        v.clear()
    times = [step() for _ in range(args.reps)]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n, K, r, t = p["n"], p["K"], p["r"], p["t"]
    S = n + (n - K) * r * (t + K + 1)
    flops = 6 * params * n if args.mode == "plain" else (2 * params * S + 6 * params * S)
    flops *= p["batch"]
    return {"mode": args.mode, "backend": backend if args.mode != "plain" else "-", "thought_len": t,
            "time_s": statistics.median(times), "times": times,
            "peak_gib": peak, "model_flops": flops, "params": params, "packed_len": S, "batch": p["batch"],
            "parts_s": {k: statistics.median(v) for k, v in parts.items() if v}}


def run_mode(args, mode: str, thought_len: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--preset", args.preset,
           "--thought_len", str(thought_len), "--device", args.device, "--dtype", args.dtype,
           "--reps", str(args.reps), "--warmup", str(args.warmup), "--backend", args.backend,
           "--batch", str(args.batch)] \
        + (["--glibc_malloc_defaults"] if args.glibc_malloc_defaults else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"mode": mode, "thought_len": thought_len, "error": res.stderr.strip().splitlines()[-1][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2", choices=sorted(PRESETS))
    ap.add_argument("--thought_len", type=int, default=None, help="default: the preset's")
    ap.add_argument("--sweep", default="", help="comma-separated thought lengths for the fast path")
    ap.add_argument("--modes", default="fast,dense,plain")
    ap.add_argument("--backend", default="auto", choices=["auto", "split", "flex"], help="the fast path's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (default: the preset's, 1)")
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="the device's dense peak TFLOP/s for --dtype: adds an MFU column (H100/H200 bf16: 989)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--glibc_malloc_defaults", action="store_true",
                    help="CPU: leave glibc's malloc settings alone (default: qstar_ds.cpu_memory's, as in training)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.thought_len is None:
        args.thought_len = PRESETS[args.preset]["t"]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = [run_mode(args, m, args.thought_len) for m in args.modes.split(",")]
    sweep = [run_mode(args, "fast", int(t)) for t in args.sweep.split(",") if t]
    by = {r["mode"]: r for r in rows if "error" not in r}
    malloc = "" if args.device != "cpu" else \
        " malloc=" + ("glibc defaults" if args.glibc_malloc_defaults else "large blocks kept (qstar_ds.cpu_memory)")
    print(f"preset {args.preset} {PRESETS[args.preset]} thought_len={args.thought_len} device={args.device} "
          f"dtype={args.dtype} batch={args.batch or PRESETS[args.preset]['batch']} reps={args.reps}{malloc}")
    mfu = f" {'MFU':>6s}" if args.peak_tflops else ""
    print(f"{'mode':8s} {'backend':7s} {'t':>3s} {'time s':>9s} {'peak GiB':>9s} {'TFLOP':>8s} {'TFLOP/s':>8s}{mfu}"
          f"  parts (rollout / learn fwd / backward s)")
    for r in rows + sweep:
        if "error" in r:
            print(f"{r['mode']:8s} {r['thought_len']:3d} error: {r['error']}")
            continue
        tflops = r["model_flops"] / r["time_s"] / 1e12
        mfu = f" {tflops / args.peak_tflops:6.1%}" if args.peak_tflops else ""
        parts = " / ".join(f"{v:.3f}" for v in r.get("parts_s", {}).values())
        print(f"{r['mode']:8s} {r['backend']:7s} {r['thought_len']:3d} {r['time_s']:9.3f} {r['peak_gib']:9.2f} "
              f"{r['model_flops'] / 1e12:8.3f} {tflops:8.3f}{mfu}  {parts}")
    summary = {}
    if "fast" in by and "dense" in by:
        summary["speedup_fast_vs_dense"] = by["dense"]["time_s"] / by["fast"]["time_s"]
    if "fast" in by and "plain" in by:
        summary["flop_efficiency"] = (by["fast"]["model_flops"] / by["fast"]["time_s"]) / \
                                     (by["plain"]["model_flops"] / by["plain"]["time_s"])
    ok = [r for r in sweep if "error" not in r]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        summary["memory_growth_vs_linear"] = ((b["peak_gib"] - a["peak_gib"]) / (b["thought_len"] - a["thought_len"])) \
            / max(a["peak_gib"] / a["thought_len"], 1e-9)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "sweep": sweep, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
