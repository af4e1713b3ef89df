"""Paired comparison of held-out evaluations: A minus B, sequence by sequence, pooled over pairs.

    python tools/compare_nll.py A.json B.json [A2.json B2.json ...]
    python tools/compare_nll.py RUN/quiet_star_s0/content_T1.json:nll/read_mix/0.1/sequence_nll \\
        RUN/filler_s0/readmix.json:nll/read_mix/0.1/sequence_nll ...

Each argument is a JSON file written by the trainer (OUTPUT/eval/step_*.json) or by
`python -m qstar_ds.evaluate --tasks nll` (its "nll" part), optionally with `:KEY`, a
/-separated path to a list of per-sequence values (default: sequence_nll_thoughts, at the top or
under "nll"). Arguments pair up in order (A1 - B1, A2 - B2, ...); the two files of a pair must
score the same held-out sequences in the same order (the same run's held-out text, or two runs of
one seed). Prints each pair's mean difference with a normal 95% CI over sequences and the pooled
one over all (pair, sequence) differences; negative: A predicts better (lower NLL).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

DEFAULT_KEY = "sequence_nll_thoughts"


class CompareError(Exception):
    pass


def values(spec: str) -> list[float]:
    """FILE[:KEY] -> the per-sequence list it names."""
    path, _, key = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
    if not os.path.isfile(path):
        raise CompareError(f"{path}: file not found")
    try:
        with open(path) as f:
            node = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: not a JSON file ({e})") from None
    if not key:
        node = node if DEFAULT_KEY in node else node.get("nll", {})
        key = DEFAULT_KEY
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise CompareError(f"{path}: no key {key!r} (missing {part!r})")
        node = node[part]
    if not isinstance(node, list) or not node or not all(isinstance(x, (int, float)) for x in node):
        raise CompareError(f"{path}: {key!r} is not a list of per-sequence numbers")
    return [float(x) for x in node]


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, m, m
    h = 1.96 * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
    return m, m - h, m + h


def compare(specs: list[str]) -> dict:
    if len(specs) < 2 or len(specs) % 2:
        raise CompareError(f"expected pairs of files (A B [A2 B2 ...]), got {len(specs)} argument(s)")
    pairs, pooled = [], []
    for a, b in zip(specs[::2], specs[1::2]):
        va, vb = values(a), values(b)
        if len(va) != len(vb):
            raise CompareError(f"{a} has {len(va)} sequences, {b} {len(vb)}: not the same held-out text")
        d = [x - y for x, y in zip(va, vb)]
        pairs.append({"a": a, "b": b, "n": len(d), "diff": mean_ci(d), "a_mean": sum(va) / len(va),
                      "b_mean": sum(vb) / len(vb)})
        pooled += d
    return {"pairs": pairs, "pooled": mean_ci(pooled), "n": len(pooled)}


def verdict(lo: float, hi: float) -> str:
    return "A better" if hi < 0 else "B better" if lo > 0 else "no significant difference"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="FILE[:KEY]")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    try:
        res = compare(args.files)
    except CompareError as e:
        print(f"compare_nll: error: {e}", file=sys.stderr)
        return 2
    for p in res["pairs"]:
        m, lo, hi = p["diff"]
        print(f"{p['a']} ({p['a_mean']:.4f}) - {p['b']} ({p['b_mean']:.4f}): {m:+.4f} [{lo:+.4f}, {hi:+.4f}] "
              f"over {p['n']} sequences")
    m, lo, hi = res["pooled"]
    print(f"pooled: {m:+.4f} nats/token, 95% CI [{lo:+.4f}, {hi:+.4f}] over {res['n']} (pair, sequence) "
          f"differences: {verdict(lo, hi)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
