"""Would a right thought help? A trained model scored with thoughts that say the truth.

    python tools/oracle_thought_probe.py --model RUN/checkpoints/step_N [RUN2/... ...] \
        [--focus '(?<== )-?\\d+'] [--sequences 64] [--out FILE.json]
    python tools/oracle_thought_probe.py --model DIR --data FILE.jsonl --seq_len 64 ...
    python tools/oracle_thought_probe.py --compare A.json B.json [A2.json B2.json ...]   # probes' --out, paired

No run so far has shown a model predicting better with its own thoughts than with another
sequence's (README "Does it learn?"). That can fail in three places: the policy (the thoughts
say nothing right), the reader (the state after a thought does not use what the thought says),
or the mixing head (it gives the post-thought prediction too little weight). This probe keeps
the trained model and changes only the thought, at the positions whose next token `--focus`
marks (default: the results after "= " of the built-in corpus), and scores that next token:

  own      the thought the model samples (the run's evaluation temperature; a filler-trained
           model's filler thought)
  other    the thought sampled at the same position of the previous held-out sequence
  filler   the filler token ("...") repeated: a thought that says nothing
  truth    the text's own next thought_len tokens x_{i+1..}: the best a thought could say
  wrong    truth with every digit of the marked run that starts at x_{i+1} changed (each to
           another digit, seeded): the same form, the wrong number
  step     where the context asks for a sum ("a + b = " and digits so far), the units step
           thought.mode=teacher teaches ("8+6=14" for 18 + 16; qstar_ds/teacher.py); the own
           thought elsewhere. With --focus qstar_ds.teacher.SUM_RESULTS, every scored token has one
  other_step  where the context asks for a sum, the model's own thought at the same digit of the
           previous sum in the held-out text (cyclic): a step it wrote, for other numbers. Own
           against other_step is the content check of a model trained with thought.mode=teacher
           (`other` gives it mostly the filler: another sequence seldom has a sum just there)

Per variant, on the marked tokens: the NLL of the mixed prediction (what the model predicts),
of the post-thought state alone (the reader: does it copy from the thought?) and the mean
mixing weight; the paired differences to `own`; before the first digit of a marked number, the
share of own thoughts whose first digit is it (the policy's accuracy) and of the base model's
argmax; where a scored token has a step, the share of own thoughts that write it. Several
--model checkpoints are scored one after
another and pooled (per-sequence values, 95% CI over (model, sequence)). A checkpoint is scored on
its run's held-out sequences (evaluate.py --nll_heldout) with the run's evaluation temperature,
talk length and seed, as tools/experiment.py's --focus scoring does; --data scores a text file.
Nothing is trained; with an untrained mixing head (w = 0) every variant's mixed NLL is the base's.

--compare A.json B.json pairs two probes of different checkpoints of the same held-out text (e.g.
two arms resumed from the same checkpoints, listed in the same seed order): A - B per (model,
sequence) with 95% CIs, for what both scored (the own thought's step and digit shares, the base,
and each variant's mixed and reader NLL and w). More pairs (A2.json B2.json ..., e.g. one probe
per seed) are pooled with the first. Probes that scored different tokens are refused.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qstar_ds.config import ConfigError, ThoughtConfig  # noqa: E402
from qstar_ds.evaluate import TaskError, nll_scores, nll_sequences, run_heldout_sequences  # noqa: E402
from qstar_ds.heldout import focus_positions, mean_ci, token_focus  # noqa: E402
from qstar_ds.layout import Layout  # noqa: E402
from qstar_ds.loading import add_model_args, load_from_args  # noqa: E402
from qstar_ds.model import filler_token_id  # noqa: E402
from qstar_ds.rollout import oracle_thoughts  # noqa: E402
from qstar_ds.teacher import context_steps, teacher_thoughts, writes_step  # noqa: E402

VARIANTS = ("own", "other", "filler", "truth", "wrong", "step", "other_step")
DEFAULT_VARIANTS = VARIANTS[1:5]
"""Scored besides own unless --variants says otherwise (step only on request: it needs a
thought_len that holds a step)."""
DEFAULT_FOCUS = r"(?<== )-?\d+"


def wrong_thoughts(truth: torch.Tensor, run: torch.Tensor, digit_ids: list[int], gen: torch.Generator) -> torch.Tensor:
    """(D, P, t) truth thoughts, (D, P, t) bool: which thought tokens belong to the marked run that
    starts at the thought's first token -> the same thoughts with every single-digit token of
    that run replaced by another digit (d + r mod 10, r uniform in 1..9, drawn per token)."""
    digits = torch.tensor(digit_ids)
    value = torch.full((max(int(truth.max()), max(digit_ids)) + 1,), -1, dtype=torch.long)
    value[digits] = torch.arange(10)                                                            # token -> digit
    v = value[truth]                                                                             # (D, P, t)
    shift = torch.randint(1, 10, truth.shape, generator=gen)
    change = run & (v >= 0)
    return torch.where(change, digits[(v.clamp(min=0) + shift) % 10], truth)


def marked_runs(in_focus: torch.Tensor, anchor: torch.Tensor, t: int) -> torch.Tensor:
    """(D, n) bool token_focus, (D, P) anchors -> (D, P, t) bool: thought token k (x_{i+1+k})
    belongs to the marked run that starts at x_{i+1} (x_{i+1..i+1+k} all marked)."""
    n = in_focus.shape[1]
    f = torch.nn.functional.pad(in_focus, (0, t), value=False)
    idx = anchor.long()[..., None] + 1 + torch.arange(t)                                       # (D, P, t)
    marked = f.gather(1, idx.clamp(max=n + t - 1).flatten(1)).view(idx.shape)
    return marked.long().cumprod(-1).bool()


def digit_token_ids(tokenizer) -> list[int] | None:
    """The ids of "0".."9" where each digit is one token of its own, else None."""
    out = []
    for d in range(10):
        ids = tokenizer.encode(str(d), add_special_tokens=False)
        if len(ids) != 1:
            return None
        out.append(ids[0])
    return out


@torch.no_grad()
def base_argmax(model, ids: torch.Tensor, mask: torch.Tensor, backend: str, batch: int) -> torch.Tensor:
    """(D, n) -> (D, n - 1) bool: the base model's most likely next token is x_{j+1}."""
    out = []
    for a in range(0, ids.shape[0], batch):
        dev = model.lm_head.weight.device
        x, m = ids[a:a + batch].to(dev), mask[a:a + batch].to(dev).bool()
        h = model.hidden(x, Layout.base_only(m, backend=backend))
        out.append((model.logits(h[:, :-1]).argmax(-1) == x[:, 1:]).cpu())
    return torch.cat(out)


