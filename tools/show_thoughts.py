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
import html
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Quiet-STaR thoughts: __TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;line-height:2.1}
#text{font-family:ui-monospace,monospace;white-space:pre-wrap;border:1px solid #ccc;padding:1em;border-radius:6px}
.tok{border-radius:3px;cursor:default;padding:1px 0}
.tok.nothought{color:#999}
.thought{display:none;font-size:75%;color:#333;background:#eef;border:1px dashed #99c;border-radius:3px;margin:0 2px;padding:0 3px}
body.expanded .thought{display:inline}
#tip{position:fixed;display:none;background:#222;color:#eee;padding:.5em .8em;border-radius:6px;font-size:85%;
max-width:40em;line-height:1.4;white-space:pre-wrap;z-index:9;pointer-events:none}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.meta{color:#555;font-size:90%}
</style></head>
<body>
<h2>Quiet-STaR thoughts</h2>
<p class="meta" id="meta"></p>
<p><label>colour by <select id="colour"><option value="gain">gain: log p(next K | thought) - log p(next K)</option>
<option value="reward">REINFORCE reward</option><option value="w">mixing weight</option></select></label>
&nbsp; <label><input type="checkbox" id="expand"> show thoughts inline</label></p>
<div id="text"></div>
<h3>Where thinking helped most</h3>
<table id="top"><thead><tr><th>position</th><th>context</th><th>next tokens</th><th>thought</th><th>gain</th>
<th>reward</th><th>w</th></tr></thead><tbody></tbody></table>
<div id="tip"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const textEl = document.getElementById("text"), tip = document.getElementById("tip");
document.getElementById("meta").textContent = D.meta;
function best(p) { return p.thoughts.reduce((a, b) => (b.gain > a.gain ? b : a)); }
function value(p, key) {
  const xs = p.thoughts.map(t => t[key]);
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}
function scale(key) {
  const xs = D.positions.filter(p => p.thoughts.length).map(p => Math.abs(value(p, key)));
  return Math.max(1e-9, ...xs);
}
function colour(v, s, key) {
  if (key === "w") return "rgba(60,90,255," + (0.6 * v / s).toFixed(3) + ")";
  const a = Math.min(1, Math.abs(v) / s) * 0.6;
  return v >= 0 ? "rgba(0,170,60," + a.toFixed(3) + ")" : "rgba(220,40,40," + a.toFixed(3) + ")";
}
const spans = [];
D.positions.forEach((p, i) => {
  const s = document.createElement("span");
  s.className = "tok" + (p.thoughts.length ? "" : " nothought");
  s.dataset.i = i;
  s.textContent = p.token;
  textEl.appendChild(s);
  spans.push(s);
  if (p.thoughts.length) {
    const th = document.createElement("span");
    th.className = "thought";
    th.textContent = "\u27e8" + best(p).text + "\u27e9";
    textEl.appendChild(th);
    s.addEventListener("mousemove", e => {
      tip.textContent = "position " + i + " after " + JSON.stringify(p.token) + "\\n" + p.thoughts.map((t, k) =>
        "thought " + (k + 1) + ": \u27e8" + t.text + "\u27e9\\n  gain " + t.gain.toFixed(3) + "  reward " +
        t.reward.toFixed(3) + "  w " + t.w.toFixed(3)).join("\\n");
      tip.style.display = "block";
      tip.style.left = Math.min(e.clientX + 12, window.innerWidth - 420) + "px";
      tip.style.top = (e.clientY + 16) + "px";
    });
    s.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  }
});
function paint() {
  const key = document.getElementById("colour").value, s = scale(key);
  D.positions.forEach((p, i) => {
    spans[i].style.background = p.thoughts.length ? colour(value(p, key), s, key) : "";
  });
}
document.getElementById("colour").addEventListener("change", paint);
document.getElementById("expand").addEventListener("change", e => {
  document.body.classList.toggle("expanded", e.target.checked);
});
paint();
const body = document.querySelector("#top tbody");
D.top.forEach(i => {
  const p = D.positions[i], t = best(p), tr = document.createElement("tr");
  [i, p.context, p.next, "\u27e8" + t.text + "\u27e9", t.gain.toFixed(3), t.reward.toFixed(3), t.w.toFixed(3)]
    .forEach(v => { const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); });
  body.appendChild(tr);
});
document.body.dataset.ready = String(spans.length);
</script></body></html>
"""


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
    positions = [{"token": pieces[i], "thoughts": []} for i in range(n)]
    for m in range(ro.anchor.shape[1]):
        i = int(ro.anchor[0, m])
        if not bool(ro.valid[0, m]):
            continue
        gain = float(ro.talk_logp[0, m].sum() - base_lp[i:i + K].sum())
        positions[i]["thoughts"].append({"text": tokenizer.decode(ro.thoughts[0, m].tolist()),
                                         "reward": float(ro.rewards[0, m]), "gain": gain,
                                         "w": float(ro.mix_w[0, m].mean())})
    for i, p in enumerate(positions):
        p["context"] = "".join(pieces[max(0, i - 8):i + 1])
        p["next"] = "".join(pieces[i + 1:i + 1 + K])
    scored = [i for i, p in enumerate(positions) if p["thoughts"]]
    best = sorted(scored, key=lambda i: -max(t["gain"] for t in positions[i]["thoughts"]))[:top]
    return {"positions": positions, "top": best,
            "meta": f"{n} tokens; {r} thought(s) of {cfg.thought_len} tokens after each of {len(scored)} positions, "
                    f"K = {K} talk tokens; sampling temperature {cfg.temperature}"}


def render(data: dict, title: str) -> str:
    blob = json.dumps(data).replace("</", "<\\/")          # no "</script>" inside the data block
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)


def main(argv: list[str] | None = None) -> int:
    from qstar_ds.config import ConfigError, ThoughtConfig
    from qstar_ds.loading import add_model_args, load_from_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--text_file")
    ap.add_argument("--output", default="thoughts.html")
    ap.add_argument("--thought_len", type=int, default=None, help="default: the model's training value or 8")
    ap.add_argument("--n_thoughts", type=int, default=2)
    ap.add_argument("--talk_len", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
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
        cfg = ThoughtConfig(thought_len=loaded.thought_len if args.thought_len is None else args.thought_len, n_thoughts=args.n_thoughts,
                            talk_len=args.talk_len, temperature=args.temperature,
                            attention_backend=args.attention_backend)
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
