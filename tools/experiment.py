"""Does it learn? Quiet-STaR against its two controls, same data, steps and optimizer, >= 2 seeds.

    python tools/experiment.py --out runs/exp --preset smollm2 --steps 40 --seeds 0,1 \\
        [--arms quiet_star,filler,off] [--slices 64 --task_data_dir ../shared/data] [--focus REGEX]
        [--launch "torchrun --nproc_per_node 8"] [-- TRAIN.PY OVERRIDES]

For each seed s and arm a, runs `qstar_ds/train.py --preset P --thought.mode a --train.seed s
--data.seed s --max_steps N --output_dir OUT/a_s<s>` (the overrides after `--` go to every run),
one run after the other. Arms of one seed read the same training documents in the same order and
are evaluated on the same held-out sequences (the trainer's final evaluation: held-out split of
the training source, or eval.source); seeds change the data (data.seed) and the sampling.

Interrupted? Run the same command again: finished runs (their final eval file exists) are
skipped, an unfinished one resumes from its newest checkpoint (--save_every, default 10 steps).

Then, for each quiet_star run, the content check (skip it with --no_content_check): its final
checkpoint scored on its held-out sequences twice, with each position's own thought and with the
thought sampled at the same position of another held-out sequence (`python -m qstar_ds.evaluate
--tasks nll --nll_heldout --nll_shuffled_thoughts`, the run's evaluation temperature). A model that
uses what it thought predicts better with its own thoughts; the pause-token effect (extra
computation, a learned correction) survives the swap. Written to OUT/quiet_star_s<s>/content.json.

--rescore_temperature T: also score each quiet_star final checkpoint (the same way, with the
content check) with thoughts sampled at T, e.g. the training temperature, and compare it with the
controls again, paired by held-out sequence (evaluate.py writes each sequence's NLL in order);
with --rescore_samples K, K thoughts per position and the K mixed predictions averaged (K times
the compute; evaluate.py --nll_thought_samples).
The controls need no rescoring: filler thoughts are fixed and off has none, so their predictions
do not depend on the temperature. Written to OUT/quiet_star_s<s>/content_T<T>[_k<K>].json.

--arms ...,oracle adds the positive control (thought.mode=oracle; not a method, it sees the
future): its thought is the text's own continuation before the tokens --focus marks (every
position without --focus), the filler elsewhere; it says how much the same steps teach a model to
gain from a thought that is right, and that these comparisons would show it. --arms ...,teacher
adds the policy diagnostic (thought.mode=teacher, qstar_ds/teacher.py): the policy is taught a
units step where the context asks for a sum and evaluated on the thoughts it writes itself.
--lead ARM (default quiet_star): the arm that the comparisons, the content check and the
rescoring below are about, e.g. --arms teacher,filler,off --lead teacher.

--focus REGEX: also score every run's final checkpoint (all arms) with the held-out tokens split
by whether their text overlaps a match of REGEX (evaluate.py --nll_focus), e.g. '(?<== )-?\\d+'
for the results of the built-in corpus's sums, where a thought could compute what one forward
pass does not: per run the gain there and elsewhere, quiet_star minus each control on those
tokens (with and without thoughts, paired by sequence), and quiet_star's own thoughts against
another sequence's there. Written to OUT/<arm>_s<s>/focus_<hash>.json.

Prints a table (per arm: held-out NLL without / with thoughts, the gain with its 95% CI, the gain
on the hardest 10% of tokens, GSM8K/CSQA soft scores if the runs scored them) and the paired
comparisons that decide the question: quiet_star's NLL with thoughts minus each control's best
prediction (filler: with its filler thoughts; off: the plain model), per held-out sequence, with
a 95% CI over all (seed, sequence) pairs and per seed; and quiet_star's model without thoughts
minus each control's, the same way (what training with thoughts did to the shared weights:
whether the run kept what continued pretraining gives). Writes OUT/summary.json and one combined
plot, OUT/experiment.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = ("quiet_star", "filler", "off")
OPTIONAL_ARMS = ("oracle", "teacher")
LEAD = "quiet_star"
"""The arm the comparisons, the content check and the rescoring are about (--lead)."""


def final_eval(run_dir: str, steps: int) -> dict | None:
    path = os.path.join(run_dir, "eval", f"step_{steps:08d}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_one(args, arm: str, seed: int, extra: list[str]) -> dict:
    out = os.path.join(args.out, f"{arm}_s{seed}")
    done = final_eval(out, args.steps)
    if done is not None:
        print(f"[experiment] {arm} seed {seed}: done earlier ({out})", flush=True)
        return done
    launch = [sys.executable] if args.launch == "python" else shlex.split(args.launch)
    cmd = launch + [os.path.join(ROOT, "qstar_ds", "train.py"), "--preset", args.preset,
                    "--output_dir", out, "--max_steps", str(args.steps), "--resume", "auto",
                    "--thought.mode", arm, "--train.seed", str(seed), "--data.seed", str(seed),
                    "--train.save_every", str(args.save_every)] + extra
    if arm == "oracle" and args.focus:
        cmd += ["--thought.oracle_focus", args.focus]
    print(f"[experiment] {arm} seed {seed}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "experiment_run.log"), "a") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"[experiment] {arm} seed {seed} failed (exit {res.returncode}); see "
                         f"{os.path.join(out, 'experiment_run.log')}; rerun the same command to resume")
    ev = final_eval(out, args.steps)
    if ev is None:
        raise SystemExit(f"[experiment] {arm} seed {seed}: finished without {out}/eval/step_{args.steps:08d}.json")
    with open(os.path.join(out, "experiment_time.json"), "w") as f:
        json.dump({"seconds": time.time() - t0}, f)
    print(f"[experiment] {arm} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return ev


def scored(args, arm: str, seed: int, ev: dict, name: str, flags: list[str], temperature: float | None = None,
           what: str = "rescoring") -> dict | None:
    """`arm` seed `seed`'s final checkpoint scored on its held-out sequences by evaluate.py's nll
    task with `flags`, thoughts sampled at `temperature` (default: the run's evaluation
    temperature) with the run's seed; done once (OUT/<arm>_s<seed>/<name>.json). Refuses a file
    whose sequences are not the ones the run's final evaluation scored."""
    out = os.path.join(args.out, f"{arm}_s{seed}")
    m = ev["summary"]
    path = os.path.join(out, name + ".json")
    if not os.path.isfile(path):
        ckpt = os.path.join(out, "checkpoints", f"step_{args.steps:08d}")
        if not os.path.isdir(ckpt):
            print(f"[experiment] {what} of {arm} seed {seed} skipped: no checkpoint {ckpt}", flush=True)
            return None
        temp = m["temperature"] if temperature is None else temperature
        cmd = [sys.executable, "-m", "qstar_ds.evaluate", "--model", ckpt, "--tasks", "nll", "--nll_heldout",
               "--thought_temperature", str(temp), "--talk_len", str(m["talk_len"]),
               "--nll_sequences", str(m["sequences"]), "--seed", str(seed)] + flags + ["--output", path]
        print(f"[experiment] {what}, {arm} seed {seed}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        with open(os.path.join(out, "experiment_run.log"), "a") as log:
            res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"[experiment] {what} of {arm} seed {seed} failed (exit {res.returncode}); "
                             f"see {os.path.join(out, 'experiment_run.log')}")
    with open(path) as f:
        check = json.load(f)["nll"]
    mine, run_base = check.get("sequence_nll_base"), ev.get("sequence_nll_base")
    if mine is not None and run_base is not None and (
            len(mine) != len(run_base) or sum(abs(a - b) for a, b in zip(mine, run_base)) / len(mine) > 0.05):
        # the base prediction does not depend on thoughts: other sequences differ by tenths of a
        # nat, far more than another precision (the trainer's bf16, evaluate's fp32) moves it
        raise SystemExit(f"[experiment] {path}: its held-out sequences are not the ones the run's final evaluation "
                         f"scored (base NLL per sequence differs); delete it and rerun")
    return check


