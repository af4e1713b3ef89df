"""The thought viewer page: one self-contained HTML file (data, script and style inline; no
network) showing what a Quiet-STaR model thought after every token of a text.

Each token is coloured by how much its thought helped (gain: log-prob of the next K true tokens
with the thought minus without), its REINFORCE reward or its mixing weight; thoughts show on hover
or inline; a table lists the positions where thinking helped most. Built from per-position numbers
(`page_data`) by tools/show_thoughts.py and by the trainer's held-out evaluation.
"""
from __future__ import annotations

import html
import json

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


def page_data(pieces: list[str], streams: list[dict], talk_len: int, top: int, meta: str) -> dict:
    """pieces: the text's tokens, decoded one by one; streams: one dict per thought with
    "position" (the token it follows), "text", "gain", "reward", "w". -> the page's data."""
    positions = [{"token": p, "thoughts": []} for p in pieces]
    for s in streams:
        positions[s["position"]]["thoughts"].append({k: s[k] for k in ("text", "reward", "gain", "w")})
    for i, p in enumerate(positions):
        p["context"] = "".join(pieces[max(0, i - 8):i + 1])
        p["next"] = "".join(pieces[i + 1:i + 1 + talk_len])
    scored = [i for i, p in enumerate(positions) if p["thoughts"]]
    best = sorted(scored, key=lambda i: -max(t["gain"] for t in positions[i]["thoughts"]))[:top]
    return {"positions": positions, "top": best, "meta": meta}


def render(data: dict, title: str) -> str:
    blob = json.dumps(data).replace("</", "<\\/")          # no "</script>" inside the data block
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)
