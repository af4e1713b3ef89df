"""tools/thought_init_probe.py: the thoughts it feeds and the NLLs it reports, against plain
forwards of the HF model on the laid-out token sequences."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
from thought_init_probe import compare, probe, set_markers  # noqa: E402

from qstar_ds.config import ConfigError, ThoughtConfig  # noqa: E402
from qstar_ds.loading import load_model  # noqa: E402


def plain_logp(model, seq: list[int], target: int, last_pos: int | None = None) -> float:
    """log p(target | seq) from one ordinary causal forward (markers' learned vectors on input,
    their logits masked, as everywhere in the model); `last_pos`: the last token's position id
    (default: its index)."""
    ids = torch.tensor([seq])
    pos = list(range(len(seq) - 1)) + [len(seq) - 1 if last_pos is None else last_pos]
    logits = model.base(inputs_embeds=model.embed(ids), position_ids=torch.tensor([pos])).logits[0, -1].double()
    logits[[model.sot_id, model.eot_id]] = float("-inf")
    return float(logits.log_softmax(-1)[target])


@pytest.mark.parametrize("talk_positions", ["after_thought", "resume"])
def test_probe_feeds_true_and_other_thoughts_and_scores_like_plain_forwards(talk_positions):
    loaded = load_model("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    first = set_markers(model, tok, " \u2014")
    assert torch.equal(model.thought_embeds[0], model.base.get_input_embeddings().weight[first])
    g = torch.Generator().manual_seed(0)
    D, n, t, K = 3, 12, 3, 2
    ids = torch.randint(5, len(tok) - 2, (D, n), generator=g)
    mask = torch.ones_like(ids)
    cfg = ThoughtConfig(n_thoughts=1, temperature=0.7, thought_len=t, talk_len=K, talk_positions=talk_positions)
    r = probe(model, tok, ids, mask, cfg, seed=0)
    th = r["thoughts"]
    P = n - K
    assert th["own"].shape == (D, P, t)
    assert torch.equal(th["other"], th["own"].roll(1, dims=0))
    eos = tok.eos_token_id
    for d in range(D):
        for p in range(P):
            want = ids[d, p + 1:p + 1 + t].tolist()
            assert th["true"][d, p].tolist() == want + [eos] * (t - len(want))
    # every reported NLL: the mean over windows of each window's mean over positions, from plain forwards
    expect = {"nll_base": [], "nll_reader_own": [], "nll_reader_other": [], "nll_reader_true": [],
              "policy_first": [], "policy_true": [], "hit_first": []}
    with torch.no_grad():
        for d in range(D):
            rows = {k: [] for k in expect}
            for p in range(P):
                prefix, target = ids[d, :p + 1].tolist(), int(ids[d, p + 1])
                rows["nll_base"].append(-plain_logp(model, prefix, target))
                # the policy thinking the true continuation, token by token (the window's tokens only)
                truth = ids[d, p + 1:p + 1 + t].tolist()
                for j, c in enumerate(truth):
                    nll = -plain_logp(model, prefix + [model.sot_id] + truth[:j], c)
                    rows["policy_true"].append(nll)
                    if j == 0:
                        rows["policy_first"].append(nll)
                rows["hit_first"].append(float(int(th["own"][d, p, 0]) == target))
                for k in ("own", "other", "true"):
                    seq = prefix + [model.sot_id] + th[k][d, p].tolist() + [model.eot_id]
                    eot_pos = p + 1 if talk_positions == "resume" else None    # resume: <eot> right after x_p
                    rows[f"nll_reader_{k}"].append(-plain_logp(model, seq, target, eot_pos))
            for k, v in rows.items():
                expect[k].append(sum(v) / len(v))
    for k, v in expect.items():
        assert abs(r[k] - sum(v) / D) < 1e-4, (k, r[k], sum(v) / D)
        assert len(r["per_window"][k]) == D                                     # kept for --compare
        assert max(abs(a - b) for a, b in zip(r["per_window"][k], v)) < 1e-4, k
    content = sum(expect["nll_reader_other"]) / D - sum(expect["nll_reader_own"]) / D
    assert abs(r["content"] - content) < 1e-4
    assert 0.0 <= r["newline"] <= 1.0


def test_cli_runs_on_a_local_corpus_and_refuses_an_empty_init(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Document {i}: the sum of {i} and {i + 1} is {2 * i + 1}, so we write it down."}) + "\n")
    base = [sys.executable, os.path.join(ROOT, "tools", "thought_init_probe.py"), "--model", "tiny-llama",
            "--data", str(corpus), "--windows", "3", "--seq_len", "16", "--thought_len", "3"]
    out = tmp_path / "probe.json"
    res = subprocess.run(base + ["--out", str(out), "--init", "---", "--init", " \u2014"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(out.read_text())["results"]
    assert [r["init"] for r in got] == ["---", " \u2014"] and all(r["windows"] == 3 for r in got)
    assert got[0]["nll_base"] == got[1]["nll_base"]          # the markers never touch the base prediction
    # the markers as loaded: an untrained model's are the default "---" ones
    res = subprocess.run(base + ["--out", str(out), "--keep_markers"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    kept = json.loads(out.read_text())["results"]
    assert len(kept) == 1 and kept[0]["init"] is None
    assert {k: kept[0][k] for k in ("nll_reader_own", "nll_reader_other", "nll_reader_true", "content")} == \
        {k: got[0][k] for k in ("nll_reader_own", "nll_reader_other", "nll_reader_true", "content")}
    # a marker file (model.thought_init_file) holding "---"'s embedding probes like --init ---
    from safetensors.torch import save_file
    tiny = load_model("tiny-llama")
    dash = tiny.tokenizer.encode("---", add_special_tokens=False)[0]
    markers = tmp_path / "dash.safetensors"
    save_file({"thought_embeds": tiny.model.base.get_input_embeddings().weight[dash].detach().expand(2, -1).contiguous()},
              str(markers))
    res = subprocess.run(base + ["--out", str(out), "--init_file", str(markers)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    from_file = json.loads(out.read_text())["results"]
    assert len(from_file) == 1 and from_file[0]["init"] == f"file:{markers}"
    assert from_file[0]["per_window"] == got[0]["per_window"]
    save_file({"thought_embeds": torch.zeros(2, 3)}, str(markers))
    res = subprocess.run(base + ["--out", str(out), "--init_file", str(markers)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "is (2, 3), this model needs" in res.stderr.strip().splitlines()[-1]
    res = subprocess.run(base + ["--out", str(out), "--init", ""], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "thought_init_probe: error: --init '': the tokenizer encodes it to no tokens"


def _probe_file(path, per_window: dict, **settings):
    base = {"data": "d.jsonl", "windows": 3, "seq_len": 16, "no_pack": False, "data_seed": 1, "thought_len": 3,
            "talk_len": 2}
    r = {"init": None, **{k: sum(v) / len(v) for k, v in per_window.items()}, "per_window": per_window}
    path.write_text(json.dumps({"settings": {**base, **settings}, "results": [r]}))
    return str(path)


def test_compare_pairs_windows_and_refuses_other_windows(tmp_path):
    a = _probe_file(tmp_path / "a.json", {"policy_first": [1.0, 2.0, 3.0], "hit_first": [0.0, 0.5, 0.5]})
    b = _probe_file(tmp_path / "b.json", {"policy_first": [2.0, 2.0, 5.0], "hit_first": [0.0, 0.5, 0.5]})
    lines = compare(a, b)
    # differences 1, 0, 2: mean 1, sd 1, 95% half-width 1.96 / sqrt(3) = 1.1316
    pf = [ln for ln in lines if ln.strip().startswith("policy_first")]
    assert pf == ["    policy_first       A 2.0000  B 3.0000  B - A +1.0000 [-0.1316, +2.1316]"]
    hit = [ln for ln in lines if ln.strip().startswith("hit_first")]
    assert hit[0].endswith("B - A +0.0000 [+0.0000, +0.0000]")
    c = _probe_file(tmp_path / "c.json", {"policy_first": [2.0, 2.0, 5.0]}, data_seed=0)
    with pytest.raises(ConfigError, match="data_seed differs"):
        compare(a, c)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"settings": json.loads(open(a).read())["settings"],
                               "results": [{"init": None, "policy_first": 2.0}]}))
    with pytest.raises(ConfigError, match="old.json: no per-window numbers"):
        compare(a, str(old))
    (tmp_path / "junk.json").write_text("not json")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "thought_init_probe.py"), "--compare", a,
                          str(tmp_path / "junk.json")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "junk.json: not a thought_init_probe output" in res.stderr.strip().splitlines()[-1]
