"""Evaluation: task parsing, answer-token sets, soft/exact scores against references, CoT maj@k,
the command line (one process and two ranks) on the shared tiny slices."""
import json
import math
import subprocess
import sys

import pytest
import torch

from qstar_ds.config import ThoughtConfig
from qstar_ds.evaluate import (EvalSettings, answer_logprobs, eval_batch, mean_ci, soft_score, wilson)
from qstar_ds.tasks import TaskError, answer_tokens, csqa_item, first_number, gsm8k_item, load_items, majority

from conftest import DEVICE, gen, make_model, shared_file
from test_generate import reference_logprobs

GSM_ROW = {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=7\n#### 1,007"}
CSQA_ROW = {"answerKey": "C", "id": "q1", "question": {"stem": "Where do fish live?", "choices": [
    {"label": lab, "text": txt} for lab, txt in zip("ABCDE", ["desert", "sky", "water", "tree", "car"])]}}


def test_items_and_parsing():
    g = gsm8k_item(0, GSM_ROW, "x")
    assert g.prompt == "Q: Tom has 3 apples and buys 4 more. How many?\nA:" and g.answer == " 1007\n" and g.gold == "1007"
    c = csqa_item(0, CSQA_ROW, "x")
    assert c.prompt.endswith("(C) water (D) tree (E) car\nA:") and c.answer == " C\n" and c.gold == "C"
    hub = dict(CSQA_ROW, question=CSQA_ROW["question"]["stem"],
               choices={"label": list("ABCDE"), "text": ["desert", "sky", "water", "tree", "car"]})
    assert csqa_item(0, hub, "x").prompt == c.prompt
    assert first_number("so it is 1,234.") == "1234" and first_number("x = -5 then 7") == "-5"
    assert first_number("12.0 dollars") == "12" and first_number("none") is None
    assert majority(["3", None, "4", "4", "3"]) == "3" and majority([None]) is None
    with pytest.raises(TaskError, match="####"):
        gsm8k_item(0, {"question": "q", "answer": "no number"}, "f.jsonl:3")
    with pytest.raises(TaskError, match="f.jsonl:9"):
        csqa_item(0, {"question": "q"}, "f.jsonl:9")


def test_load_items_errors(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        load_items("gsm8k", str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GSM_ROW) + "\n{oops\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not valid JSON \(.*column 2\)"):
        load_items("gsm8k", str(bad))
    assert len(load_items("gsm8k", str(bad), limit=1)) == 1
    with pytest.raises(TaskError, match="unknown"):
        load_items("mmlu", str(bad))


def test_answer_token_sets_come_from_the_tokenizer():
    _, tok = make_model("llama", dtype=torch.float32)
    V = len(tok)
    d = answer_tokens(tok, "gsm8k", V)
    for s in "0123456789\n":
        for i in tok.encode(s, add_special_tokens=False):
            assert i in d.valid
    assert all(tok.decode([i]).strip(" ").isdigit() or set(tok.decode([i])) <= {"\n"} for i in d.valid)
    c = answer_tokens(tok, "csqa", V)
    assert set(c.choices.values()) <= set("ABCDE") and c.choices
    assert all(tok.decode([i]).strip() in "ABCDE" and tok.decode([i]).strip() for i in c.choices)


def test_soft_score_by_hand():
    logp = torch.log_softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)), -1)
    valid = [1, 2, 3]
    # token 7 (not valid: a leading space, say) is context; 2 and 3 are scored
    p = logp.exp()
    want = (p[1, 2] / p[1, valid].sum()) * (p[2, 3] / p[2, valid].sum())
    assert math.isclose(soft_score(logp, [7, 2, 3], valid), float(want), rel_tol=1e-5)
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi and 0 <= lo and hi <= 1
    assert mean_ci([0.0, 0.0, 1e-3]) [0] == 0.0


