"""Is there anything for a thought to compute? How well the model predicts a sum of the built-in
corpus when a short step is written, as plain text, right before it.

    python tools/written_step_probe.py [--model smollm2] [--n 200] [--seed 0] [--out FILE.json]

A sampled thought carries no information about the text that its context did not (README "Does
it learn?", "Why a thought can help only by computing"): it helps only if writing something down
lets the model compute what one forward pass does not. This probe asks whether the model can use
such a step at all, with no thought tokens and no training. For `--n` additions a + b of two-digit
numbers whose units carry (the case one forward pass must compute), each after its own document
of the built-in corpus (`data.arith_document`, 3-6 statements), it scores the sum's tokens (" 85.")
after five prefixes that differ only in what follows "Compute a + b. We have":

  direct       " a + b ="                               the corpus's own text
  units_step   " u + v = U, carry 1, so a + b ="         the textbook first step, written correctly
  wrong_step   the same with U off by 1-3               does the model read the step?
  other_step   " x + y = z, so a + b =" (x, y in 1..4)   the cost of inserting any correct step
  answer_step  " a + b = S, so a + b ="                 the answer itself: no thought can say more

and prints, per prefix, the NLL of the sum's digits together (the space before them and the final
"." excluded), averaged over additions with a 95% CI, the share predicted exactly (every digit the argmax),
and the paired differences to `direct` and to `other_step` (a step of the same form that says
nothing about this sum). A model that can use a written step has units_step below
direct and wrong_step above units_step. Plain text is the model's best case: a thought between
<|startofthought|> and <|endofthought|> is what an untrained model has never seen.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qstar_ds.data import arith_document  # noqa: E402
from qstar_ds.heldout import mean_ci  # noqa: E402
from qstar_ds.layout import Layout  # noqa: E402
from qstar_ds.loading import add_model_args, load_from_args  # noqa: E402

CASES = ("direct", "units_step", "wrong_step", "other_step", "answer_step")


def addition(rng: random.Random) -> tuple[int, int]:
    """Two-digit a, b whose units digits carry."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a % 10 + b % 10 >= 10:
            return a, b


def prefixes(a: int, b: int, context: str, rng: random.Random) -> dict[str, str]:
    """The five prefixes of one addition (module docstring), each ending in " a + b =" ."""
    u, v = a % 10, b % 10
    wrong = u + v + rng.choice([-3, -2, -1, 1, 2, 3])
    x, y = rng.randint(1, 4), rng.randint(1, 4)
    stem = f"{context} Compute {a} + {b}. We have"
    return {
        "direct": f"{stem} {a} + {b} =",
        "units_step": f"{stem} {u} + {v} = {u + v}, carry 1, so {a} + {b} =",
        "wrong_step": f"{stem} {u} + {v} = {wrong}, carry 1, so {a} + {b} =",
        "other_step": f"{stem} {x} + {y} = {x + y}, so {a} + {b} =",
        "answer_step": f"{stem} {a} + {b} = {a + b}, so {a} + {b} =",
    }


def items(n: int, seed: int) -> list[tuple[dict[str, str], str]]:
    """n (prefixes, target) pairs; target " S." ; deterministic in seed."""
    rng = random.Random(f"written-step-{seed}")
    out = []
    for j in range(n):
        a, b = addition(rng)
        context = arith_document(seed, j)
        out.append((prefixes(a, b, context, rng), f" {a + b}."))
    return out


def score(model, tok, texts: list[tuple[str, str]], backend: str, batch: int = 16) -> list[dict]:
    """[(prefix, target)] -> per item {"nll": [NLL of each target token], "argmax": [bool]}:
    one teacher-forced pass over prefix + target (right-padded batches, markers never predicted)."""
    out = []
    for s in range(0, len(texts), batch):
        rows = [(tok(p)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]) for p, t in texts[s:s + batch]]
        n = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, (p, t) in enumerate(rows):
            ids[i, :len(p) + len(t)] = torch.tensor(p + t)
            valid[i, :len(p) + len(t)] = True
        dev = next(model.parameters()).device
        with torch.no_grad():
            h = model.hidden(ids.to(dev), Layout.base_only(valid.to(dev), backend=backend))   # (B, n, H)
            logits = model.logits(h[:, :-1]).float()                                          # (B, n-1, V)
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None].to(dev))[..., 0]            # (B, n-1)
        best = logits.argmax(-1) == ids[:, 1:].to(dev)
        for i, (p, t) in enumerate(rows):
            sl = slice(len(p) - 1, len(p) + len(t) - 1)      # predictions of the target tokens
            out.append({"nll": (-logp[i, sl]).tolist(), "argmax": best[i, sl].tolist()})
    return out