def states_next_digit(thoughts: torch.Tensor, nxt: torch.Tensor, where: torch.Tensor, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, P, t) thoughts, (D, P) next tokens, (D, P) bool -> (said, digit), (D, P) bool each:
    `digit`, the next token (where `where`) is one digit; `said`, the first digit in the
    thought's text is that digit (a thought writes " 28." before "2": leading text is skipped)."""
    said, digit = torch.zeros_like(where), torch.zeros_like(where)
    for d, p in where.nonzero().tolist():
        target = tok.decode([int(nxt[d, p])]).strip()
        if len(target) == 1 and target.isdigit():
            digit[d, p] = True
            first = next((c for c in tok.decode(thoughts[d, p].tolist()) if c.isdigit()), None)
            said[d, p] = first == target
    return said, digit


def other_sum_thoughts(thoughts: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor,
                       tok) -> torch.Tensor:
    """(D, P, t) own thoughts -> the same, where the context asks for a sum, replaced by the own
    thought at the same offset (clamped) of the previous sum (a run of consecutive positions with
    a step; cyclic over the sequences in order). Raises TaskError with fewer than 2 sums."""
    groups: list[list[tuple[int, int]]] = []
    for d in range(ids.shape[0]):
        steps = context_steps(ids[d].tolist(), mask[d].bool().tolist(), tok)
        last = None
        for p, i in enumerate(anchor[d].tolist()):
            if steps[i] is None:
                last = None
                continue
            if last is None or i != last + 1:
                groups.append([])
            groups[-1].append((d, p))
            last = i
    if len(groups) < 2:
        raise TaskError(f"--variants other_step: the text has {len(groups)} sum(s); it needs at least 2")
    out = thoughts.clone()
    for g, group in enumerate(groups):
        src = groups[g - 1]
        for j, (d, p) in enumerate(group):
            sd, sp = src[min(j, len(src) - 1)]
            out[d, p] = thoughts[sd, sp]
    return out