def content_check(args, seed: int, ev: dict, temperature: float | None = None, samples: int = 1) -> dict | None:
    """The shuffled-thought check of quiet_star seed `seed` (evaluate.py's nll_shuffled_thoughts on
    the run's held-out text), from its final checkpoint, with thoughts sampled at `temperature`
    (default: the run's evaluation temperature), `samples` per position averaged; done once
    (content.json, content_T<T>.json, content_T<T>_k<samples>.json)."""
    name = "content" if temperature is None else f"content_T{temperature:g}" + (f"_k{samples}" if samples > 1 else "")
    return scored(args, LEAD, seed, ev, name, ["--nll_shuffled_thoughts", "--nll_thought_samples",
                                                        str(samples)], temperature, "content check")


def focus_check(args, arm: str, seed: int, ev: dict, pattern: str) -> dict | None:
    """`arm` seed `seed` scored on its held-out sequences split by the tokens `pattern` marks
    (evaluate.py --nll_focus; quiet_star also with another sequence's thoughts): its focus
    summary, or None without a checkpoint. OUT/<arm>_s<seed>/focus_<hash of pattern>.json."""
    name = "focus_" + hashlib.sha1(pattern.encode()).hexdigest()[:10]
    flags = ["--nll_focus", pattern] + (["--nll_shuffled_thoughts"] if arm == LEAD else [])
    check = scored(args, arm, seed, ev, name, flags, what=f"scoring on {pattern!r}")
    return None if check is None else check["focus"]


