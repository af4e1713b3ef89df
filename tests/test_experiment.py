"""tools/experiment.py (three arms x seeds from one command, resumable), tools/compare_nll.py and
the run report (qstar_ds/report.py), on the tiny debug preset."""
import json
import os
import subprocess
import sys

import pytest

from conftest import shared_file
from helpers import ROOT

TOOL = os.path.join(ROOT, "tools", "experiment.py")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable] + args, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res


def test_experiment_runs_three_arms_resumes_and_reports(tmp_path):
    out = tmp_path / "exp"
    data_dir = os.path.dirname(os.path.dirname(shared_file("commonsenseqa/dev_tiny.jsonl")))
    common = ["--out", str(out), "--preset", "debug_cpu", "--steps", "4", "--save_every", "2",
              "--slices", "2", "--task_data_dir", data_dir]
    # an interrupted arm: its run stopped at step 2 (what a kill after the step-2 checkpoint leaves)
    partial = run([os.path.join(ROOT, "qstar_ds", "train.py"), "--preset", "debug_cpu", "--output_dir",
                   str(out / "filler_s0"), "--max_steps", "2", "--thought.mode", "filler", "--train.seed", "0",
                   "--data.seed", "0", "--train.save_every", "2"])
    assert "finished at step 2" in partial.stdout
    first = run([TOOL, *common, "--seeds", "0", "--arms", "off"])
    assert "off seed 0: done earlier" not in first.stdout
    res = run([TOOL, *common, "--seeds", "0,1"])
    assert "off seed 0: done earlier" in res.stdout                      # finished arms are skipped
    log = (out / "filler_s0" / "experiment_run.log").read_text()
    assert "resumed from" in log and "(step 2)" in log                   # the interrupted one resumes
    for arm in ("quiet_star", "filler", "off"):
        for seed in (0, 1):
            assert (out / f"{arm}_s{seed}" / "eval" / "step_00000004.json").exists()
    lines = res.stdout
    rows = [ln for ln in lines.splitlines() if ln.startswith(("quiet_star ", "filler ", "off ")) and ln.split()[1].isdigit()]
    assert len(rows) == 6 and all("gsm8k " in ln and "csqa " in ln for ln in rows), rows   # the slices
    assert "quiet_star (with thoughts) - filler (best)" in lines and "quiet_star (with thoughts) - off (best)" in lines
    assert "over 12 (seed, sequence) pairs" in lines                     # 6 held-out sequences x 2 seeds
    assert "quiet_star (with thoughts) - filler (best), without each sequence's first scored token" in lines
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final"]) == {f"{a}_s{s}" for a in ("quiet_star", "filler", "off") for s in (0, 1)}
    # arms of one seed are scored on the same held-out sequences; the plain model has no gain
    assert summary["final"]["off_s0"]["gain"] == 0.0
    assert set(summary["compare_rest"]) == {"filler", "off"} and summary["compare_rest"]["off"]["n"] == 12
    assert summary["compare_rest"]["off"]["pooled"] != summary["compare"]["off"]["pooled"]
    assert summary["final"]["off_s0"]["nll_base"] != summary["final"]["off_s1"]["nll_base"]
    # the base models (no thoughts), paired by held-out sequence: what training with thoughts did to them
    assert "quiet_star without thoughts - filler without thoughts: " in lines
    for seed in (0, 1):
        q, f = (json.loads((out / f"{a}_s{seed}" / "eval" / "step_00000004.json").read_text())["sequence_nll_base"]
                for a in ("quiet_star", "filler"))
        assert abs(sum(a - b for a, b in zip(q, f)) / len(q) - summary["compare_base"]["filler"]["per_seed"][str(seed)][0]) < 1e-12
    assert summary["compare_base"]["off"]["n"] == 12
    assert (out / "experiment.png").stat().st_size > 10_000
    # the content check: each quiet_star checkpoint on its own held-out sequences (the same base
    # NLL as the trainer's last evaluation), with its own thoughts and with another sequence's
    assert "quiet_star with its own thoughts vs another held-out sequence's" in lines
    for seed in (0, 1):
        check = json.loads((out / f"quiet_star_s{seed}" / "content.json").read_text())["nll"]
        assert abs(check["nll_base"] - summary["final"][f"quiet_star_s{seed}"]["nll_base"]) < 1e-5
        assert len(check["shuffled"]["content_gain_sequences"]) == 6
    assert summary["content"]["n"] == 12
    # again: nothing left to run
    again = run([TOOL, *common, "--seeds", "0,1"])
    assert again.stdout.count("done earlier") == 6 and "content check, quiet_star" not in again.stdout
    # quiet_star rescored at another temperature, paired with the controls sequence by sequence
    hot = run([TOOL, *common, "--seeds", "0,1", "--rescore_temperature", "1"]).stdout
    assert hot.count("done earlier") == 6 and hot.count("content check, quiet_star") == 2
    assert "rescored with thoughts sampled at temperature 1" in hot
    assert "quiet_star (with thoughts, T 1) - filler (best): " in hot and "over 12 (seed, sequence) pairs" in hot
    rs = json.loads((out / "summary.json").read_text())["rescore"]
    assert rs["temperature"] == 1 and rs["compare"]["off"]["n"] == rs["content"]["n"] == 12
    for seed in (0, 1):
        check = json.loads((out / f"quiet_star_s{seed}" / "content_T1.json").read_text())["nll"]
        ev = json.loads((out / f"quiet_star_s{seed}" / "eval" / "step_00000004.json").read_text())
        assert check["temperature"] == 1
        assert all(abs(a - b) < 1e-5 for a, b in zip(check["sequence_nll_base"], ev["sequence_nll_base"]))
        off = json.loads((out / f"off_s{seed}" / "eval" / "step_00000004.json").read_text())
        d = [q - o for q, o in zip(check["sequence_nll_thoughts"], off["sequence_nll_thoughts"])]
        assert abs(sum(d) / len(d) - rs["compare"]["off"]["per_seed"][str(seed)][0]) < 1e-9
    # and with two thoughts per position, their mixed predictions averaged
    two = run([TOOL, *common, "--seeds", "0", "--arms", "quiet_star,off", "--rescore_temperature", "1",
               "--rescore_samples", "2"]).stdout
    assert "temperature 1, 2 per position, mixed predictions averaged" in two and "(with thoughts, T 1, 2 averaged)" in two
    check = json.loads((out / "quiet_star_s0" / "content_T1_k2.json").read_text())["nll"]
    assert check["thought_samples"] == 2 and len(check["sequence_nll_thoughts"]) == 6
    # every arm scored again with the held-out tokens split by a pattern (digits), compared there, paired
    foc = run([TOOL, *common, "--seeds", "0,1", "--focus", r"\d"]).stdout
    assert foc.count("done earlier") == 6 and foc.count("scoring on '\\\\d'") == 6, foc[-3000:]
    assert "quiet_star - filler, with thoughts (off: plain), on them: " in foc
    assert "quiet_star, own thoughts against another sequence's, on them: " in foc
    fs = json.loads((out / "summary.json").read_text())["focus"]
    assert fs["pattern"] == r"\d" and set(fs["runs"]) == {f"{a}_s{s}" for a in ("quiet_star", "filler", "off") for s in (0, 1)}
    assert fs["runs"]["off_s0"]["gain"] == 0.0 and fs["runs"]["quiet_star_s0"]["tokens"] > 0
    pooled = []
    for seed in (0, 1):
        q, f = (json.loads(next((out / f"{a}_s{seed}").glob("focus_*.json")).read_text())["nll"]["focus"]
                for a in ("quiet_star", "filler"))
        d = [a - b for a, b in zip(q["sequence_nll_thoughts"], f["sequence_nll_thoughts"]) if a is not None and b is not None]
        assert fs["compare"]["filler"]["per_seed"][str(seed)][0] == pytest.approx(sum(d) / len(d), abs=1e-12)
        pooled += d
    assert fs["compare"]["filler"]["n"] == len(pooled) and fs["compare"]["filler"]["pooled"][0] == pytest.approx(
        sum(pooled) / len(pooled), abs=1e-12)
    assert set(fs["compare_base"]) == {"filler", "off"} and fs["content"]["n"] > 0
    again = run([TOOL, *common, "--seeds", "0,1", "--focus", r"\d"]).stdout
    assert "scoring on" not in again and "on them: " in again                # done once