def per_sequence(values: torch.Tensor, where: torch.Tensor) -> list:
    """(D, P) values, (D, P) bool -> each sequence's mean over `where` (None: no such position)."""
    w = where.double()
    return [float(v) / float(c) if c > 0 else None for v, c in zip((values.double() * w).sum(1), w.sum(1))]


def score_model(model, tok, cfg: ThoughtConfig, ids, mask, pattern: str, filler_id: int | None, seed: int,
                batch: int, log=print, variants=DEFAULT_VARIANTS) -> dict:
    """Every variant's scores on the positions whose next token `pattern` marks -> per-sequence
    lists (None where a sequence has no marked token) and counts, for `own` and `variants`. ids,
    mask (D, n) on the CPU."""
    digit_ids = digit_token_ids(tok)
    if digit_ids is None:
        raise TaskError("the tokenizer does not give each digit 0-9 a token of its own, so `wrong` is undefined")
    fill = filler_token_id(tok, "...") if filler_id is None else filler_id
    t0 = time.perf_counter()
    own = nll_scores(model, cfg, ids, mask, batch, seed, filler_id, read=True)
    log(f"  own ({time.perf_counter() - t0:.0f} s)")
    anchor, valid = own["anchor"], own["valid"].bool()
    in_focus = token_focus(ids, tok, pattern)
    where = focus_positions(in_focus, anchor, valid)                                            # (D, P)
    truth = oracle_thoughts(ids, mask, anchor, None, cfg.thought_len, fill)                     # (D, P, t)
    thoughts = {"other": own["thoughts"].roll(1, dims=0), "filler": torch.full_like(truth, fill), "truth": truth,
                "wrong": wrong_thoughts(truth, marked_runs(in_focus, anchor, cfg.thought_len), digit_ids,
                                        torch.Generator().manual_seed(seed))}
    if "step" in variants:
        try:
            step, on = teacher_thoughts(ids, mask, anchor, tok, cfg.thought_len, fill)
        except ValueError as e:
            raise TaskError(f"--variants step: {e}") from None
        thoughts["step"] = torch.where(on[..., None], step, own["thoughts"])
    if "other_step" in variants:
        thoughts["other_step"] = other_sum_thoughts(own["thoughts"], ids, mask, anchor, tok)
    scores = {"own": own}
    for name, th in thoughts.items():
        if name not in variants:
            continue
        # other positions keep the own thought: the next token's score depends only on its own position's thought
        th = torch.where(where[..., None], th, own["thoughts"])
        scores[name] = nll_scores(model, cfg, ids, mask, batch, seed, thoughts=th, read=True)
        log(f"  {name} ({time.perf_counter() - t0:.0f} s)")
    nxt = ids.gather(1, (anchor.long() + 1).clamp(max=ids.shape[1] - 1))                        # (D, P)
    best = base_argmax(model, ids, mask, cfg.attention_backend, batch).gather(1, anchor.long().clamp(max=ids.shape[1] - 2))
    said, digit = states_next_digit(own["thoughts"], nxt, where, tok)
    # a number's first digit: the token before it is not marked (mid-number, a thought that
    # restates the whole number would be scored against the wrong digit)
    first = digit & ~in_focus.gather(1, anchor.long().clamp(max=ids.shape[1] - 1))
    wrote, has = writes_step(own["thoughts"], ids, mask, anchor, where, tok)
    out = {"tokens": int(where.sum()), "sequences": int(where.any(1).sum()), "step_tokens": int(has.sum()),
           "own_writes_step": per_sequence(wrote.double(), has),
           "own_says_digit": per_sequence(said.double(), first),
           "base_argmax_right": per_sequence(best.double(), first),
           "base": per_sequence(-own["base"], where)}
    for name, s in scores.items():
        out[name] = {"mixed": per_sequence(-s["mixed"], where), "read": per_sequence(-s["read"], where),
                     "w": per_sequence(s["w"], where)}
    return out