def paired(a: list, b: list) -> list[float]:
    """Differences of two per-sequence lists where both have a value (None: no such token)."""
    return [x - y for x, y in zip(a, b) if x is not None and y is not None]


def focus_summary(focus: dict, arms: list[str], seeds: list[int]) -> dict:
    """From focus_check results {(arm, seed): summary}: per run the gain on the focus tokens and
    elsewhere; quiet_star minus each control on the focus tokens, with thoughts and without,
    paired by sequence and pooled over seeds; quiet_star's content effect there, pooled."""
    out: dict = {"runs": {f"{a}_s{s}": {k: focus[(a, s)].get(k) for k in ("tokens", "sequences", "nll_base", "nll_mixed",
                                                                       "nll_base_outside",
                                                                       "gain", "gain_ci95", "gain_outside",
                                                                       "gain_outside_ci95", "gain_focus_minus_outside",
                                                                       "gain_focus_minus_outside_ci95")}
                          for a in arms for s in seeds if (a, s) in focus}}
    if LEAD not in arms:
        return out
    for key, tag in (("sequence_nll_thoughts", "compare"), ("sequence_nll_base", "compare_base")):
        res = {}
        for ctrl in [a for a in arms if a != LEAD]:
            per_seed = {s: paired(focus[(LEAD, s)][key], focus[(ctrl, s)][key]) for s in seeds
                        if (LEAD, s) in focus and (ctrl, s) in focus}
            pooled = [x for d in per_seed.values() for x in d]
            if len(pooled) >= 2:
                res[ctrl] = {"pooled": mean_ci(pooled), "n": len(pooled),
                             "per_seed": {str(s): mean_ci(d) for s, d in per_seed.items() if d}}
        out[tag] = res
    pooled = [x for s in seeds if (LEAD, s) in focus
              for x in focus[(LEAD, s)].get("content_gain_sequences", []) if x is not None]
    if len(pooled) >= 2:
        out["content"] = {"pooled": mean_ci(pooled), "n": len(pooled)}
    return out