@pytest.mark.parametrize("thoughts,mix_rule", [(False, "hidden"), (True, "hidden"), (True, "prob")])
def test_answer_logprobs_equal_plain_references(thoughts, mix_rule):
    """Teacher-forced answer log-probs of a padded batch == one plain HF pass per item (thoughts
    off) or the plain prefix + <sot> thought <eot> reference (thoughts on; both mixing rules)."""
    model, tok = make_model("llama", dtype=torch.float64)
    model.set_mix_rule(mix_rule, 0.2)
    items = [gsm8k_item(0, GSM_ROW, "x"), gsm8k_item(1, dict(GSM_ROW, question="Short?"), "y")]
    cfg = ThoughtConfig(thought_len=2, temperature=1.0, attention_backend="split")
    out = answer_logprobs(model, cfg, tok, items, thoughts, gen(0), DEVICE)
    for it, (logp, a, th, used) in zip(items, out):
        prompt = tok.encode(it.prompt, add_special_tokens=False)
        assert a == tok.encode(it.answer, add_special_tokens=False) and logp.shape[0] == len(a)
        assert (th is not None) == thoughts and bool(used.all()) == thoughts
        for j in range(len(a)):
            ref = reference_logprobs(model, prompt + a[:j], th[j].tolist() if thoughts else None)
            fin = torch.isfinite(ref)
            torch.testing.assert_close(logp[j][fin].double(), ref[fin], rtol=0, atol=1e-8)


def test_csqa_exact_is_the_best_letter_and_gsm8k_exact_parses_greedy_answer():
    model, tok = make_model("llama", dtype=torch.float32)
    cfg = ThoughtConfig(thought_len=2, temperature=1e-3)
    st = EvalSettings(max_answer_tokens=6)
    items = [csqa_item(0, CSQA_ROW, "x")]
    toks = answer_tokens(tok, "csqa", len(tok))
    row = eval_batch(model, cfg, tok, "csqa", items, toks, False, st, DEVICE)[0]
    logp, a, _, _ = answer_logprobs(model, cfg, tok, items, False, None, DEVICE)[0]
    j = next(k for k, t in enumerate(a) if t in toks.choices)
    best = max(toks.choices, key=lambda i: float(logp[j, i]))
    assert row["pred"] == toks.choices[best] and row["correct"] == (row["pred"] == "C")
    items = [gsm8k_item(0, GSM_ROW, "x")]
    toks = answer_tokens(tok, "gsm8k", len(tok))
    row = eval_batch(model, cfg, tok, "gsm8k", items, toks, True, st, DEVICE)[0]
    assert row["pred"] == first_number(row["output"].split("\n")[0]) and 0 <= row["soft"] <= 1


def test_think_threshold_in_evaluation():
    model, tok = make_model("llama", dtype=torch.float32)
    cfg = ThoughtConfig(thought_len=2, temperature=1e-3)
    items = [gsm8k_item(0, GSM_ROW, "x"), gsm8k_item(1, dict(GSM_ROW, question="Short?"), "y")]
    toks = answer_tokens(tok, "gsm8k", len(tok))

    def rows(thoughts, thr=None):
        return eval_batch(model, cfg, tok, "gsm8k", items, toks, thoughts, EvalSettings(max_answer_tokens=4,
                          think_threshold=thr), DEVICE)

    off, on, never, always = rows(False), rows(True), rows(True, 1e9), rows(True, 0.0)
    assert all(r["thought"][0] == 0 for r in off + never) and all(r["thought"][0] == r["thought"][1] for r in on)
    assert [(r["pred"], r["soft"]) for r in never] == [(r["pred"], r["soft"]) for r in off]
    assert [(r["pred"], r["soft"]) for r in always] == [(r["pred"], r["soft"]) for r in on]
    assert [r["soft"] for r in on] != [r["soft"] for r in off]


def test_cot_majority_of_k_samples():
    model, tok = make_model("llama", dtype=torch.float32)
    cfg = ThoughtConfig(thought_len=2)
    st = EvalSettings(cot_samples=3, cot_max_tokens=6, max_answer_tokens=4)
    items = [gsm8k_item(0, GSM_ROW, "x"), gsm8k_item(1, GSM_ROW, "y")]
    rows = eval_batch(model, cfg, tok, "gsm8k_cot", items, answer_tokens(tok, "gsm8k", len(tok)), True, st, DEVICE)
    for r in rows:
        assert len(r["samples"]) == 3 and r["pred"] == majority(r["samples"])
        assert r["soft"] == sum(p == r["gold"] for p in r["samples"]) / 3


