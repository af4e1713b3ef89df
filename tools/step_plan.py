"""How a preset's optimizer step is dealt to W ranks: learn chunks and rollout units per rank,
and the share of ranks' work slots that are idle repeats, today and with one chunk size for every
world size (the plan before the dealing adapted to the world size).

    python tools/step_plan.py [--preset mistral7b_owm] [--worlds 8,64,512]
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qstar_ds.cli import parse_args  # noqa: E402
from qstar_ds.schedule import plan_step, rollout_units  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mistral7b_owm")
    ap.add_argument("--worlds", default="1,8,64,512")
    args = ap.parse_args()
    cfg, _ = parse_args(["--preset", args.preset])
    B, P = cfg.train.batch_size, cfg.think_positions
    fixed = plan_step(cfg, 1)
    print(f"{args.preset}: batch {B}, {fixed.n_streams} streams/sequence, chunk_tokens {cfg.train.chunk_tokens}")
    print(f"{'ranks':>6} {'chunks/seq':>10} {'streams/chunk':>13} {'micro-steps':>11} {'learn idle':>10} "
          f"{'(fixed)':>8} {'rollout units':>13} {'rollout idle':>12} {'(per sequence)':>14}")
    for w in (int(v) for v in args.worlds.split(",")):
        p = plan_step(cfg, w)
        fixed_idle = 1 - fixed.total_chunks / (math.ceil(fixed.total_chunks / w) * w)
        units = len(rollout_units(B, P, w))
        r_idle = 1 - units / (math.ceil(units / w) * w)
        seq_idle = 1 - B / (math.ceil(B / w) * w)
        print(f"{w:>6} {p.chunks_per_seq:>10} {p.streams_per_chunk:>13} {p.grad_accum:>11} {p.wasted:>10.1%} "
              f"{fixed_idle:>8.1%} {units:>13} {r_idle:>12.1%} {seq_idle:>14.1%}")


if __name__ == "__main__":
    main()