def digits(tok, target: str) -> slice:
    """The target's digit tokens: without a leading bare space and the final "."."""
    pieces = [tok.decode([i]) for i in tok(target, add_special_tokens=False)["input_ids"]]
    lo = 1 if pieces[0].strip() == "" else 0
    return slice(lo, len(pieces) - 1)


def summarize(tok, data: list[tuple[dict[str, str], str]], scored: dict[str, list[dict]]) -> dict:
    """Per case: the NLL of the sum's digits together, averaged over additions with a 95% CI, the
    share exactly right, and the paired differences to direct and to other_step."""
    sl = [digits(tok, t) for _, t in data]
    nll = {c: [sum(r["nll"][s]) for r, s in zip(scored[c], sl)] for c in CASES}
    out = {}
    for c in CASES:
        m, lo, hi = mean_ci(torch.tensor(nll[c]))
        d = mean_ci(torch.tensor(nll[c]) - torch.tensor(nll["direct"]))
        o = mean_ci(torch.tensor(nll[c]) - torch.tensor(nll["other_step"]))
        exact = sum(all(r["argmax"][s]) for r, s in zip(scored[c], sl)) / len(sl)
        out[c] = {"nll": m, "nll_ci95": [lo, hi], "exact": exact, "minus_direct": d[0],
                  "minus_direct_ci95": [d[1], d[2]], "minus_other": o[0], "minus_other_ci95": [o[1], o[2]],
                  "per_item": nll[c]}
    d = mean_ci(torch.tensor(nll["wrong_step"]) - torch.tensor(nll["units_step"]))
    out["wrong_minus_units"] = {"mean": d[0], "ci95": [d[1], d[2]]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--n", type=int, default=200, help="additions (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="which additions and contexts")
    ap.add_argument("--out", default=None, help="write the numbers (and per-addition NLLs) as JSON")
    args = ap.parse_args(argv)
    if args.n < 2:
        print(f"written_step_probe: --n={args.n}: need at least 2 additions for a CI", file=sys.stderr)
        return 2
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        print(f"written_step_probe: --out={args.out!r}: its directory does not exist", file=sys.stderr)
        return 2
    loaded = load_from_args(args)
    model, tok = loaded.model, loaded.tokenizer
    print(f"written_step_probe: {loaded.source}; {args.n} additions, seed {args.seed}", flush=True)
    data = items(args.n, args.seed)
    scored, t0 = {}, time.time()
    for c in CASES:
        scored[c] = score(model, tok, [(p[c], t) for p, t in data], args.attention_backend)
        print(f"  scored {c} ({time.time() - t0:.0f} s)", flush=True)
    res = summarize(tok, data, scored)
    print(f"{'prefix':12s} {'NLL of the sum [95% CI]':>26s} {'exact':>6s} {'minus direct [95% CI]':>26s}"
          f" {'minus other_step [95% CI]':>26s}")
    for c in CASES:
        r = res[c]
        print(f"{c:12s} {r['nll']:7.3f} [{r['nll_ci95'][0]:.3f}, {r['nll_ci95'][1]:.3f}]   {r['exact']:5.0%} "
              + "".join(f" {r[k]:+7.3f} [{r[k + '_ci95'][0]:+.3f}, {r[k + '_ci95'][1]:+.3f}]"
                        for k in ("minus_direct", "minus_other")))
    w = res["wrong_minus_units"]
    print(f"wrong_step - units_step: {w['mean']:+.3f} [{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}] "
          f"(> 0: the model reads the step)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": loaded.source, "n": args.n, "seed": args.seed,
                       "examples": data[:3], **res}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