def test_report_regenerates_from_a_run(tmp_path):
    data_dir = os.path.dirname(os.path.dirname(shared_file("commonsenseqa/dev_tiny.jsonl")))
    out = tmp_path / "run"
    res = run([os.path.join(ROOT, "qstar_ds", "train.py"), "--preset", "debug_cpu", "--output_dir", str(out),
               "--max_steps", "4", "--train.eval_every", "2", "--eval.gsm8k", "2", "--eval.csqa", "3",
               "--eval.task_data_dir", data_dir])
    assert "eval step 2: held-out NLL" in res.stdout and "eval step 4: held-out NLL" in res.stdout
    tail = res.stdout.strip().splitlines()
    assert any(ln.startswith("qstar_ds: result (quiet_star, 4 steps): held-out NLL") and "95% CI" in ln
               and "hardest 10%" in ln for ln in tail)
    assert any(f"report {out}/report.html; thought viewer {out}/thoughts.html" in ln for ln in tail)
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "eval/gain" in rows[1] and "eval/gain" not in rows[2] and "eval/gain_by_decile_9" in rows[3]
    # the GSM8K/CSQA slices are scored at the end only (eval.tasks_every_eval=false), with and without thoughts
    assert "eval/csqa_soft_base" not in rows[1]
    for key in ("eval/gsm8k_soft_base", "eval/gsm8k_soft_thoughts", "eval/csqa_soft_base", "eval/csqa_soft_thoughts"):
        assert 0 < rows[3][key] < 1, key
    os.remove(out / "report.html")
    run(["-m", "qstar_ds.report", str(out)])
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3                    # training, held-out, deciles
    for text in ("Held-out text", "Where thinking helped most", "href='thoughts.html'", "Last evaluation (step 4",
                 "csqa soft score:"):
        assert text in page, text
    assert (out / "thoughts.html").read_text().count('"thoughts"') > 0
    bad = subprocess.run([sys.executable, "-m", "qstar_ds.report", str(tmp_path / "nothing")], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("metrics.jsonl not found (not a run's output_dir?)")


def test_compare_nll_pairs_sequences_and_pools(tmp_path):
    """tools/compare_nll.py: A - B per sequence, per pair and pooled, by hand; the trainer's and
    evaluate's JSON layouts and a /-separated key; one line for a bad file, key or length."""
    import math
    a = {"sequence_nll_thoughts": [3.0, 2.5, 4.0]}                                # the trainer's layout
    b = {"nll": {"sequence_nll_thoughts": [3.1, 2.4, 4.3], "read_mix": {"0.1": {"sequence_nll": [1.0, 2.0, 3.0]}}}}
    c = {"nll": {"sequence_nll_thoughts": [1.0, 1.0]}}
    for name, d in (("a", a), ("b", b), ("c", c)):
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    A, B, C = (str(tmp_path / f"{n}.json") for n in "abc")
    res = run([os.path.join(ROOT, "tools", "compare_nll.py"), A, B, B + ":nll/read_mix/0.1/sequence_nll", A,
               "--json", str(tmp_path / "out.json")])
    got = json.loads((tmp_path / "out.json").read_text())
    d = [-0.1, 0.1, -0.3, -2.0, -0.5, -1.0]
    m = sum(d) / 6
    h = 1.96 * math.sqrt(sum((x - m) ** 2 for x in d) / 5) / math.sqrt(6)
    assert got["n"] == 6 and got["pooled"][0] == pytest.approx(m) and got["pooled"][2] == pytest.approx(m + h)
    assert got["pairs"][0]["diff"][0] == pytest.approx(-0.1)
    assert "pooled: " in res.stdout and "A better" in res.stdout
    for args, want in (([A, C], "has 3 sequences"), ([A, B + ":nll/nope"], "no key 'nll/nope'"),
                       ([A], "expected pairs"), ([A, str(tmp_path / "none.json")], "none.json: file not found")):
        bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compare_nll.py"), *args],
                             capture_output=True, text=True, cwd=ROOT)
        assert bad.returncode == 2 and want in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)