def _evaluate(args, nproc=1, timeout=600):
    if nproc == 1:
        cmd = [sys.executable, "-m", "qstar_ds.evaluate"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "qstar_ds.evaluate"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A QuietStarModel directory with a random mixing head (so thoughts change the scores)."""
    model, tok = make_model("llama", dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("qsm") / "model")
    model.cpu().save_pretrained(path, tokenizer=tok, extra={"thought_len": 3})
    return path


def test_evaluate_cli_one_and_two_ranks_agree(saved_model, tmp_path):
    gsm, csqa = shared_file("gsm8k/test_tiny.jsonl"), shared_file("commonsenseqa/dev_tiny.jsonl")
    text = tmp_path / "nll.jsonl"
    text.write_text("".join(json.dumps({"text": "the quick brown fox %d jumps over %d lazy dogs. " % (i, i * 7) * 3})
                            + "\n" for i in range(8)))
    common = ["--model", saved_model, "--tasks", "csqa,gsm8k,gsm8k_cot,nll", "--data", f"gsm8k={gsm}",
              "--data", f"csqa={csqa}", "--limit", "5", "--batch_size", "1", "--cot_samples", "2",
              "--cot_max_tokens", "4", "--max_answer_tokens", "4", "--thoughts", "both",
              "--data", f"nll={text}", "--nll_seq_len", "16", "--nll_sequences", "5", "--nll_shuffled_thoughts"]
    one = _evaluate(common + ["--output", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-2000:]
    assert "soft" in one.stdout and "95% CI" in one.stdout and "on/3" in one.stdout
    two = _evaluate(common + ["--output", str(tmp_path / "two.json")], nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert b["world_size"] == 2 and len(a["results"]) == 6
    for key, rows in a["items"].items():
        other = b["items"][key]
        assert [r["index"] for r in rows] == [r["index"] for r in other] == list(range(5))
        for r, s in zip(rows, other):
            assert r["pred"] == s["pred"] and math.isclose(r["soft"], s["soft"], rel_tol=1e-4, abs_tol=1e-9)
    res = {(r["task"], r["thoughts"]): r for r in a["results"]}
    assert all(r["n"] == 5 for r in res.values())
    # the random mixing head makes thoughts matter
    assert res[("csqa", True)]["soft"] != res[("csqa", False)]["soft"]
    # nll with shuffled thoughts: sequence d gets sequence d-1's thoughts whatever the rank count
    # (near-greedy evaluation thoughts: the same thoughts on one rank and on two)
    n1, n2 = a["nll"], b["nll"]
    assert n1["sequences"] == n2["sequences"] == 5
    for key in ("nll_base", "nll_mixed", "gain"):
        assert math.isclose(n1[key], n2[key], rel_tol=1e-4, abs_tol=1e-7), key
    for key in ("sequence_nll_base", "sequence_nll_thoughts", "sequence_nll_thoughts_rest"):   # in file order
        assert len(n1[key]) == len(n2[key]) == 5 and n1[key] == pytest.approx(n2[key], rel=1e-4, abs=1e-7), key
    for key in ("content_gain_sequences",):
        assert n1["shuffled"][key] == pytest.approx(n2["shuffled"][key], rel=1e-3, abs=1e-6), key
    for key in ("content_gain", "content_gain_rest", "nll_mixed_other"):
        assert math.isclose(n1["shuffled"][key], n2["shuffled"][key], rel_tol=1e-3, abs_tol=1e-6), key
    assert n1["shuffled"]["content_gain"] != 0
    assert "another sequence's" in one.stdout


def test_nll_scores_feed_the_thoughts_given(saved_model):
    """nll_scores with `thoughts`: feeding the thoughts it sampled reproduces its scores exactly,
    feeding another sequence's changes the mixed prediction only (the base one is the same), and
    heldout.content_effect is their paired difference."""
    from qstar_ds.evaluate import nll_scores
    from qstar_ds.heldout import content_effect
    from qstar_ds.loading import load_model
    loaded = load_model(saved_model)
    cfg = ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=2, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0
    own = nll_scores(loaded.model, cfg, ids, mask, 3, seed=5)
    assert own["thoughts"].shape == (4, own["base"].shape[1], 3)
    again = nll_scores(loaded.model, cfg, ids, mask, 2, seed=99, thoughts=own["thoughts"])
    for k in ("base", "mixed", "mixed_win", "w"):
        torch.testing.assert_close(again[k], own[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(again["thoughts"], own["thoughts"])
    swapped = own["thoughts"].roll(1, dims=0)
    other = nll_scores(loaded.model, cfg, ids, mask, 3, seed=5, thoughts=swapped)
    assert torch.equal(other["thoughts"], swapped) and torch.equal(other["base"], own["base"])
    assert not torch.allclose(other["mixed"], own["mixed"])
    c = content_effect(own, other)
    v = own["valid"].bool()
    want = sum(float((own["mixed"] - other["mixed"])[d][v[d]].mean()) for d in range(4)) / 4
    assert c["content_gain"] == pytest.approx(want, rel=1e-9)
    rest = v & (v.cumsum(1) > 1)
    want = sum(float((own["mixed"] - other["mixed"])[d][rest[d]].mean()) for d in range(4)) / 4
    assert c["content_gain_rest"] == pytest.approx(want, rel=1e-9)
    assert content_effect(own, again)["content_gain"] == pytest.approx(0, abs=1e-6)


def test_nll_with_k_thoughts_scores_the_average_of_the_k_mixed_predictions(saved_model):
    """--nll_thought_samples 2: each position's mixed next-token probability is the mean of the
    two draws' (draw j sampled with seed + j * DRAW_SEED_STRIDE), by hand token by token; the
    shuffled check averages the two draws' swapped thoughts the same way; one draw is the plain
    evaluation."""
    from types import SimpleNamespace

    from qstar_ds.evaluate import DRAW_SEED_STRIDE, nll_scores, run_nll
    from qstar_ds.loading import load_model
    loaded = load_model(saved_model)
    cfg = ThoughtConfig(thought_len=3, n_thoughts=4, talk_len=2, temperature=1.0)
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0

    def args(k):
        return SimpleNamespace(nll_seq_len=12, nll_sequences=3, text_field="text", talk_len=2, batch_size=2, seed=7,
                               nll_shuffled_thoughts=True, nll_thought_samples=k)
    one_cfg = ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=2, temperature=1.0)
    draws = [nll_scores(loaded.model, one_cfg, ids, mask, 2, 7 + j * DRAW_SEED_STRIDE) for j in (0, 1)]
    assert not torch.equal(draws[0]["thoughts"], draws[1]["thoughts"])
    others = [nll_scores(loaded.model, one_cfg, ids, mask, 2, 0, thoughts=d["thoughts"].roll(1, dims=0)) for d in draws]
    valid = draws[0]["valid"].bool()

    def by_hand(pair):
        out = []
        for d in range(3):
            vals = [math.log((math.exp(float(pair[0]["mixed"][d, p])) + math.exp(float(pair[1]["mixed"][d, p]))) / 2)
                    for p in range(valid.shape[1]) if valid[d, p]]
            out.append(-sum(vals) / len(vals))
        return out
    got = run_nll(loaded.model, loaded.tokenizer, cfg, "x", args(2), None, 0, 1, (ids, mask))
    assert got["thought_samples"] == 2
    assert got["sequence_nll_thoughts"] == pytest.approx(by_hand(draws), rel=1e-6)
    single = run_nll(loaded.model, loaded.tokenizer, cfg, "x", args(1), None, 0, 1, (ids, mask))
    want = [-float(draws[0]["mixed"][d][valid[d]].mean()) for d in range(3)]
    assert single["sequence_nll_thoughts"] == pytest.approx(want, rel=1e-6)
    other_nll = sum(by_hand(others)) / 3
    assert got["shuffled"]["nll_mixed_other"] == pytest.approx(other_nll, rel=1e-6)
    assert got["sequence_nll_base"] == single["sequence_nll_base"]
    # a mixture of the draws never scores worse than the mean of the draws' log-probs
    mean_draw = [-float((draws[0]["mixed"] + draws[1]["mixed"])[d][valid[d]].mean()) / 2 for d in range(3)]
    assert all(a <= b + 1e-9 for a, b in zip(got["sequence_nll_thoughts"], mean_draw))


def test_nll_read_mix_scores_the_post_thought_state_mixed_with_the_base_distribution(saved_model):
    """--nll_read_mix: per sequence, the NLL of (1 - w) p_base + w p_read, p_read the log-prob
    the post-thought state alone gives the next token (equal to the learn pass's read log-prob
    for the same thoughts); asking for it changes no other number; with another sequence's
    thoughts, the paired content effect."""
    from types import SimpleNamespace

    from qstar_ds.evaluate import nll_scores, run_nll
    from qstar_ds.learn import learn_pass
    from qstar_ds.loading import load_model
    loaded = load_model(saved_model)
    cfg = ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=2, temperature=1.0)
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    plain = nll_scores(loaded.model, cfg, ids, mask, 2, 7)
    s = nll_scores(loaded.model, cfg, ids, mask, 2, 7, read=True)
    for k in ("base", "mixed", "w"):
        torch.testing.assert_close(s[k], plain[k], rtol=0, atol=0)
    with torch.no_grad():   # the read log-prob of the same thoughts, from the learn pass
        from qstar_ds.rollout import default_positions
        anchor = default_positions(12, 2)[None].expand(3, -1)
        out = learn_pass(loaded.model, ThoughtConfig(**{**vars(cfg), "w_read": 1.0}), ids, mask, anchor, s["thoughts"])
    v = s["valid"].bool()
    torch.testing.assert_close(s["read"][v], out.read_logp[..., 0][v].double(), rtol=0, atol=1e-6)
    args = SimpleNamespace(nll_seq_len=12, nll_sequences=3, text_field="text", talk_len=2, batch_size=2, seed=7,
                           nll_shuffled_thoughts=True, nll_thought_samples=1, nll_read_mix=[0.1, 1.0])
    got = run_nll(loaded.model, loaded.tokenizer, cfg, "x", args, None, 0, 1, (ids, mask))
    rm = got["read_mix"]
    for w in (0.1, 1.0):
        want = [-sum(math.log((1 - w) * math.exp(float(s["base"][d, p])) + w * math.exp(float(s["read"][d, p])))
                     for p in range(v.shape[1]) if v[d, p]) / int(v[d].sum()) for d in range(3)]
        assert rm[f"{w:g}"]["sequence_nll"] == pytest.approx(want, rel=1e-9), w
        assert rm[f"{w:g}"]["nll"] == pytest.approx(sum(want) / 3, rel=1e-9)
        assert rm[f"{w:g}"]["content"] == pytest.approx(rm[f"{w:g}"]["nll_other"] - rm[f"{w:g}"]["nll"], abs=1e-9)
    assert rm["nll_read"] == pytest.approx(rm["1"]["nll"], rel=1e-12)
    assert got["sequence_nll_thoughts"] == pytest.approx(sequence_nll_of(plain), rel=1e-12)


def test_nll_focus_splits_the_scores_by_the_tokens_a_pattern_marks(saved_model):
    """--nll_focus: the per-sequence NLL on the tokens the pattern marks equals the mean of
    nll_scores' mixed log-probs at the positions whose next token is marked (by hand from the
    decoded tokens), the content effect there is the shuffled check's restricted to them, and
    asking for it changes no other number."""
    from types import SimpleNamespace

    from qstar_ds.data import arith_document
    from qstar_ds.evaluate import nll_scores, run_nll
    from qstar_ds.loading import load_model
    loaded = load_model(saved_model)
    tok = loaded.tokenizer
    flat = tok(" ".join(arith_document(3, i) for i in range(3)))["input_ids"][:3 * 20]
    ids = torch.tensor(flat).view(3, 20)
    mask = torch.ones_like(ids)
    cfg = ThoughtConfig(thought_len=3, n_thoughts=1, talk_len=2, temperature=1.0)

    def args(focus):
        return SimpleNamespace(nll_seq_len=20, nll_sequences=3, text_field="text", talk_len=2, batch_size=2, seed=7,
                               nll_shuffled_thoughts=True, nll_thought_samples=1, nll_focus=focus)
    got = run_nll(loaded.model, tok, cfg, "x", args(r"\d"), None, 0, 1, (ids, mask))
    plain = run_nll(loaded.model, tok, cfg, "x", args(None), None, 0, 1, (ids, mask))
    assert "focus" not in plain and got["sequence_nll_thoughts"] == plain["sequence_nll_thoughts"]
    s = nll_scores(loaded.model, cfg, ids, mask, 2, 7)
    v = s["valid"].bool()
    want = []
    for d in range(3):
        digit = [any(c.isdigit() for c in tok.decode([t])) for t in ids[d].tolist()]    # byte-level: one token's text
        vals = [-float(s["mixed"][d, p]) for p in range(v.shape[1]) if v[d, p] and digit[int(s["anchor"][d, p]) + 1]]
        want.append(sum(vals) / len(vals))
    f = got["focus"]
    assert f["pattern"] == r"\d" and 0 < f["tokens"] < got["tokens"] and f["tokens"] + f["tokens_outside"] == got["tokens"]
    assert f["sequence_nll_thoughts"] == pytest.approx(want, rel=1e-9)
    assert "content_gain" in f and f["content_gain"] != 0


def sequence_nll_of(s):
    v = s["valid"].bool()
    return [-float(s["mixed"][d][v[d]].mean()) for d in range(s["mixed"].shape[0])]


def test_evaluate_cli_errors(tmp_path):
    for args, want in [(["--tasks", "mmlu"], "unknown task 'mmlu'"),
                       (["--data", f"gsm8k={tmp_path}/none.jsonl", "--tasks", "gsm8k"], "none.jsonl not found"),
                       (["--data", "gsm8k", "--tasks", "gsm8k"], "TASK=FILE"),
                       (["--limit", "0"], "--limit=0"),
                       (["--tasks", "nll", "--nll_thought_samples", "0"], "--nll_thought_samples=0"),
                       (["--tasks", "nll", "--nll_read_mix", "0.1,0"], "--nll_read_mix: w = 0 must be in (0, 1]"),
                       (["--tasks", "nll", "--nll_read_mix", "a"], "--nll_read_mix='a': expected"),
                       (["--tasks", "nll", "--nll_focus", "(1"], "--nll_focus='(1': not a usable regular expression"),
                       (["--model", "/no/such/dir"], "/no/such/dir")]:
        res = _evaluate(["--model", "tiny-llama"] + args)
        assert res.returncode == 2 and want in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_shuffled_thoughts_need_sampled_thoughts_and_two_sequences(tmp_path, capsys):
    """One line, no traceback: a model trained with filler thoughts has no content to shuffle; one
    sequence has no other to take thoughts from."""
    from qstar_ds.evaluate import main
    model, tok = make_model("llama", dtype=torch.float32)
    filler = str(tmp_path / "filler_model")
    model.cpu().save_pretrained(filler, tokenizer=tok, extra={"thought_len": 3, "filler_id": 5})
    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven eight nine ten " * 4)
    common = ["--tasks", "nll", "--data", f"nll={text}", "--nll_seq_len", "8", "--talk_len", "2",
              "--nll_shuffled_thoughts", "--output", str(tmp_path / "r.json")]
    assert main(["--model", filler] + common) == 2
    assert "trained with filler thoughts" in capsys.readouterr().err
    assert main(["--model", "tiny-llama", "--nll_sequences", "1"] + common) == 2
    assert "needs >= 2 sequences" in capsys.readouterr().err