def pooled(values: list) -> list[float]:
    return [v for v in values if v is not None]


def summarize(per_model: list[dict]) -> dict:
    """Per-sequence lists of every model, pooled -> means with 95% CIs, and paired differences to own."""
    def cat(get):
        return [v for m in per_model for v in get(m)]

    def ci(xs):
        m, lo, hi = mean_ci(torch.tensor(pooled(xs), dtype=torch.float64))
        return {"mean": m, "ci95": [lo, hi]}

    def diff(a, b):
        return ci([x - y if x is not None and y is not None else None for x, y in zip(a, b)])

    out = {"tokens": sum(m["tokens"] for m in per_model), "sequences": sum(m["sequences"] for m in per_model),
           "base": ci(cat(lambda m: m["base"])), "own_says_digit": ci(cat(lambda m: m["own_says_digit"])),
           "base_argmax_right": ci(cat(lambda m: m["base_argmax_right"])),
           "step_tokens": sum(m.get("step_tokens", 0) for m in per_model)}
    if out["step_tokens"]:
        out["own_writes_step"] = ci(cat(lambda m: m["own_writes_step"]))
    for v in [v for v in VARIANTS if v in per_model[0]]:
        r = {k: ci(cat(lambda m: m[v][k])) for k in ("mixed", "read", "w")}
        if v != "own":
            for k in ("mixed", "read"):
                r[k + "_minus_own"] = diff(cat(lambda m: m[v][k]), cat(lambda m: m["own"][k]))
        out[v] = r
    if "wrong" in out and "truth" in out:
        out["wrong_minus_truth"] = {k: diff(cat(lambda m: m["wrong"][k]), cat(lambda m: m["truth"][k]))
                                    for k in ("mixed", "read")}
    return out


def paired(a: dict, b: dict) -> dict:
    """Two probes' --out contents (the same held-out text, models in the same order) -> every
    per-sequence value both hold, A - B per (model, sequence), pooled, with 95% CIs."""
    pa, pb = a["per_model"], b["per_model"]
    if len(pa) != len(pb):
        raise TaskError(f"A has {len(pa)} model(s), B {len(pb)}: pair probes of as many checkpoints, in the same order")
    for i, (ma, mb) in enumerate(zip(pa, pb)):
        if [x is None for x in ma["base"]] != [x is None for x in mb["base"]] or ma["tokens"] != mb["tokens"]:
            raise TaskError(f"model {i + 1} ({ma.get('model')} / {mb.get('model')}): the two probes scored different "
                            f"tokens ({ma['tokens']} / {mb['tokens']}); pair runs of the same data, seed and --focus")

    def diff(get):
        xs = [x - y for ma, mb in zip(pa, pb) for x, y in zip(get(ma), get(mb)) if x is not None and y is not None]
        m, lo, hi = mean_ci(torch.tensor(xs, dtype=torch.float64))
        return {"mean": m, "ci95": [lo, hi], "pairs": len(xs)}

    out = {k: diff(lambda m, k=k: m[k]) for k in ("own_writes_step", "own_says_digit", "base")
           if all(k in m for m in pa + pb)}
    for v in [v for v in VARIANTS if all(v in m for m in pa + pb)]:
        out[v] = {k: diff(lambda m, v=v, k=k: m[v][k]) for k in ("mixed", "read", "w")}
    return out


def paired_lines(d: dict) -> list[str]:
    out = ["A - B, 95% CI over (model, sequence) pairs:"]
    for k, what in (("own_writes_step", "own thought writes the units step (share)"),
                    ("own_says_digit", "own thought's first digit right (share)"), ("base", "base NLL")):
        if k in d:
            out.append(f"  {what}: {fmt(d[k], True)} ({d[k]['pairs']} pairs)")
    for v in [v for v in VARIANTS if v in d]:
        out.append(f"  {v}: mixed NLL {fmt(d[v]['mixed'], True)}, reader alone {fmt(d[v]['read'], True)}, "
                   f"w {fmt(d[v]['w'], True)}")
    return out