def test_content_check_refuses_scores_of_other_held_out_sequences(tmp_path):
    """A rescoring file whose base NLLs are not the run's (other sequences, e.g. a file left from
    another run) stops the tool with one line; a rounding-level difference does not."""
    import importlib.util
    import types
    spec = importlib.util.spec_from_file_location("experiment_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "quiet_star_s0").mkdir()
    args = types.SimpleNamespace(out=str(tmp_path), steps=4)
    ev = {"summary": {"temperature": 1.0, "talk_len": 2, "sequences": 3}, "sequence_nll_base": [3.0, 2.0, 4.0]}
    path = tmp_path / "quiet_star_s0" / "content_T1.json"
    path.write_text(json.dumps({"nll": {"sequence_nll_base": [3.001, 2.0, 3.999]}}))
    assert tool.content_check(args, 0, ev, 1.0)["sequence_nll_base"][0] == 3.001
    path.write_text(json.dumps({"nll": {"sequence_nll_base": [2.0, 4.0, 3.0]}}))
    with pytest.raises(SystemExit, match="not the ones the run's final evaluation scored"):
        tool.content_check(args, 0, ev, 1.0)


def test_experiment_refuses_bad_arguments_in_one_line(tmp_path):
    """Bad arms, seeds, temperatures or focus patterns: exit 2 and one line naming the value, before any run."""
    for args, want in ((["--arms", "quiet_star,pause"], "'pause'"), (["--seeds", "0,x"], "--seeds='0,x'"),
                       (["--rescore_temperature", "0"], "--rescore_temperature=0.0"),
                       (["--focus", "(1"], "--focus='(1' (not a regular expression")):
        bad = subprocess.run([sys.executable, TOOL, "--out", str(tmp_path / "exp"), "--steps", "2", *args],
                             capture_output=True, text=True, cwd=ROOT, env=ENV)
        assert bad.returncode == 2 and want in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "exp").exists()