def focus_lines(pattern: str, fs: dict) -> list[str]:
    lines = [f"on the tokens matching {pattern!r} (and, after 'elsewhere', on the others):"]
    for run, r in fs["runs"].items():
        lo, hi = r["gain_ci95"]
        olo, ohi = r["gain_outside_ci95"]
        other = f" (elsewhere {r['nll_base_outside']:.4f})" if r.get("nll_base_outside") is not None else ""
        lines.append(f"  {run}: {r['tokens']} tokens, NLL {r['nll_base']:.4f}{other} without thoughts, {r['nll_mixed']:.4f} "
                     f"with; gain {r['gain']:+.4f} [{lo:+.4f}, {hi:+.4f}]; elsewhere {r['gain_outside']:+.4f} "
                     f"[{olo:+.4f}, {ohi:+.4f}]; difference {r['gain_focus_minus_outside']:+.4f} "
                     f"[{r['gain_focus_minus_outside_ci95'][0]:+.4f}, {r['gain_focus_minus_outside_ci95'][1]:+.4f}]")
    for tag, what in (("compare", "with thoughts (off: plain)"), ("compare_base", "without thoughts")):
        for ctrl, c in fs.get(tag, {}).items():
            m, lo, hi = c["pooled"]
            verdict = f"{LEAD} better" if hi < 0 else (f"{LEAD} worse" if lo > 0 else "no significant difference")
            lines.append(f"  {LEAD} - {ctrl}, {what}, on them: {m:+.4f} nats/token [{lo:+.4f}, {hi:+.4f}] over "
                         f"{c['n']} (seed, sequence) pairs: {verdict}")
    if "content" in fs:
        m, lo, hi = fs["content"]["pooled"]
        lines.append(f"  {LEAD}, own thoughts against another sequence's, on them: {m:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                     f"over {fs['content']['n']} pairs")
    return lines


def rescored(evs: dict, checks: dict) -> dict:
    """The final evaluations with quiet_star's per-sequence NLLs with thoughts replaced by its
    rescoring (`checks`: seed -> evaluate.py's nll result at another temperature)."""
    out = dict(evs)
    for s, c in checks.items():
        out[(LEAD, s)] = {**evs[(LEAD, s)], BEST: c[BEST], BEST_REST: c[BEST_REST]}
    return out


def content_summary(checks: dict) -> dict:
    """Pooled over seeds: quiet_star's NLL with another sequence's thoughts minus with its own."""
    pooled = [x for c in checks.values() for x in c["shuffled"]["content_gain_sequences"]]
    return {"pooled": mean_ci(pooled), "n": len(pooled),
            "per_seed": {s: [c["shuffled"]["content_gain"], *c["shuffled"]["content_gain_ci95"]] for s, c in checks.items()},
            "rest_per_seed": {s: [c["shuffled"]["content_gain_rest"], *c["shuffled"]["content_gain_rest_ci95"]]
                              for s, c in checks.items()},
            "nll_own": {s: c["nll_mixed"] for s, c in checks.items()},
            "nll_other": {s: c["shuffled"]["nll_mixed_other"] for s, c in checks.items()}}


def content_lines(c: dict) -> list[str]:
    m, lo, hi = c["pooled"]
    verdict = ("its own thoughts predict better: it uses what it thought" if lo > 0 else
               "another sequence's thoughts predict better" if hi < 0 else "no significant difference")
    out = [f"{LEAD} with its own thoughts vs another held-out sequence's (NLL theirs - own): {m:+.4f} nats/token, "
           f"95% CI [{lo:+.4f}, {hi:+.4f}] over {c['n']} (seed, sequence) pairs: {verdict}"]
    for s, v in c["per_seed"].items():
        r = c["rest_per_seed"][s]
        out.append(f"  seed {s}: {v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}] (NLL {c['nll_own'][s]:.4f} own, "
                   f"{c['nll_other'][s]:.4f} another's); without the first scored token {r[0]:+.4f} [{r[1]:+.4f}, {r[2]:+.4f}]")
    return out


BEST, BEST_REST = "sequence_nll_thoughts", "sequence_nll_thoughts_rest"


def best_nll(ev: dict, key: str = BEST) -> list[float]:
    """Each held-out sequence's NLL of the arm's own best prediction: with thoughts (the plain
    model's in off mode, where both are equal). BEST_REST: without the sequence's first scored
    position (heldout.py: a document's format token when documents are not packed)."""
    return ev[key]


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = 1.96 * sd / math.sqrt(n)
    return m, m - h, m + h


def compare(evs: dict, arms: list[str], seeds: list[int], key: str = BEST) -> dict:
    """quiet_star's NLL with thoughts minus each control's, paired by held-out sequence (none
    where some run's evaluation lacks `key`: written before it existed)."""
    out = {}
    if LEAD not in arms or any(key not in ev for ev in evs.values()):
        return out
    for ctrl in [a for a in arms if a != LEAD]:
        pooled, per_seed = [], {}
        for s in seeds:
            q, c = best_nll(evs[(LEAD, s)], key), best_nll(evs[(ctrl, s)], key)
            if len(q) != len(c):
                raise SystemExit(f"[experiment] seed {s}: {LEAD} and {ctrl} were evaluated on different "
                                 f"held-out sets ({len(q)} vs {len(c)} sequences)")
            d = [a - b for a, b in zip(q, c)]
            per_seed[s] = mean_ci(d)
            pooled += d
        out[ctrl] = {"pooled": mean_ci(pooled), "per_seed": per_seed, "n": len(pooled)}
    return out


def compare_lines(cmp: dict, cmp_rest: dict, note: str = "") -> list[str]:
    lines = []
    for what, res in (("", cmp), (", without each sequence's first scored token", cmp_rest)):
        for ctrl, c in res.items():
            m, lo, hi = c["pooled"]
            verdict = f"{LEAD} better" if hi < 0 else (f"{LEAD} worse" if lo > 0 else "no significant difference")
            seeds_txt = ", ".join(f"seed {s}: {v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]" for s, v in c["per_seed"].items())
            lines.append(f"{LEAD} (with thoughts{note}) - {ctrl} (best){what}: {m:+.4f} nats/token, 95% CI "
                         f"[{lo:+.4f}, {hi:+.4f}] over {c['n']} (seed, sequence) pairs: {verdict}  ({seeds_txt})")
    return lines


BASE = "sequence_nll_base"


def base_lines(cmp_base: dict) -> list[str]:
    """quiet_star's model without thoughts minus each control's: what training with thoughts did to
    the shared weights (the paper's beta lets REINFORCE steer them away from continued pretraining)."""
    lines = []
    for ctrl, c in cmp_base.items():
        m, lo, hi = c["pooled"]
        verdict = f"{LEAD}'s better" if hi < 0 else (f"{LEAD}'s worse" if lo > 0 else "no significant difference")
        lines.append(f"{LEAD} without thoughts - {ctrl} without thoughts: {m:+.4f} nats/token, 95% CI "
                     f"[{lo:+.4f}, {hi:+.4f}] over {c['n']} pairs: {verdict} (the base models)")
    return lines


def table(evs: dict, arms: list[str], seeds: list[int], cmp: dict, cmp_rest: dict) -> str:
    head = (f"{'arm':<11} {'seed':>4}  {'NLL base':>9} {'NLL w/ th':>9}  {'gain':>8} {'95% CI':>19}  "
            f"{'hard10':>8}  {'w':>7}  {'tasks (soft, base -> thoughts)'}")
    lines = [head, "-" * len(head)]
    for a in arms:
        for s in seeds:
            m = evs[(a, s)]["summary"]
            lo, hi = m["gain_ci95"]
            tasks = " ".join(f"{t} {100 * m[t + '_soft_base']:.1f}->{100 * m[t + '_soft_thoughts']:.1f}%"
                             for t in ("gsm8k", "csqa") if t + "_soft_base" in m)
            lines.append(f"{a:<11} {s:>4}  {m['nll_base']:9.4f} {m['nll_mixed']:9.4f}  {m['gain']:+8.4f} "
                         f"[{lo:+.4f}, {hi:+.4f}]  {m.get('gain_hard10', float('nan')):+8.4f}  {m['mix_w']:7.4f}  {tasks}")
    lines.append("")
    return "\n".join(lines + compare_lines(cmp, cmp_rest))


def plot(args, arms: list[str], seeds: list[int], evs: dict, cmp: dict, path: str, rescore: dict | None = None) -> None:
    """Held-out NLL over steps, train base NLL, and the paired comparisons (with `rescore`, also
    quiet_star rescored, pooled over seeds, hatched)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qstar_ds.report import read_metrics
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, arm in enumerate(arms):
        for s in seeds:
            rows = [r for r in read_metrics(os.path.join(args.out, f"{arm}_s{s}")) if "eval/nll_mixed" in r]
            a.plot([r["step"] for r in rows], [r["eval/nll_mixed"] for r in rows], "o-", color=f"C{i}", lw=1,
                   label=arm if s == seeds[0] else None, alpha=0.8)
            tr = read_metrics(os.path.join(args.out, f"{arm}_s{s}"))
            b.plot([r["step"] for r in tr], [r["loss_base"] for r in tr], color=f"C{i}", lw=0.8,
                   label=arm if s == seeds[0] else None, alpha=0.7)
    a.set_title("held-out NLL with thoughts (off: plain model)", fontsize=10)
    a.set_xlabel("step"); a.legend(fontsize=8)
    b.set_title("train base NLL", fontsize=10)
    b.set_xlabel("step"); b.legend(fontsize=8)
    if cmp:   # the decision: paired differences per held-out sequence, pooled and per seed
        labels, ys, errs = [], [], []
        for ctrl, res in cmp.items():
            for name, (m, lo, hi) in [("pooled", res["pooled"])] + [(f"seed {s}", v) for s, v in res["per_seed"].items()]:
                labels.append(f"- {ctrl}\n{name}"); ys.append(m); errs.append([[m - lo], [hi - m]])
        n_plain = len(ys)
        if rescore:
            k = rescore.get("samples", 1)
            tag = f"T {rescore['temperature']:g}" + (f", {k} avg" if k > 1 else "")
            for ctrl, res in rescore["compare"].items():
                m, lo, hi = res["pooled"]
                labels.append(f"- {ctrl}\n{tag}"); ys.append(m); errs.append([[m - lo], [hi - m]])
        xs = list(range(len(ys)))
        for x, y, e in zip(xs, ys, errs):
            c.bar(x, y, yerr=e, color="C0" if y < 0 else "C3", capsize=4, hatch="//" if x >= n_plain else None)
        c.axhline(0, color="k", lw=0.8)
        c.set_xticks(xs, labels, fontsize=7)
        c.set_title(f"{LEAD} NLL minus control NLL (< 0: {LEAD} better), 95% CI", fontsize=10)
    else:
        xs = list(range(len(arms)))
        stats = [mean_ci([x for s in seeds for x in best_nll(evs[(arm, s)])]) for arm in arms]
        c.bar(xs, [m for m, _, _ in stats], yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]],
              color=[f"C{i}" for i in xs], capsize=4)
        c.set_xticks(xs, arms)
        c.set_title(f"final held-out NLL ({len(seeds)} seeds, 95% CI)", fontsize=10)
    fig.suptitle(f"{args.preset}, {args.steps} steps: {args.out}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder of the experiment (one sub-folder per arm and seed)")
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--lead", default="quiet_star", help="the arm compared with the others, content-checked and "
                                                         "rescored (e.g. teacher)")
    ap.add_argument("--save_every", type=int, default=10)
    ap.add_argument("--slices", type=int, default=0, help="GSM8K and CSQA items scored at the end of every run, "
                                                          "with and without thoughts (0 = none)")
    ap.add_argument("--task_data_dir", default=None, help="folder with gsm8k/test.jsonl and commonsenseqa/dev.jsonl "
                                                         "(default: the hub)")
    ap.add_argument("--launch", default="python", help='"python" (one process) or a launcher prefix, e.g. '
                                                       '"torchrun --nproc_per_node 8"')
    ap.add_argument("--no_content_check", action="store_true",
                    help="skip scoring each quiet_star checkpoint with another sequence's thoughts")
    ap.add_argument("--rescore_temperature", type=float, default=None,
                    help="also score each quiet_star checkpoint with thoughts sampled at this temperature (e.g. "
                         "the training one) and compare with the controls again, paired")
    ap.add_argument("--focus", default=None, metavar="REGEX",
                    help="also score every run's final checkpoint on the held-out tokens matching this regular "
                         "expression and on the rest (evaluate.py --nll_focus), and compare the arms there, paired")
    ap.add_argument("--rescore_samples", type=int, default=1, metavar="K",
                    help="with --rescore_temperature: K thoughts per position, the mixed predictions averaged")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS + OPTIONAL_ARMS]
    if args.lead not in ("quiet_star", "oracle", "teacher"):
        bad.append(f"--lead={args.lead!r} (one of quiet_star, oracle, teacher)")
    global LEAD
    LEAD = args.lead
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        bad.append(f"--seeds={args.seeds!r}")
        seeds = []
    if args.rescore_temperature is not None and not args.rescore_temperature > 0:
        bad.append(f"--rescore_temperature={args.rescore_temperature} (must be > 0)")
    if args.focus is not None:
        import re
        try:
            re.compile(args.focus)
        except re.error as e:
            bad.append(f"--focus={args.focus!r} (not a regular expression: {e})")
    if args.rescore_samples < 1:
        bad.append(f"--rescore_samples={args.rescore_samples} (must be >= 1)")
    if bad or not arms or not seeds or args.steps < 1:
        print(f"experiment: error: bad arms/seeds/steps {bad or (arms, seeds, args.steps)}; arms are {ARMS + OPTIONAL_ARMS}",
              file=sys.stderr)
        return 2
    if args.slices:
        extra = ["--eval.gsm8k", str(args.slices), "--eval.csqa", str(args.slices)] + \
            (["--eval.task_data_dir", args.task_data_dir] if args.task_data_dir else []) + extra
    os.makedirs(args.out, exist_ok=True)
    evs = {(a, s): run_one(args, a, s, extra) for s in seeds for a in arms}
    cmp, cmp_rest = compare(evs, arms, seeds), compare(evs, arms, seeds, BEST_REST)
    cmp_base = compare(evs, arms, seeds, BASE)
    text = "\n".join([table(evs, arms, seeds, cmp, cmp_rest)] + base_lines(cmp_base))
    content = None
    if LEAD in arms and not args.no_content_check:
        checks = {s: c for s in seeds if (c := content_check(args, s, evs[(LEAD, s)])) is not None}
        if checks:
            content = content_summary(checks)
            text += "\n" + "\n".join(content_lines(content))
    rescore = None
    if LEAD in arms and args.rescore_temperature is not None:
        T = args.rescore_temperature
        K = args.rescore_samples
        checks = {s: c for s in seeds if (c := content_check(args, s, evs[(LEAD, s)], T, K)) is not None}
        if checks:
            again = rescored(evs, checks)
            rs = {"temperature": T, "samples": K, "compare": compare(again, arms, list(checks), BEST),
                  "compare_rest": compare(again, arms, list(checks), BEST_REST), "content": content_summary(checks),
                  "nll_thoughts": {s: c["nll_mixed"] for s, c in checks.items()}}
            each = f", {K} per position, mixed predictions averaged" if K > 1 else ""
            text += (f"\n\n{LEAD} rescored with thoughts sampled at temperature {T:g}{each} (evaluate.py; the "
                     f"controls do not sample): NLL with thoughts " + ", ".join(f"seed {s} {v:.4f}" for s, v in
                                                                     rs["nll_thoughts"].items()) + "\n" +
                     "\n".join(compare_lines(rs["compare"], rs["compare_rest"], f", T {T:g}" + (f", {K} averaged" if K > 1 else "")) +
                               content_lines(rs["content"])))
            rescore = {**rs, **{k: {c: {"pooled": v["pooled"], "per_seed": {str(s): x for s, x in v["per_seed"].items()},
                                        "n": v["n"]} for c, v in rs[k].items()} for k in ("compare", "compare_rest")}}
    focus = None
    if args.focus:
        got = {(a, s): f for a in arms for s in seeds if (f := focus_check(args, a, s, evs[(a, s)], args.focus)) is not None}
        focus = {"pattern": args.focus, **focus_summary(got, arms, seeds)}
        text += "\n\n" + "\n".join(focus_lines(args.focus, focus))
    print(text)
    png = os.path.join(args.out, "experiment.png")
    plot(args, arms, seeds, evs, cmp, png, rescore)
    secs = {f"{a}_s{s}": json.load(open(p))["seconds"] for a in arms for s in seeds
            if os.path.isfile(p := os.path.join(args.out, f"{a}_s{s}", "experiment_time.json"))}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"preset": args.preset, "steps": args.steps, "seeds": seeds, "arms": arms, "overrides": extra,
                   "final": {f"{a}_s{s}": evs[(a, s)]["summary"] for a in arms for s in seeds},
                   **{name: {k: {"pooled": v["pooled"], "per_seed": {str(s): x for s, x in v["per_seed"].items()},
                                 "n": v["n"]} for k, v in res.items()}
                      for name, res in (("compare", cmp), ("compare_rest", cmp_rest), ("compare_base", cmp_base))},
                   "content": content, "rescore": rescore, "focus": focus,
                   "seconds": secs, "table": text}, f, indent=1)
    print(f"plot: {png}\nsummary: {os.path.join(args.out, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