def compare(paths: list[str], out: str | None) -> int:
    try:
        if len(paths) % 2:
            raise TaskError(f"--compare takes pairs of probes (A.json B.json [A2.json B2.json ...]); got {len(paths)} files")
        probes = []
        for p in paths:
            try:
                with open(p) as f:
                    probes.append(json.load(f))
            except (OSError, ValueError) as e:
                raise TaskError(f"--compare {p!r}: not a probe written by --out ({e})") from None
            if not isinstance(probes[-1], dict) or not isinstance(probes[-1].get("per_model"), list):
                raise TaskError(f"--compare {p!r}: not a probe written by --out (no per_model list)")
        for p, q in zip(paths[1:], probes[1:]):
            if q.get("focus") != probes[0].get("focus"):
                raise TaskError(f"--compare: {p!r} scored --focus {q.get('focus')!r}, {paths[0]!r} "
                                f"{probes[0].get('focus')!r}: pair probes of the same --focus")
        path_a, path_b = paths[0::2], paths[1::2]
        try:
            for pa, pb, qa, qb in zip(path_a, path_b, probes[0::2], probes[1::2]):     # each pair on its own
                try:
                    paired(qa, qb)
                except TaskError as e:
                    if len(paths) == 2:
                        raise
                    raise TaskError(f"{pa!r} - {pb!r}: {e}") from None
            a, b = ({"per_model": [m for q in probes[k::2] for m in q["per_model"]]} for k in (0, 1))
            d = paired(a, b)
        except (KeyError, TypeError) as e:
            raise TaskError(f"--compare: not probes written by --out (a model's entry lacks {e})") from None
    except TaskError as e:
        print(f"oracle_thought_probe: error: {e}", file=sys.stderr)
        return 2
    print(f"A = {', '.join(path_a)}\nB = {', '.join(path_b)}")
    print("\n".join(paired_lines(d)))
    if out:
        with open(out, "w") as f:
            json.dump({"a": path_a, "b": path_b, "a_minus_b": d}, f, indent=1)
        print(f"wrote {out}")
    return 0


def fmt(c: dict, sign: bool = False) -> str:
    f = "{:+.4f}" if sign else "{:.4f}"
    return (f + " [" + f + ", " + f + "]").format(c["mean"], *c["ci95"])


