"""Generation speed with and without thoughts (KV-cached, qstar_ds.generate), on this machine.

    python tools/bench_generate.py                      # SmolLM2-135M, batch 1, 48 tokens, t = 8
    python tools/bench_generate.py --model random-smollm2 --thought_len 16 --batch 4

Modes, each generating the same number of tokens greedily from the same prompt (EOS ignored):
- off:        the base model (plain KV-cached decoding through our wrapper)
- on:         a thought of thought_len tokens before every token
- threshold:  think only where the base next-token entropy >= --think_threshold (default: the
              median entropy seen in the `off` run, i.e. about half of the tokens)
- recompute:  (--recompute) the same thoughts without a KV cache, re-encoding prefix + thought
              for every thought token, as a cache-less implementation must (the authors' code
              additionally re-runs all earlier thoughts); few tokens, it is slow
Prints tokens/s, the share of tokens that thought and ratios to `off`; --json writes them.
Medians over --reps runs after one warm-up run per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PROMPT = ("Q: Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
          "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
          "fresh duck egg. How much in dollars does she make every day at the farmers' market?\nA:")


@torch.no_grad()
def recompute_generate(model, ids: torch.Tensor, cfg, new_tokens: int) -> float:
    """Greedy generation with thoughts and no KV cache: every step re-encodes its whole
    sequence with the plain HF model. Returns seconds."""
    backbone = model.base.base_model
    t0 = time.perf_counter()
    seq = ids[0].tolist()
    for _ in range(new_tokens):
        hb = backbone(inputs_embeds=model.embed(torch.tensor([seq]))).last_hidden_state[0, -1]
        th = [model.sot_id]
        for _ in range(cfg.thought_len):
            h = backbone(inputs_embeds=model.embed(torch.tensor([seq + th]))).last_hidden_state[0, -1]
            th.append(int(model.logits(h).argmax()))
        h = backbone(inputs_embeds=model.embed(torch.tensor([seq + th + [model.eot_id]]))).last_hidden_state[0, -1]
        z, _ = model.mixed_logits(hb, h)
        seq.append(int(z.argmax()))
    return time.perf_counter() - t0


def main() -> None:
    from qstar_ds.config import ThoughtConfig
    from qstar_ds.generate import GenerateConfig, entropy, generate, left_pad
    from qstar_ds.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--thought_len", type=int, default=8)
    ap.add_argument("--attention_backend", default="split")
    ap.add_argument("--think_threshold", type=float, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--recompute", type=int, default=0, metavar="N", help="also time N tokens without a KV cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    loaded = load_model(args.model, getattr(torch, args.dtype), args.device)
    model, tok = loaded.model, loaded.tokenizer
    cfg = ThoughtConfig(thought_len=args.thought_len, temperature=1.0, attention_backend=args.attention_backend)
    ids, am = left_pad(tok, [PROMPT] * args.batch, loaded.device)

    def timed(gen: GenerateConfig):
        generate(model, ids, am, cfg, GenerateConfig(4, thoughts=gen.thoughts, think_threshold=gen.think_threshold),
                 generator=torch.Generator(device=loaded.device).manual_seed(0))          # warm-up
        runs = [generate(model, ids, am, cfg, gen, generator=torch.Generator(device=loaded.device).manual_seed(0),
                         return_scores=not gen.thoughts) for _ in range(args.reps)]
        return runs, statistics.median(r.seconds for r in runs)

    rows = []
    off_runs, off_s = timed(GenerateConfig(args.tokens, thoughts=False))
    thr = args.think_threshold
    if thr is None:
        thr = float(entropy(off_runs[0].scores).median())
    for name, gen, (runs, s) in [("off", None, (off_runs, off_s)),
                                 ("on", None, timed(GenerateConfig(args.tokens))),
                                 (f"threshold {thr:.2f} nats", None,
                                  timed(GenerateConfig(args.tokens, think_threshold=thr)))]:
        n = int(runs[0].lengths.sum())
        rows.append({"mode": name, "tokens": n, "seconds": s, "tokens_per_s": n / s, "think_rate": runs[0].think_rate})
    if args.recompute:
        s = recompute_generate(model, ids[:1], cfg, args.recompute)
        rows.append({"mode": "recompute (no KV cache)", "tokens": args.recompute, "seconds": s,
                     "tokens_per_s": args.recompute / s, "think_rate": 1.0})
    base = rows[0]["tokens_per_s"]
    dev = torch.cuda.get_device_name() if loaded.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{loaded.source}; {dev}; {args.dtype}; batch {args.batch}; thought_len {args.thought_len}; "
          f"backend {args.attention_backend}; median of {args.reps}")
    print(f"{'mode':<26} {'tokens':>6} {'s':>8} {'tok/s':>8} {'thinks':>7} {'vs off':>7}")
    for r in rows:
        print(f"{r['mode']:<26} {r['tokens']:>6} {r['seconds']:8.2f} {r['tokens_per_s']:8.2f} "
              f"{100 * r['think_rate']:6.1f}% {r['tokens_per_s'] / base:7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
