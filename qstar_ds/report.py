"""A run's learning curves as one self-contained HTML page (plots inline as PNG, no network).

    python -m qstar_ds.report OUTPUT_DIR          # any finished or running run; writes OUTPUT_DIR/report.html

Read from output_dir/metrics.jsonl (the last line of a step wins: a resumed run rewrites it) and
the newest output_dir/eval/step_XXXXXXXX.json. Shows: train losses (talk, base, REINFORCE), mean
reward and share of positive rewards, mixing weight, grad norm, held-out NLL with and without
thoughts and the gain with its 95% CI band, the gain by difficulty at the last evaluation, and the
held-out positions where thinking helped most (with a link to the thought viewer page).
The trainer writes it after every evaluation (rank 0).
"""
from __future__ import annotations

import base64
import glob
import html
import io
import json
import math
import os
import sys

REPORT_PAGE = "report.html"


def read_metrics(output_dir: str) -> list[dict]:
    """Rows of metrics.jsonl by step (the last line of a step wins), in step order."""
    rows: dict[int, dict] = {}
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for ln in f:
                if ln.strip():
                    try:
                        d = json.loads(ln)
                    except json.JSONDecodeError:      # a line being written right now
                        continue
                    rows[int(d["step"])] = d
    return [rows[k] for k in sorted(rows)]


def latest_eval(output_dir: str) -> dict | None:
    files = sorted(glob.glob(os.path.join(output_dir, "eval", "step_*.json")))
    if not files:
        return None
    with open(files[-1]) as f:
        return json.load(f)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_figure(rows: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train loss: talk (mixed NLL), read (after the thought alone)", ["loss_talk", "loss_read"]), ("train loss: base NLL", ["loss_base"]),
              ("train loss: REINFORCE", ["loss_reinforce"]), ("reward", ["reward_mean", "reward_pos_frac"]),
              ("mixing weight (mean)", ["mix_w_mean"]), ("grad norm (before clipping)", ["grad_norm"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6))
    for ax, (title, keys) in zip(axes.flat, panels):
        shown = [k for k in keys if _series(rows, k)[0]]
        for k in shown:
            x, y = _series(rows, k)
            ax.plot(x, y, label=k, lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if len(shown) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def heldout_figure(rows: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in rows if "eval/nll_base" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4))
    steps = [r["step"] for r in ev]
    a.plot(steps, [r["eval/nll_base"] for r in ev], "o-", label="without thoughts (base)")
    a.plot(steps, [r["eval/nll_mixed"] for r in ev], "s-", label="with thoughts (mixed)")
    a.set_title("held-out NLL (nats/token)", fontsize=10)
    a.set_xlabel("step")
    a.legend(fontsize=8)
    g = [r["eval/gain"] for r in ev]
    b.plot(steps, g, "o-", color="C2", label="gain (next token)")
    b.fill_between(steps, [r["eval/gain_lo"] for r in ev], [r["eval/gain_hi"] for r in ev], color="C2",
                   alpha=0.25, label="95% CI")
    if all("eval/gain_hard10" in r for r in ev):
        b.plot(steps, [r["eval/gain_hard10"] for r in ev], "^--", color="C3", label="gain, hardest 10%")
    if ev and all("eval/focus_gain" in r for r in ev):          # eval.focus: the marked tokens apart
        b.plot(steps, [r["eval/focus_gain"] for r in ev], "d-", color="C4", label="gain, eval.focus tokens")
        b.fill_between(steps, [r["eval/focus_gain_lo"] for r in ev], [r["eval/focus_gain_hi"] for r in ev],
                       color="C4", alpha=0.2)
    b.axhline(0, color="k", lw=0.7)
    b.set_title("held-out gain = NLL without - NLL with thoughts", fontsize=10)
    b.set_xlabel("step")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def decile_figure(summary: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    g = summary["gain_by_decile"]
    ax.bar(range(1, len(g) + 1), g, color=["C3" if i == len(g) - 1 else "C0" for i in range(len(g))])
    ax.axhline(summary["gain"], color="k", ls="--", lw=0.8, label=f"mean {summary['gain']:+.4f}")
    ax.set_xlabel("decile of the base model's NLL (1 = easiest, 10 = hardest)")
    ax.set_ylabel("gain (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def render(output_dir: str) -> str:
    rows = read_metrics(output_dir)
    ev = latest_eval(output_dir)
    title = os.path.basename(os.path.abspath(output_dir))
    parts = [f"<h2>qstar_ds run: {html.escape(title)}</h2>",
             f"<p class=meta>{html.escape(os.path.abspath(output_dir))}: {len(rows)} logged steps"
             + (f", last {rows[-1]['step']}" if rows else "") + "</p>"]
    if rows:
        parts.append(f"<h3>Training</h3><img src='data:image/png;base64,{_png(curves_figure(rows))}'>")
    if any("eval/nll_base" in r for r in rows):
        parts.append(f"<h3>Held-out text</h3><img src='data:image/png;base64,{_png(heldout_figure(rows))}'>")
    if ev is not None:
        m = ev["summary"]
        lo, hi = m["gain_ci95"]
        parts.append(f"<p>Last evaluation (step {ev['step']}, mode {html.escape(str(ev.get('mode')))}): NLL "
                     f"{m['nll_base']:.4f} without thoughts, {m['nll_mixed']:.4f} with; gain {m['gain']:+.4f} "
                     f"nats/token (95% CI {lo:+.4f}..{hi:+.4f}) over {m['sequences']} sequences / {m['tokens']} "
                     f"tokens; {m['talk_len']}-token window gain {m['gain_win']:+.4f}.</p>")
        tasks = [k for k in m if k.endswith("_soft_base") and not k.endswith("_ci95")]
        for k in tasks:
            t = k.removesuffix("_soft_base")
            parts.append(f"<p>{t} soft score: {100 * m[k]:.2f}% without thoughts, "
                         f"{100 * m[t + '_soft_thoughts']:.2f}% with.</p>")
        if "gain_by_decile" in m:
            parts.append(f"<h3>Gain by difficulty (step {ev['step']})</h3>"
                         f"<img src='data:image/png;base64,{_png(decile_figure(m))}'>")
        if ev.get("top"):
            cells = "".join(f"<tr><td>{r['sequence']}:{r['position']}</td><td>{html.escape(r['context'])}</td>"
                            f"<td>{html.escape(r['next'])}</td><td>&#10216;{html.escape(r['thought'])}&#10217;</td>"
                            f"<td>{r['gain']:+.3f}</td></tr>" for r in ev["top"])
            parts.append("<h3>Where thinking helped most (held-out)</h3><table><tr><th>seq:pos</th><th>context</th>"
                         f"<th>next tokens (the first is scored)</th><th>thought</th><th>gain</th></tr>{cells}</table>")
        if os.path.exists(os.path.join(output_dir, "thoughts.html")):
            parts.append("<p><a href='thoughts.html'>Thought viewer: every position of a held-out sequence</a></p>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}img{max-width:100%}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 8px}"
             ".meta{color:#555}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>qstar_ds: {html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(output_dir: str) -> str:
    path = os.path.join(output_dir, REPORT_PAGE)
    text = render(output_dir)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m qstar_ds.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.output_dir, "metrics.jsonl")):
        print(f"qstar_ds.report: error: {args.output_dir}/metrics.jsonl not found (not a run's output_dir?)",
              file=sys.stderr)
        return 2
    print(write_report(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