def lines(s: dict) -> list[str]:
    out = [f"{s['tokens']} marked tokens in {s['sequences']} sequences; base NLL there {fmt(s['base'])}; "
           f"before a number's first digit, own thought's first digit is it {s['own_says_digit']['mean']:.1%}, "
           f"the base model's argmax is it {s['base_argmax_right']['mean']:.1%}",
           *([f"{s['step_tokens']} of them have a units step (thought.mode=teacher); own thought writes it "
              f"{s['own_writes_step']['mean']:.1%} [{s['own_writes_step']['ci95'][0]:.1%}, "
              f"{s['own_writes_step']['ci95'][1]:.1%}]"] if s.get("step_tokens") else []),
           f"{'thought':10s} {'mixed NLL':>26s} {'minus own':>28s} {'reader alone NLL':>26s} {'minus own':>28s} {'w':>7s}"]
    for v in [v for v in VARIANTS if v in s]:
        r = s[v]
        out.append(f"{v:10s} {fmt(r['mixed']):>26s} {fmt(r['mixed_minus_own'], True) if v != 'own' else '':>28s} "
                   f"{fmt(r['read']):>26s} {fmt(r['read_minus_own'], True) if v != 'own' else '':>28s} "
                   f"{r['w']['mean']:7.4f}")
    w = s.get("wrong_minus_truth")
    if w:
        out.append(f"wrong - truth: mixed {fmt(w['mixed'], True)}, reader {fmt(w['read'], True)} (> 0: it reads the number)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 conflict_handler="resolve")      # --model below takes several
    add_model_args(ap)
    ap.add_argument("--model", nargs="+", help="trained checkpoints (or run dirs), pooled")
    ap.add_argument("--compare", nargs="+", metavar="A.json B.json", help="pair probes' --out files (A - B; "
                    "more pairs A2.json B2.json ... pooled with the first)")
    ap.add_argument("--focus", default=DEFAULT_FOCUS, help="regular expression marking the scored tokens "
                    "(evaluate.py --nll_focus); default: results after '= '")
    ap.add_argument("--sequences", type=int, default=None, help="held-out sequences (default: as many as the run scored)")
    ap.add_argument("--data", default=None, help="score this text file instead of the runs' held-out text")
    ap.add_argument("--seq_len", type=int, default=64, help="with --data: tokens per sequence")
    ap.add_argument("--talk_len", type=int, default=None, help="with --data: K (default: the run's or 4)")
    ap.add_argument("--temperature", type=float, default=None, help="thought temperature (default: the run's eval)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's data seed)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"which thoughts to score besides own (comma-separated, of {','.join(VARIANTS[1:])}; "
                         f"default {','.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the pooled summary and per-model lists as JSON")
    args = ap.parse_args(argv)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        print(f"oracle_thought_probe: --out={args.out!r}: its directory does not exist", file=sys.stderr)
        return 2
    if args.compare:
        if args.model:
            print("oracle_thought_probe: --compare reads probes' files; it scores no --model", file=sys.stderr)
            return 2
        return compare(args.compare, args.out)
    if not args.model:
        print("oracle_thought_probe: give --model CHECKPOINT [...] (or --compare A.json B.json)", file=sys.stderr)
        return 2
    try:
        re.compile(args.focus)
    except re.error as e:
        print(f"oracle_thought_probe: --focus={args.focus!r}: not a usable regular expression ({e})", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        print(f"oracle_thought_probe: --variants={args.variants!r}: choose from {','.join(VARIANTS[1:])}", file=sys.stderr)
        return 2
    if args.data is not None and not os.path.isfile(args.data):
        print(f"oracle_thought_probe: --data={args.data!r}: no such file", file=sys.stderr)
        return 2
    for p in args.model:
        if os.path.sep in p and not os.path.exists(p):
            print(f"oracle_thought_probe: --model {p!r}: no such checkpoint", file=sys.stderr)
            return 2
    per_model, models = [], list(args.model)
    for path in models:
        args.model = path
        try:
            loaded = load_from_args(args)
            run = loaded.run_config or {}
            if args.data is None and not run:
                raise TaskError(f"--model {path!r} is not a training checkpoint: give --data FILE to score")
            th, ev = run.get("thought", {}), run.get("eval", {})
            temp = args.temperature if args.temperature is not None else float(ev.get("temperature", 1.0))
            talk = args.talk_len or int(th.get("talk_len", 4))
            seed = args.seed if args.seed is not None else int(run.get("data", {}).get("seed", 0))
            cfg = ThoughtConfig(thought_len=loaded.thought_len, n_thoughts=1, talk_len=talk, temperature=temp,
                                talk_positions=loaded.talk_positions, attention_backend=args.attention_backend)
            if args.data is None:
                ids, mask = run_heldout_sequences(run, loaded.tokenizer, args.sequences)
            else:
                ids, mask = nll_sequences(loaded.tokenizer, args.data, args.seq_len, args.sequences or 64, "text")
            if ids.shape[0] < 2:
                raise TaskError(f"{path}: {ids.shape[0]} sequence(s); `other` needs at least 2")
            print(f"oracle_thought_probe: {loaded.source}; {ids.shape[0]} sequences of {ids.shape[1]} tokens, "
                  f"thoughts of {cfg.thought_len} at T {temp:g}, seed {seed}", flush=True)
            m = score_model(loaded.model, loaded.tokenizer, cfg, ids, mask,
                            args.focus, loaded.filler_id, seed, args.batch_size,
                            log=lambda s: print(s, flush=True), variants=variants)
        except (ConfigError, TaskError) as e:
            print(f"oracle_thought_probe: error: {e}", file=sys.stderr)
            return 2
        if m["tokens"] == 0:
            print(f"oracle_thought_probe: error: --focus {args.focus!r} marks no scored token in {path}'s text",
                  file=sys.stderr)
            return 2
        m["model"] = loaded.source
        per_model.append(m)
        print("\n".join(lines(summarize([m]))), flush=True)
    s = summarize(per_model)
    if len(per_model) > 1:
        print(f"pooled over {len(per_model)} models:")
        print("\n".join(lines(s)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"models": models, "focus": args.focus, "summary": s, "per_model": per_model}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
