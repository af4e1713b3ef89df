"""tools/show_thoughts.py: the numbers it shows, and the page in a real headless browser."""
import html
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from qstar_ds.config import ThoughtConfig

from conftest import ci, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import show_thoughts  # noqa: E402

TEXT = "Let x = 3 and y = 4. Then x + y = 7 and x * y = 12. If 2a - 5 = 11 then a = 8."


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if ci():
        pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
    pytest.skip("no chromium on this machine (apt-get install chromium)")


def load_page(path: str) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console messages) of a local page in headless chromium."""
    res = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--enable-logging=stderr", "--v=0", "--dump-dom", "file://" + os.path.abspath(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    return res.stdout, console


def test_collect_gains_are_zero_at_init_and_consistent():
    model, tok = make_model("llama", dtype=torch.float64, randomize=False)
    cfg = ThoughtConfig(thought_len=2, n_thoughts=2, talk_len=3)
    d = show_thoughts.collect(model, tok, TEXT, cfg, 256, 5)
    n = len(tok.encode(TEXT))
    assert len(d["positions"]) == n and "".join(p["token"] for p in d["positions"]) == TEXT
    with_th = [p for p in d["positions"] if p["thoughts"]]
    assert len(with_th) == n - 3 and all(len(p["thoughts"]) == 2 for p in with_th)
    # zero mixing head: w = 0, so the mixed distribution is the base one: gain and reward 0
    assert all(abs(t["gain"]) < 1e-9 and t["w"] == 0 and abs(t["reward"]) < 1e-9 for p in with_th for t in p["thoughts"])
    model, tok = make_model("llama", dtype=torch.float64, randomize=True)
    d = show_thoughts.collect(model, tok, TEXT, cfg, 256, 5)
    ts = [t for p in d["positions"] for t in p["thoughts"]]
    assert max(abs(t["gain"]) for t in ts) > 1e-3 and all(t["w"] != 0 for t in ts)
    gains = [max(t["gain"] for t in d["positions"][i]["thoughts"]) for i in d["top"]]
    assert len(d["top"]) == 5 and gains == sorted(gains, reverse=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    model, tok = make_model("llama", dtype=torch.float32)
    root = tmp_path_factory.mktemp("viewer")
    mdir = str(root / "model")
    model.cpu().save_pretrained(mdir, tokenizer=tok, extra={"thought_len": 3})
    out = str(root / "thoughts.html")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "show_thoughts.py"), "--model", mdir,
                          "--text", TEXT + " </script><b>x</b>", "--output", out, "--top", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out, tok


def test_page_in_headless_browser_shows_tokens_and_thoughts(page):
    path, tok = page
    dom, console = load_page(path)
    assert console == [], console
    text = TEXT + " </script><b>x</b>"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    m = re.search(r'data-ready="(\d+)"', dom)
    assert m and int(m.group(1)) == len(pieces)
    spans = re.findall(r'<span class="tok[^"]*" data-i="(\d+)"[^>]*>(.*?)</span>', dom, flags=re.S)
    assert [int(i) for i, _ in spans] == list(range(len(pieces)))
    assert [html.unescape(s) for _, s in spans] == pieces          # markup in the text stays text
    thoughts = re.findall(r'<span class="thought">⟨(.*?)⟩</span>', dom, flags=re.S)
    assert len(thoughts) == len(pieces) - 4 and any(t.strip() for t in thoughts)
    rows = re.findall(r"<tr><td>\d+</td>", dom)
    assert len(rows) == 4
    assert "<b>x</b>" not in dom.split('id="data"')[0]          # never injected as HTML


def test_browser_check_catches_a_broken_page(page, tmp_path):
    path, _ = page
    broken = open(path).read().replace("paint();\n", "paint(;\n")
    bad = tmp_path / "broken.html"
    bad.write_text(broken)
    dom, console = load_page(str(bad))
    assert console and "data-ready" not in dom


def test_cli_errors(tmp_path):
    tool = os.path.join(ROOT, "tools", "show_thoughts.py")
    for args, want in [(["--text_file", str(tmp_path / "none.txt")], "none.txt"),
                       (["--text", "x"], "needs at least"),
                       (["--text", TEXT, "--thought_len", "0"], "thought_len=0")]:
        res = subprocess.run([sys.executable, tool, "--model", "tiny-llama"] + args, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 2 and want in res.stderr and "Traceback" not in res.stderr, res.stderr
