"""tools/written_step_probe.py: the prefixes it writes, and its NLLs against plain forwards of the
HF model on each text alone (no padding, no batching)."""
import json
import os
import re
import subprocess
import sys

import torch

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
from written_step_probe import CASES, digits, items, score, summarize  # noqa: E402

from qstar_ds.loading import load_model  # noqa: E402

PROBE = os.path.join(ROOT, "tools", "written_step_probe.py")


def test_prefixes_say_what_the_docstring_says():
    data = items(40, seed=3)
    assert data == items(40, seed=3) and data != items(40, seed=4)
    for p, target in data:
        a, b = map(int, re.findall(r"Compute (\d+) \+ (\d+)\. We have", p["direct"])[-1])
        s, u, v = a + b, a % 10, b % 10
        assert 10 <= a <= 99 and 10 <= b <= 99 and u + v >= 10 and target == f" {s}."
        stem = p["direct"][:-len(f" {a} + {b} =")]
        assert stem.endswith(f"Compute {a} + {b}. We have") and len(stem) > len("Compute 10 + 10. We have")
        assert all(p[c].startswith(stem) and p[c].endswith(f" {a} + {b} =") for c in CASES)
        assert p["units_step"] == f"{stem} {u} + {v} = {u + v}, carry 1, so {a} + {b} ="
        wrong = int(re.search(rf"We have {u} \+ {v} = (\d+),", p["wrong_step"]).group(1))
        assert 1 <= abs(wrong - (u + v)) <= 3
        x, y, z = map(int, re.search(r"We have (\d) \+ (\d) = (\d+), so", p["other_step"]).groups())
        assert 1 <= x <= 4 and 1 <= y <= 4 and z == x + y
        assert p["answer_step"] == f"{stem} {a} + {b} = {s}, so {a} + {b} ="


def test_scores_equal_plain_forwards_and_the_summary_counts_digits_only():
    loaded = load_model("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    data = items(5, seed=0)
    texts = [(p[c], t) for p, t in data for c in ("direct", "answer_step")]
    got = score(model, tok, texts, "dense", batch=3)      # batches of mixed lengths: padding is exercised
    for (prefix, target), r in zip(texts, got):
        p = tok(prefix)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model.base(torch.tensor([p + t])).logits[0].double()
        logits[:, [model.sot_id, model.eot_id]] = float("-inf")
        lp = logits.log_softmax(-1)
        want = [-float(lp[len(p) - 1 + k, tok_id]) for k, tok_id in enumerate(t)]
        assert torch.allclose(torch.tensor(r["nll"]), torch.tensor(want, dtype=torch.float32), atol=1e-4), (r["nll"], want)
        assert r["argmax"] == [int(lp[len(p) - 1 + k].argmax()) == tok_id for k, tok_id in enumerate(t)]

    # the summary: digits only (not the space before them, not the "."), and "exact" = all digits argmax
    assert [tok.decode([i]) for i in tok(" 85.", add_special_tokens=False)["input_ids"]][digits(tok, " 85.")] == ["8", "5"]
    two = [({c: "" for c in CASES}, " 85."), ({c: "" for c in CASES}, " 85.")]
    fake = {c: [{"nll": [9.0, 1.0, 2.0, 9.0], "argmax": [False, True, True, False]},
                {"nll": [9.0, 1.0, 2.0 + i, 9.0], "argmax": [True, True, i == 0, False]}]
            for i, c in enumerate(CASES)}
    res = summarize(tok, two, fake)
    assert res["direct"]["per_item"] == [3.0, 3.0] and res["direct"]["exact"] == 1.0
    assert res["units_step"]["per_item"] == [3.0, 4.0] and res["units_step"]["exact"] == 0.5
    assert abs(res["units_step"]["minus_direct"] - 0.5) < 1e-12
    assert abs(res["answer_step"]["minus_other"] - 0.5) < 1e-12 and res["other_step"]["minus_other"] == 0.0
    assert abs(res["wrong_minus_units"]["mean"] - 0.5) < 1e-12


def test_cli_writes_json_and_refuses_bad_arguments(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, PROBE, "--model", "tiny-llama", "--n", "4", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert set(CASES) <= set(d) and len(d["direct"]["per_item"]) == 4 and d["direct"]["minus_direct"] == 0.0
    for bad, word in ((["--n", "1"], "--n=1"), (["--out", str(tmp_path / "no" / "p.json")], "--out=")):
        r = subprocess.run([sys.executable, PROBE, "--model", "tiny-llama", *bad], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, r.stderr
