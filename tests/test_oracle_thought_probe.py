"""tools/oracle_thought_probe.py: the thoughts it builds (against loops over positions), its scores
(against nll_scores with that thought at every position, and evaluate.py's focus numbers), the
untrained-head identity, and the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_model
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
from oracle_thought_probe import (DEFAULT_VARIANTS, marked_runs, score_model, summarize,  # noqa: E402
                                  wrong_thoughts)

from qstar_ds.config import ThoughtConfig  # noqa: E402
from qstar_ds.data import arith_document  # noqa: E402
from qstar_ds.evaluate import nll_scores  # noqa: E402
from qstar_ds.heldout import focus_positions, token_focus  # noqa: E402
from qstar_ds.rollout import oracle_thoughts  # noqa: E402

PROBE = os.path.join(ROOT, "tools", "oracle_thought_probe.py")


def test_truth_runs_and_wrong_against_loops():
    g = torch.Generator().manual_seed(0)
    D, n, t, pad = 3, 12, 4, 99
    digits = list(range(10, 20))
    ids = torch.randint(0, 30, (D, n), generator=g)
    mask = torch.ones(D, n, dtype=torch.long)
    mask[2, 9:] = 0
    anchor = torch.tensor([[0, 3, 7, 10]] * D)
    focus = torch.rand(D, n, generator=g) < 0.5
    truth = oracle_thoughts(ids, mask, anchor, None, t, pad)
    runs = marked_runs(focus, anchor, t)
    for d in range(D):
        for p, i in enumerate(anchor[d].tolist()):
            want = [int(ids[d, j]) if j < n and mask[d, j] else pad for j in range(i + 1, i + 1 + t)]
            assert truth[d, p].tolist() == want
            run, alive = [], True
            for j in range(i + 1, i + 1 + t):
                alive = alive and j < n and bool(focus[d, j])
                run.append(alive)
            assert runs[d, p].tolist() == run
    wrong = wrong_thoughts(truth, runs, digits, torch.Generator().manual_seed(1))
    is_digit = (truth >= 10) & (truth < 20)
    assert torch.equal(wrong[~(runs & is_digit)], truth[~(runs & is_digit)])
    changed = runs & is_digit
    assert changed.any() and (wrong[changed] != truth[changed]).all()
    assert ((wrong[changed] >= 10) & (wrong[changed] < 20)).all()


def test_scores_equal_nll_scores_with_that_thought_everywhere():
    """A token's score depends only on its own position's thought: each variant's per-sequence
    numbers equal nll_scores with the variant's thought at every position, restricted to the
    marked tokens; with an untrained mixing head every variant's mixed NLL is the base's."""
    model, tok = make_model("llama", dtype=torch.float32)
    flat = tok(" ".join(arith_document(3, i) for i in range(4)))["input_ids"][:4 * 24]
    ids = torch.tensor(flat).view(4, 24)
    mask = torch.ones_like(ids)
    cfg = ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=2, temperature=1.0)
    pattern = r"(?<== )-?\d+"
    got = score_model(model, tok, cfg, ids, mask, pattern, None, seed=5, batch=2, log=lambda s: None)
    own = nll_scores(model, cfg, ids, mask, 2, 5, read=True)
    where = focus_positions(token_focus(ids, tok, pattern), own["anchor"], own["valid"])
    assert got["tokens"] == int(where.sum()) > 0 and any(v is not None for v in got["own_says_digit"])

    def seq(s, key):
        return [float((-s[key][d][where[d]]).mean()) if where[d].any() else None for d in range(4)]
    assert got["own"]["mixed"] == pytest.approx(seq(own, "mixed"), rel=1e-9)
    assert got["base"] == pytest.approx(seq(own, "base"), rel=1e-9)
    truth = oracle_thoughts(ids, mask, own["anchor"], None, 3, tok.encode("...", add_special_tokens=False)[0])
    everywhere = nll_scores(model, cfg, ids, mask, 2, 5, thoughts=truth, read=True)
    assert got["truth"]["mixed"] == pytest.approx(seq(everywhere, "mixed"), rel=1e-6)
    assert got["truth"]["read"] == pytest.approx(seq(everywhere, "read"), rel=1e-6)
    other = nll_scores(model, cfg, ids, mask, 2, 5, thoughts=own["thoughts"].roll(1, dims=0), read=True)
    assert got["other"]["mixed"] == pytest.approx(seq(other, "mixed"), rel=1e-6)
    assert got["truth"]["mixed"] != got["wrong"]["mixed"] and got["truth"]["mixed"] != got["own"]["mixed"]
    s = summarize([got, got])
    assert s["tokens"] == 2 * got["tokens"] and s["own"]["mixed"]["mean"] == pytest.approx(
        sum(v for v in got["own"]["mixed"] if v is not None) / got["sequences"])
    assert s["truth"]["mixed_minus_own"]["mean"] == pytest.approx(
        s["truth"]["mixed"]["mean"] - s["own"]["mixed"]["mean"], abs=1e-9)

    with torch.no_grad():
        for p in model.mixing_head.parameters():
            p.zero_()
    flat_head = score_model(model, tok, cfg, ids, mask, pattern, None, seed=5, batch=2, log=lambda s: None)
    for v in ("own",) + DEFAULT_VARIANTS:
        assert flat_head[v]["mixed"] == pytest.approx(flat_head["base"], abs=1e-5)


def test_step_variant_and_how_often_the_policy_writes_the_step():
    """--variants step: where the context asks for a sum, the teacher's units step (own thought
    elsewhere) equals nll_scores with those thoughts, restricted to the marked tokens; the share of
    own thoughts that write the step is counted over the marked tokens that have one."""
    from qstar_ds.teacher import SUM_RESULTS, context_steps, teacher_thoughts
    model, tok = make_model("llama", dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    docs = [f"Compute {a} + {b}. We have {a} + {b} = {a + b}. Then more text follows here."
            for a, b in torch.randint(2, 99, (6, 2), generator=g).tolist()]
    rows = [tok(d)["input_ids"][:48] for d in docs]
    ids = torch.tensor([r + [tok.pad_token_id] * (48 - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (48 - len(r)) for r in rows])
    cfg = ThoughtConfig(thought_len=6, n_thoughts=1, talk_len=2, temperature=1.0)
    got = score_model(model, tok, cfg, ids, mask, SUM_RESULTS, None, seed=2, batch=3, log=lambda s: None,
                      variants=("step", "other_step"))
    own = nll_scores(model, cfg, ids, mask, 3, 2, read=True)
    where = focus_positions(token_focus(ids, tok, SUM_RESULTS), own["anchor"], own["valid"])
    fill = tok.encode("...", add_special_tokens=False)[0]
    step, on = teacher_thoughts(ids, mask, own["anchor"], tok, 6, fill)
    assert got["tokens"] == int(where.sum()) > 0 and got["step_tokens"] == int((where & on).sum()) == got["tokens"]
    scored = nll_scores(model, cfg, ids, mask, 3, 2, thoughts=torch.where(on[..., None], step, own["thoughts"]),
                        read=True)
    for key in ("mixed", "read"):
        want = [float((-scored[key][d][where[d]]).mean()) if where[d].any() else None for d in range(len(rows))]
        assert got["step"][key] == pytest.approx(want, rel=1e-6)
    assert got["step"]["mixed"] != got["own"]["mixed"]
    # other_step: each sum's positions get the own thoughts of the previous sum (by offset, clamped)
    from oracle_thought_probe import other_sum_thoughts
    th = own["thoughts"]
    other = other_sum_thoughts(th, ids, mask, own["anchor"], tok)
    assert torch.equal(other[~on], th[~on]) and not torch.equal(other[on], th[on])
    spans = []                                    # (sequence, [positions]) of each sum, in order
    for d in range(len(rows)):
        for p in on[d].nonzero()[:, 0].tolist():
            if spans and spans[-1][0] == d and spans[-1][1][-1] == p - 1:
                spans[-1][1].append(p)
            else:
                spans.append((d, [p]))
    for g, (d, ps) in enumerate(spans):
        sd, sps = spans[g - 1]
        for j, p in enumerate(ps):
            assert torch.equal(other[d, p], th[sd, sps[min(j, len(sps) - 1)]])
    scored = nll_scores(model, cfg, ids, mask, 3, 2, thoughts=other, read=True)
    want = [float((-scored["mixed"][d][where[d]]).mean()) if where[d].any() else None for d in range(len(rows))]
    assert got["other_step"]["mixed"] == pytest.approx(want, rel=1e-6)
    wrote = []
    for d in range(len(rows)):
        steps = context_steps(ids[d].tolist(), mask[d].bool().tolist(), tok)
        hits = [tok.decode(own["thoughts"][d, p].tolist()).replace(" ", "").startswith(steps[int(own["anchor"][d, p])])
                for p in where[d].nonzero()[:, 0].tolist()]
        wrote.append(sum(hits) / len(hits) if hits else None)
    assert got["own_writes_step"] == pytest.approx(wrote)
    s = summarize([got])
    assert s["step_tokens"] == got["step_tokens"] and "step" in s and "mixed_minus_own" in s["step"]
    with pytest.raises(Exception, match="thought_len=3"):
        score_model(model, tok, ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=2), ids, mask, SUM_RESULTS, None,
                    seed=2, batch=3, log=lambda s: None, variants=("step",))


def test_cli_writes_json_and_refuses_bad_arguments(tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": arith_document(0, i)}) + "\n" for i in range(12)))
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, PROBE, "--model", "tiny-llama", "tiny-llama", "--data", str(text),
                        "--seq_len", "24", "--sequences", "3", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pooled over 2 models" in r.stdout and "wrong - truth" in r.stdout
    d = json.loads(out.read_text())
    assert {"own", *DEFAULT_VARIANTS} <= set(d["summary"]) and "step" not in d["summary"] and len(d["per_model"]) == 2
    r = subprocess.run([sys.executable, PROBE, "--model", "tiny-llama", "--data", str(text), "--seq_len", "24",
                        "--sequences", "3", "--variants", "truth", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert {"own", "truth"} <= set(d["summary"]) and not {"other", "filler", "wrong"} & set(d["summary"])
    for bad, word in ((["--focus", "(1"], "--focus='(1'"), (["--variants", "truth,oracle"], "--variants="), (["--out", str(tmp_path / "no" / "p.json")], "--out="),
                      (["--model", "/no/such/ckpt"], "/no/such/ckpt"),
                      (["--focus", "zzz"], "marks no scored token"),
                      ([], "not a training checkpoint")):
        args = ["--model", "tiny-llama", "--data", str(text), "--seq_len", "24", "--sequences", "3"]
        if not bad:
            args = ["--model", "tiny-llama"]
        r = subprocess.run([sys.executable, PROBE, *args, *bad], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr[-2000:])


def test_compare_pairs_two_probes_by_model_and_sequence(tmp_path):
    import math
    from oracle_thought_probe import fmt, paired

    def probe(shift):     # two models, sequences with None where a sequence has nothing scored
        def model(k):
            base = [1.0 + k, None, 0.5 * k, 2.0, 0.25]
            own = {"mixed": [None if b is None else b - 0.1 * k - shift * (i + 1) for i, b in enumerate(base)],
                   "read": [None if b is None else b + shift for b in base], "w": [None if b is None else 0.1 for b in base]}
            return {"model": f"m{k}", "tokens": 9, "base": base, "own": own,
                    "own_writes_step": [None, None, 0.5, shift, 1.0], "own_says_digit": [0.0, None, 1.0, 0.5, shift]}
        return {"focus": "f", "per_model": [model(1), model(2)]}

    a, b = probe(0.3), probe(0.0)
    d = paired(a, b)

    def expect(xs):
        m = sum(xs) / len(xs)
        h = 1.96 * math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
        return m, m - h, m + h

    mixed = [-0.3 * (i + 1) for _ in (1, 2) for i in (0, 2, 3, 4)]            # None pairs left out
    for got, want in ((d["own"]["mixed"], mixed), (d["own_writes_step"], [0.3] * 2 + [0.0] * 2 + [0.0] * 2),
                      (d["own_says_digit"], [0.0, 0.0, 0.0, 0.3] * 2), (d["own"]["read"], [0.3] * 8)):
        assert got["pairs"] == len(want)
        assert [got["mean"], *got["ci95"]] == pytest.approx(expect(want), abs=1e-12)
    assert d["base"]["mean"] == 0 and d["own"]["w"]["mean"] == 0 and "other" not in d
    # the command line: the same numbers, written; mismatched probes are one clear line
    fa, fb, fo = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "d.json"
    fa.write_text(json.dumps(a))
    fb.write_text(json.dumps(b))
    r = subprocess.run([sys.executable, PROBE, "--compare", str(fa), str(fb), "--out", str(fo)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"own: mixed NLL {fmt(d['own']['mixed'], True)}, reader alone {fmt(d['own']['read'], True)}" in r.stdout
    assert json.loads(fo.read_text())["a_minus_b"] == json.loads(json.dumps(d))
    # more pairs (e.g. one probe per seed) pool with the first: A1 A2 against B1 B2, per (model, sequence)
    r = subprocess.run([sys.executable, PROBE, "--compare", str(fa), str(fb), str(fb), str(fa), "--out", str(fo)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    both = paired({"per_model": a["per_model"] + b["per_model"]}, {"per_model": b["per_model"] + a["per_model"]})
    assert json.loads(fo.read_text())["a_minus_b"] == json.loads(json.dumps(both))
    assert both["own"]["mixed"]["pairs"] == 2 * len(mixed) and both["own"]["mixed"]["mean"] == pytest.approx(0, abs=1e-12)
    c = probe(0.0)
    c["per_model"][1]["base"][1] = 3.0                                    # scored a token B did not
    fc = tmp_path / "c.json"
    fc.write_text(json.dumps(c))
    fd = tmp_path / "one.json"
    fd.write_text(json.dumps({"focus": "f", "per_model": a["per_model"][:1]}))
    fe = tmp_path / "e.json"
    fe.write_text("{not json")
    ff = tmp_path / "f.json"
    ff.write_text(json.dumps({"focus": "f", "per_model": [{"tokens": 9}, {"tokens": 9}]}))
    fg = tmp_path / "g.json"
    fg.write_text(json.dumps({**a, "focus": "g"}))
    for args, word in (([str(fa), str(fc)], "model 2 (m2 / m2): the two probes scored different tokens"),
                       ([str(fa), str(fd)], "A has 2 model(s), B 1"), ([str(fa), str(fe)], f"--compare {str(fe)!r}"),
                       ([str(fa), str(tmp_path / "none.json")], "none.json"),
                       ([str(fa), str(ff)], "a model's entry lacks 'base'"),
                       ([str(fa), str(fb), str(fa)], "takes pairs of probes"),
                       ([str(fa), str(fd), str(fd), str(fa)], f"{str(fa)!r} - {str(fd)!r}: A has 2 model(s), B 1"),
                       ([str(fa), str(fb), str(fg), str(fb)], "scored --focus 'g'"),
                       ([str(fa), str(fb), "--model", "tiny-llama"], "scores no --model")):
        r = subprocess.run([sys.executable, PROBE, "--compare", *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    r = subprocess.run([sys.executable, PROBE], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "give --model" in r.stderr


def test_states_next_digit_skips_leading_text_and_non_digits():
    from oracle_thought_probe import states_next_digit
    from qstar_ds.tiny import tiny_tokenizer
    tok = tiny_tokenizer()

    def enc(s):
        return tok.encode(s, add_special_tokens=False)
    rows = [enc(" 28. Now"), enc("x = 19.."), enc(" nothing"), enc(" 28. Now")]
    t = max(map(len, rows))
    thoughts = torch.tensor([[r + enc(".") * (t - len(r))] for r in rows])         # (4, 1, t)
    nxt = torch.tensor([[enc("2")[0]], [enc("2")[0]], [enc("2")[0]], [enc("a")[0]]])
    where = torch.tensor([[True], [True], [True], [True]])
    said, digit = states_next_digit(thoughts, nxt, where, tok)
    assert digit[:, 0].tolist() == [True, True, True, False]
    assert said[:, 0].tolist() == [True, False, False, False]
