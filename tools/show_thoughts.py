"""Render what a Quiet-STaR model thinks after every token of a text as one self-contained HTML page.

    python tools/show_thoughts.py --model OUTPUT_DIR --text "Q: 12*3 = 36. ..." --output thoughts.html
    python tools/show_thoughts.py --model smollm2 --text_file notes.txt --thought_len 12 --n_thoughts 2

One KV-cached rollout (the trainer's: n_thoughts thoughts after every position whose talk window
fits, talk_len true tokens teacher-forced after each) gives, per position i and thought:
- the thought text;
- the mixing weight w (mean over the talk tokens);
- the REINFORCE reward: talk log-prob minus the mean over the position's thoughts (0 with one);
- the gain: sum over the K talk tokens of log p_mixed - log p_base, i.e. how much this thought
  changed the likelihood of what actually came next (> 0: thinking helped).
The page colours each token by the gain, the reward or the mixing weight (a selector), shows the
thoughts on hover or inline (a checkbox), and lists the positions where thinking helped most.
No network access: data, script and style are inline.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from qstar_ds.viewer import page_data, render  # noqa: E402,F401  (render: used by tests)


@torch.no_grad()
def collect(model, tokenizer, text: str, cfg, max_tokens: int, top: int, seed: int = 0) -> dict:
    """Per-token thoughts, rewards, gains and mixing weights of one rollout over `text`."""
    from qstar_ds.layout import Layout
    from qstar_ds.rollout import rollout

    ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    if len(ids) < cfg.talk_len + 1:
        raise ValueError(f"--text has {len(ids)} tokens; needs at least talk_len + 1 = {cfg.talk_len + 1}")
    dev = model.lm_head.weight.device
    x = torch.tensor([ids], device=dev)
    am = torch.ones_like(x)
    g = torch.Generator(device=dev).manual_seed(seed)
    ro = rollout(model, cfg, x, am, generator=g)
    h = model.hidden(x, Layout.base_only(am.bool(), cfg.attention_backend))
    z = model.logits(h[0, :-1])
    logp = torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), -1)
    base_lp = logp.gather(-1, x[0, 1:, None])[:, 0]                  # (n-1,) log p(x_{j+1} | x_<=j)
    n, K, r = len(ids), cfg.talk_len, cfg.n_thoughts
    pieces = [tokenizer.decode([i]) for i in ids]
    streams = []
    for m in range(ro.anchor.shape[1]):
        i = int(ro.anchor[0, m])
        if not bool(ro.valid[0, m]):
            continue
        streams.append({"position": i, "text": tokenizer.decode(ro.thoughts[0, m].tolist()),
                        "reward": float(ro.rewards[0, m]),
                        "gain": float(ro.talk_logp[0, m].sum() - base_lp[i:i + K].sum()),
                        "w": float(ro.mix_w[0, m].mean())})
    n_pos = len({s["position"] for s in streams})
    return page_data(pieces, streams, K, top,
                     f"{n} tokens; {r} thought(s) of {cfg.thought_len} tokens after each of {n_pos} positions, "
                     f"K = {K} talk tokens; sampling temperature {cfg.temperature}")


def main(argv: list[str] | None = None) -> int:
    from qstar_ds.cli import add_dataclass_options
    from qstar_ds.config import ConfigError, ThoughtConfig
    from qstar_ds.loading import add_model_args, load_from_args, thought_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--text_file")
    ap.add_argument("--output", default="thoughts.html")
    add_dataclass_options(ap, ThoughtConfig, ["n_thoughts", "talk_len", "temperature"])
    ap.add_argument("--max_tokens", type=int, default=256)
    ap.add_argument("--top", type=int, default=10, help="rows of the 'helped most' table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.text_file is not None:
            if not os.path.isfile(args.text_file):
                raise FileNotFoundError(f"--text_file={args.text_file!r}: not found")
            with open(args.text_file) as f:
                args.text = f.read()
        loaded = load_from_args(args)
        cfg = thought_config(loaded, args, n_thoughts=args.n_thoughts, talk_len=args.talk_len,
                             temperature=args.temperature)
        data = collect(loaded.model, loaded.tokenizer, args.text, cfg, args.max_tokens, args.top, args.seed)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"show_thoughts: error: {e}", file=sys.stderr)
        return 2
    data["meta"] = f"{loaded.source}. " + data["meta"]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(render(data, args.text[:60]))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
