"""Time one Quiet-STaR step of the core (rollout + learn pass + backward) on a real model.

    python tools/core_step.py                       # SmolLM2-135M, n=128, r=2, t=8, K=4, batch 1
    /usr/bin/time -v python tools/core_step.py      # + peak RSS
    python tools/core_step.py --device cuda --dtype bfloat16

Prints the wall time of each phase (after one warm-up step unless --no-warmup) and, on CUDA,
the peak allocated memory. Not a benchmark of the trainer: no optimizer, no DeepSpeed.
"""
from __future__ import annotations

import argparse
import time

import torch

from qstar_ds.config import ThoughtConfig
from qstar_ds.hub import build_base
from qstar_ds.learn import learn_pass
from qstar_ds.model import QuietStarModel
from qstar_ds.rollout import rollout

TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
        "May. How many clips did Natalia sell altogether in April and May? In May she sold 48 / 2 = 24 "
        "clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72. ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help="smollm2, random-smollm2 (same shape, random weights, no download), "
                         "a local HF directory or a hub name")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--r", type=int, default=2)
    ap.add_argument("--thought_len", type=int, default=8)
    ap.add_argument("--talk_len", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=1, help="timed steps (after the warm-up)")
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    base, tok = build_base(args.model, dtype)
    model = QuietStarModel.from_base(base, tok).to(args.device)
    print(f"load: {time.perf_counter() - t0:.1f}s")
    ids = tok.encode(TEXT * (args.n // 20 + 1), add_special_tokens=False)[: args.n]
    x = torch.tensor([ids] * args.batch, device=args.device)
    am = torch.ones_like(x)
    cfg = ThoughtConfig(thought_len=args.thought_len, n_thoughts=args.r, talk_len=args.talk_len)
    gen = torch.Generator(device=args.device).manual_seed(0)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        sync(); a = time.perf_counter()
        ro = rollout(model, cfg, x, am, generator=gen)
        sync(); b = time.perf_counter()
        out = learn_pass(model, cfg, x, am, ro.anchor, ro.thoughts, rewards=ro.rewards)
        sync(); c = time.perf_counter()
        out.loss.backward()
        sync(); d = time.perf_counter()
        model.zero_grad(set_to_none=True)
        return b - a, c - b, d - c, ro, out

    if not args.no_warmup:
        step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        tr, tl, tb, ro, out = step()
        M = ro.anchor.shape[1]
        S = args.n + M * cfg.stream_len
        print(f"rollout {tr:.2f}s  learn fwd {tl:.2f}s  backward {tb:.2f}s  total {tr + tl + tb:.2f}s  "
              f"(streams/row {M}, packed length {S}, loss {out.loss.item():.4g}, "
              f"talk {out.losses['talk'].item():.4f}, base {out.losses['base'].item():.4f})")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
              f"on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
