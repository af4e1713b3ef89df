"""How long a qstar_ds step takes on N nodes x G devices, where the time goes, and which knobs to
turn: predicted from FLOP counts, communication volumes and device rates; validated against
measured CPU steps.

    python tools/step_time.py                                # mistral7b_owm on 1, 2, 8, 16 nodes x 8 H100
    python tools/step_time.py --nodes 8 --knobs              # ZeRO-3 vs ZeRO-3 + hpZ vs ZeRO-2, batch, chunk size
    python tools/step_time.py --preset smollm2 --device cpu --rates rates.json --nodes 1 --gpus_per_node 2
    python tools/step_time.py --validate OUT_DIR             # CPU: calibrate on one shape, predict and
                                                             # measure another on 1 and 2 ranks

The model (per rank; every rank runs the same number of forwards and micro-steps: schedule.py):
- rollout: ceil(units / world) units (schedule.rollout_units) in forwards of train.rollout_batch
  units; each of the t + 2 forwards (prefill of n tokens, t sampling steps of one token per stream,
  the last step of K + 1 tokens per stream) takes max(its FLOPs / rollout rate, the parameter bytes
  it reads / memory bandwidth): decoding small batches is memory-bound on GPUs. ZeRO-3 gathers the
  parameters once per rollout (train.rollout_gather held) or at every forward (never).
- learn: grad_accum micro-steps (schedule.plan_step) of C = n + streams x (t + K + 1) tokens;
  FLOPs 8 P C with gradient checkpointing (forward, recomputed forward, backward = 2 + 2 + 4),
  6 P C without; plus attention 4 layers H keys per token and pass. ZeRO-3 all-gathers the
  parameters for every pass (forward, recomputed forward, backward) and reduce-scatters the
  gradients, at every micro-step; `overlap` of that hides behind compute (DeepSpeed's prefetch).
- optimizer: Adam over the rank's partition (P / world parameters); ZeRO-2 then all-gathers the
  updated parameters; ZeRO-3 + hpZ (ZeRO++ secondary partition, zero_hpz_partition_size = G)
  gathers across nodes once per step and inside the node at every micro-step.
- a collective of B bytes over W ranks: latency + B (W - 1) / W / bandwidth, the bandwidth of
  NVLink inside a node and of InfiniBand (per GPU) across nodes.
P = parameters of the layers and the output head (the input embedding is a lookup).
MFU = model FLOPs (2 P per rollout token + 6 P per learn token, attention included, recompute
excluded) / step time / (peak x world).

Device rates (--device): `h100` defaults are documented assumptions (datasheet peaks and typical
achieved shares, below); `cpu` rates are measured by --validate (or --calibrate) on this machine.
Memory per rank: tools/memory_estimate.py (ZeRO-3); ZeRO-2 keeps the bf16 parameters whole
(2 P bytes) plus 14 P / world bytes of gradients and Adam states.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Rates:
    """What one rank's device does per second. H100 SXM defaults: bf16 dense peak 989 TFLOP/s;
    learn pass at 40% of it (typical of well-tuned 7B training with fused attention; this
    project's best measured on an H200 at 360M scale was 9.4%: docs/PERFORMANCE.md); rollout
    forwards at 40% of peak when compute-bound, else bound by reading every parameter from HBM
    (3.35 TB/s, 80% achieved); Adam at 40 bytes of memory traffic per parameter; NVLink 4
    all-gather bus bandwidth 350 GB/s per GPU; InfiniBand NDR 400 Gb/s per GPU at 90% = 45 GB/s;
    50 us per collective; half of ZeRO-3's learn-pass traffic hidden behind compute."""
    name: str = "h100"
    peak_flops: float = 989e12
    learn_flops: float = 0.40 * 989e12
    rollout_flops: float = 0.40 * 989e12
    mem_bw: float = 0.8 * 3.35e12
    optimizer_params: float = 0.8 * 3.35e12 / 40
    intra_bw: float = 350e9
    inter_bw: float = 45e9
    latency: float = 50e-6
    overlap: float = 0.5
    bytes_per_param: int = 2


@dataclass
class Shape:
    layers: int
    hidden: int
    vocab: int
    params_compute: int      # P: layers + output head
    params_total: int        # everything (what ZeRO partitions and gathers)

    @staticmethod
    def of(c: dict) -> "Shape":
        from memory_estimate import param_counts
        total, _ = param_counts(c)
        V, H = c["vocab_size"] + 2, c["hidden_size"]
        return Shape(c["num_hidden_layers"], H, V, total - (0 if c.get("tie_word_embeddings") else V * H), total)


def collective(nbytes: float, ranks: int, bw: float, lat: float, count: int = 1) -> float:
    """Seconds of `count` ring collectives moving `nbytes` in all over `ranks` ranks."""
    return 0.0 if ranks <= 1 else count * lat + nbytes * (ranks - 1) / ranks / bw


def predict(cfg, shape: Shape, nodes: int, gpus: int, rates: Rates, zero: str = "3") -> dict:
    """Seconds per optimizer step by phase, and MFU. zero: "3", "3+hpz" or "2"."""
    from qstar_ds.schedule import plan_step, rollout_units
    world = nodes * gpus
    n, t, K, r = cfg.data.seq_len, cfg.thought.thought_len, cfg.thought.talk_len, cfg.thought.n_thoughts
    L, P, Hd, Ly = cfg.thought.stream_len, shape.params_compute, shape.hidden, shape.layers
    pbytes = shape.params_total * rates.bytes_per_param
    bw_all = rates.intra_bw if nodes == 1 else rates.inter_bw
    bw_node = rates.intra_bw

    def attn(tokens: float, keys: float) -> float:
        return 4 * Ly * Hd * tokens * keys

    out = {"rollout": 0.0, "rollout_comm": 0.0, "learn": 0.0, "learn_comm": 0.0, "optimizer": 0.0,
           "optimizer_comm": 0.0}
    model_flops = 0.0
    off = cfg.thought.mode == "off"
    if cfg.thought.mode == "quiet_star":
        units = rollout_units(cfg.train.batch_size, cfg.think_positions, world)
        per_rank = -(-len(units) // world)
        rows = min(cfg.train.rollout_batch or per_rank, per_rank)
        Mu = max(b - a for _, a, b in units) * r
        groups = -(-per_rank // rows)
        held = zero.startswith("3") and cfg.train.rollout_gather != "never"
        for tokens, keys in [(rows * n, n / 2)] + [(rows * Mu, n / 2 + k) for k in range(t)] + \
                            [(rows * Mu * (K + 1), n / 2 + t)]:
            fl = 2 * P * tokens + attn(tokens, keys)
            model_flops += groups * fl
            out["rollout"] += groups * max(fl / rates.rollout_flops, P * rates.bytes_per_param / rates.mem_bw)
        if zero.startswith("3"):                      # hpZ: gathered from the node's secondary partition
            gathers = 1 if held else groups * (t + 2)
            ranks, bw = (gpus, bw_node) if zero == "3+hpz" else (world, bw_all)
            out["rollout_comm"] = collective(gathers * pbytes, ranks, bw, rates.latency, gathers * Ly)
    plan = plan_step(cfg, world)
    C = n if off else n + plan.streams_per_chunk * L
    stream_tokens = 0 if off else plan.streams_per_chunk * L
    passes = 4 if cfg.model.gradient_checkpointing else 3      # in units of one forward (2 P per token)
    fl_chunk = passes * (2 * P * C + attn(n, n / 2) + attn(stream_tokens, n / 2 + L / 2))
    out["learn"] = plan.grad_accum * fl_chunk / rates.learn_flops
    model_flops += plan.total_chunks / world * 3 * (2 * P * C + attn(n, n / 2) + attn(stream_tokens, n / 2 + L / 2))
    gathers = 3 if cfg.model.gradient_checkpointing else 2     # forward, (recomputed forward,) backward
    if zero == "3":
        per_micro = collective((gathers + 1) * pbytes, world, bw_all, rates.latency, (gathers + 1) * Ly)
    elif zero == "3+hpz":
        per_micro = collective(gathers * pbytes, gpus, bw_node, rates.latency, gathers * Ly) + \
            collective(pbytes, world, bw_all, rates.latency, Ly)
    else:
        per_micro = collective(pbytes, world, bw_all, rates.latency, Ly)
    out["learn_comm"] = plan.grad_accum * per_micro * (1 - rates.overlap)
    out["optimizer"] = shape.params_total / world / rates.optimizer_params
    if zero in ("2", "3+hpz"):
        out["optimizer_comm"] = collective(pbytes, world, bw_all, rates.latency, Ly)
    total = sum(out.values())
    return {"seconds": out, "step_s": total, "mfu": model_flops / total / rates.peak_flops,
            "micro_steps": plan.grad_accum, "chunk_tokens": C, "model_tflops_per_rank": model_flops / 1e12}


def memory_gib(cfg, c: dict, nodes: int, gpus: int, zero: str) -> float:
    from memory_estimate import GiB, estimate
    est = estimate(c, cfg, nodes, gpus, cfg.thought.loss_chunk_tokens or 1024)
    if zero != "2":
        return est["GiB"]["peak per GPU"]
    P, world = est["params"], nodes * gpus
    states = (2 * P + 14 * P / world) / GiB
    act = max(est["GiB"]["learn total"], est["GiB"]["rollout: KV cache + logits"])
    return states + act


def table(cfg, c: dict, shape: Shape, rates: Rates, nodes_list, gpus: int, zero: str = "3") -> list[str]:
    lines = [f"{'nodes':>5} {'GPUs':>5} {'step s':>8} {'rollout':>8} {'r-comm':>7} {'learn':>7} {'l-comm':>7} "
             f"{'optim':>6} {'o-comm':>6} {'MFU':>6} {'GiB/GPU':>8}"]
    for nodes in nodes_list:
        p = predict(cfg, shape, nodes, gpus, rates, zero)
        s = p["seconds"]
        lines.append(f"{nodes:5d} {nodes * gpus:5d} {p['step_s']:8.2f} {s['rollout']:8.2f} {s['rollout_comm']:7.2f} "
                     f"{s['learn']:7.2f} {s['learn_comm']:7.2f} {s['optimizer']:6.2f} {s['optimizer_comm']:6.2f} "
                     f"{p['mfu']:6.1%} {memory_gib(cfg, c, nodes, gpus, zero):8.1f}")
    return lines


def knobs(preset: str, c: dict, shape: Shape, rates: Rates, nodes: int, gpus: int, gpu_gib: float) -> list[str]:
    """Every combination of ZeRO variant, batch and chunk size that fits: seconds per sequence."""
    from qstar_ds.cli import make_config
    rows = []
    base = make_config(preset)
    for zero in ("3", "3+hpz", "2"):
        for batch in sorted({base.train.batch_size, 2 * base.train.batch_size, 4 * base.train.batch_size}):
            for chunk in (2048, 4096, 8192, 16384):
                for gather in ("auto", "never") if zero != "2" else ("auto",):   # ZeRO-2 gathers nothing
                    cfg = make_config(preset, None, {"train.batch_size": batch, "train.chunk_tokens": chunk,
                                                     "train.rollout_gather": gather})
                    mem = memory_gib(cfg, c, nodes, gpus, zero)
                    if mem > gpu_gib * 0.9:
                        continue
                    p = predict(cfg, shape, nodes, gpus, rates, zero)
                    rows.append((p["step_s"] / batch, zero, batch, chunk, gather, p["step_s"], p["mfu"], mem))
    rows.sort()
    out = [f"{'s/sequence':>10} {'ZeRO':>6} {'batch':>5} {'chunk':>6} {'rollout_gather':>14} {'step s':>7} "
           f"{'MFU':>6} {'GiB/GPU':>8}"]
    out += [f"{a:10.3f} {z:>6} {b:5d} {ch:6d} {g:>14} {s:7.2f} {m:6.1%} {g2:8.1f}" for a, z, b, ch, g, s, m, g2 in rows[:12]]
    return out


# ---- measuring on this machine (CPU) ------------------------------------------------------------
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainer(out: str, ranks: int, threads: int, overrides: list[str], steps: int) -> dict:
    """Train `steps` steps of the smollm2 preset with `overrides` on `ranks` CPU ranks of `threads`
    threads each. -> median step and rollout seconds over the steps after the first."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    args = ["qstar_ds/train.py", "--preset", "smollm2", "--ds_config", "ds_configs/zero3.json", "--output_dir", out,
            "--train.max_steps", str(steps), "--train.eval_every", "0", "--eval.sequences", "1",
            "--train.log_every", "1", "--train.keep_last", "1", "--resume", "none"] + overrides
    if ranks == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}"] + args
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"step_time: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if x.strip()]
    rows = [r for r in rows if "step_time_s" in r and r["step"] > 1]
    return {"step_s": statistics.median(r["step_time_s"] for r in rows),
            "rollout_s": statistics.median(r["rollout_time_s"] for r in rows), "steps": len(rows)}


def comm_rates(threads: int) -> dict:
    """Bandwidth and latency of gloo all-gathers between 2 local ranks (a torchrun of this file)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.abspath(__file__), "--comm_worker"]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    line = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode != 0 or not line:
        raise SystemExit(f"step_time: comm benchmark failed:\n{res.stderr[-3000:]}")
    return json.loads(line[-1])


def comm_worker() -> None:
    import time

    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    W = dist.get_world_size()
    res = {}
    for size in (1024, 64 * 2**20):
        x = torch.ones(size // 4 // W)
        out = torch.empty(x.numel() * W)
        for _ in range(2):
            dist.all_gather_into_tensor(out, x)
        t0 = time.perf_counter()
        reps = 10
        for _ in range(reps):
            dist.all_gather_into_tensor(out, x)
        res[size] = (time.perf_counter() - t0) / reps
    if dist.get_rank() == 0:
        lat = res[1024]
        print(json.dumps({"latency": lat, "bw": 64 * 2**20 * (W - 1) / W / (res[64 * 2**20] - lat)}))
    dist.destroy_process_group()


def adam_rate(threads: int, numel: int = 20_000_000) -> float:
    """Adam parameter updates per second on this CPU with `threads` threads."""
    import time

    import torch
    torch.set_num_threads(threads)
    p = torch.nn.Parameter(torch.zeros(numel))
    p.grad = torch.ones(numel)
    opt = torch.optim.AdamW([p], lr=1e-5, foreach=False)
    opt.step()
    t0 = time.perf_counter()
    for _ in range(3):
        opt.step()
    return numel * 3 / (time.perf_counter() - t0)


def calibrate(cfg, shape: Shape, measured: dict, threads: int) -> Rates:
    """CPU rates from one measured single-rank run of `cfg`: the rollout and learn FLOP rates that
    reproduce it (Adam measured on its own; fp32 parameters; no memory-bandwidth floor)."""
    probe = Rates(name="cpu", peak_flops=1.0, learn_flops=1.0, rollout_flops=1.0, mem_bw=float("inf"),
                  optimizer_params=adam_rate(threads), intra_bw=1.0, inter_bw=1.0, latency=0.0, overlap=0.0,
                  bytes_per_param=4)
    p = predict(cfg, shape, 1, 1, probe)             # at rate 1: the seconds are the FLOPs
    learn_s = measured["step_s"] - measured["rollout_s"] - p["seconds"]["optimizer"]
    return dataclasses.replace(probe, rollout_flops=p["seconds"]["rollout"] / measured["rollout_s"],
                               learn_flops=p["seconds"]["learn"] / learn_s)


def validate(out: str) -> int:
    """Calibrate on shape A (n=64, batch 1) with 1 and 2 threads, then predict shape B (n=128,
    batch 2) on 1 rank (2 threads) and 2 ranks (1 thread each, gloo), and measure both."""
    from memory_estimate import KNOWN

    from qstar_ds.cli import make_config
    os.makedirs(out, exist_ok=True)
    shape_c = KNOWN["smollm2"]
    shape = Shape.of(shape_c)
    A = {"data.seq_len": 64, "train.batch_size": 1}
    B = {"data.seq_len": 128, "train.batch_size": 2}

    def flags(d):
        return [x for k, v in d.items() for x in (f"--{k}", str(v))]

    report = {"A": A, "B": B}
    rates = {}
    for threads in (1, 2):
        m = run_trainer(os.path.join(out, f"A_t{threads}"), 1, threads, flags(A), 4)
        rates[threads] = calibrate(make_config("smollm2", None, A), shape, m, threads)
        report[f"calibration_{threads}_threads"] = {"measured": m, "rates": dataclasses.asdict(rates[threads])}
        print(f"calibrated on A with {threads} thread(s): step {m['step_s']:.2f} s (rollout {m['rollout_s']:.2f}); "
              f"rollout {rates[threads].rollout_flops / 1e9:.1f} GFLOP/s, learn {rates[threads].learn_flops / 1e9:.1f} "
              f"GFLOP/s, Adam {rates[threads].optimizer_params / 1e6:.0f} M params/s", flush=True)
    comm = comm_rates(1)
    report["gloo"] = comm
    print(f"gloo all-gather between 2 ranks: {comm['bw'] / 1e9:.2f} GB/s, latency {comm['latency'] * 1e6:.0f} us", flush=True)
    cfgB = make_config("smollm2", None, B)
    rows = []
    for ranks, threads in ((1, 2), (2, 1)):
        r = dataclasses.replace(rates[threads], intra_bw=comm["bw"], inter_bw=comm["bw"], latency=comm["latency"])
        pred = predict(cfgB, shape, 1, ranks, r)
        meas = run_trainer(os.path.join(out, f"B_r{ranks}"), ranks, threads, flags(B), 4)
        err = pred["step_s"] / meas["step_s"] - 1
        rows.append({"ranks": ranks, "threads_per_rank": threads, "predicted_s": pred["step_s"],
                     "predicted_rollout_s": pred["seconds"]["rollout"] + pred["seconds"]["rollout_comm"],
                     "measured_s": meas["step_s"], "measured_rollout_s": meas["rollout_s"], "error": err,
                     "phases": pred["seconds"]})
        print(f"B on {ranks} rank(s) x {threads} thread(s): predicted {pred['step_s']:.2f} s, measured "
              f"{meas['step_s']:.2f} s ({err:+.1%}); rollout predicted "
              f"{rows[-1]['predicted_rollout_s']:.2f} s, measured {meas['rollout_s']:.2f} s", flush=True)
    report["validation"] = rows
    with open(os.path.join(out, "step_time_validation.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0 if all(abs(r["error"]) <= 0.25 for r in rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mistral7b_owm")
    ap.add_argument("--nodes", default="1,2,8,16", help="comma-separated node counts")
    ap.add_argument("--gpus_per_node", type=int, default=8)
    ap.add_argument("--zero", default="3", choices=["3", "3+hpz", "2"])
    ap.add_argument("--rates", default=None, help="a JSON of Rates fields (e.g. from --validate's calibration)")
    ap.add_argument("--gpu_gib", type=float, default=80.0)
    ap.add_argument("--knobs", action="store_true", help="rank ZeRO variant x batch x chunk size x rollout gather")
    ap.add_argument("--validate", metavar="OUT_DIR", default=None)
    ap.add_argument("--comm_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.seq_len=512")
    args = ap.parse_args(argv)
    if args.comm_worker:
        comm_worker()
        return 0
    if args.validate:
        return validate(args.validate)
    from memory_estimate import KNOWN

    from qstar_ds.cli import make_config
    cfg = make_config(args.preset, None, dict(kv.split("=", 1) for kv in args.overrides))
    if cfg.model.name not in KNOWN:
        print(f"step_time: error: no built-in shape for model {cfg.model.name!r}", file=sys.stderr)
        return 2
    c = KNOWN[cfg.model.name]
    shape = Shape.of(c)
    rates = Rates()
    if args.rates:
        with open(args.rates) as f:
            rates = Rates(**json.load(f))
    nodes = [int(x) for x in args.nodes.split(",")]
    print(f"{cfg.model.name} ({shape.params_total / 1e9:.2f} B parameters), preset {args.preset}: n={cfg.data.seq_len} "
          f"t={cfg.thought.thought_len} K={cfg.thought.talk_len} r={cfg.thought.n_thoughts}, batch "
          f"{cfg.train.batch_size}, chunk_tokens {cfg.train.chunk_tokens}, rollout_gather "
          f"{cfg.train.rollout_gather}; ZeRO {args.zero}; device rates: {rates.name} (seconds per optimizer step)")
    print("\n".join(table(cfg, c, shape, rates, nodes, args.gpus_per_node, args.zero)))
    if args.knobs:
        for n in nodes:
            print(f"\nbest settings on {n} x {args.gpus_per_node} ({args.gpu_gib:.0f} GiB per device), fastest first:")
            print("\n".join(knobs(args.preset, c, shape, rates, n, args.gpus_per_node, args.gpu_gib)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
