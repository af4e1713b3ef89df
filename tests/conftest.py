import os

import pytest
import torch

from qstar_ds.model import QuietStarModel
from qstar_ds.tiny import tiny_causal_lm, tiny_tokenizer

# QSTAR_TEST_DEVICE=cuda runs the equivalence and rollout tests on a GPU (same assertions).
DEVICE = os.environ.get("QSTAR_TEST_DEVICE", "cpu")


# `dist`: tests that start other processes (launchers and ranks, the trainer, the CLIs, a browser).
# `python -m pytest -m "not slow and not dist" tests` is the quick in-process subset for the
# edit-test loop (README "Tests").
DIST_MODULES = {"test_cli", "test_cluster", "test_cpu_memory", "test_experiment", "test_faults", "test_hub",
                "test_modes", "test_show_thoughts", "test_trainer"}
LAUNCHES = ("subprocess.", "launch(", "run_worker(", "_evaluate(")


def pytest_collection_modifyitems(config, items):
    import inspect
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        if module in DIST_MODULES or any(m in source for m in LAUNCHES):
            item.add_marker(pytest.mark.dist)


def pytest_sessionstart(session):
    """Build DeepSpeed's CPU extensions once, before any test launches ranks (~1 min the first
    time, then cached in TORCH_EXTENSIONS_DIR; two ranks building at once would wait on a lock)."""
    if DEVICE != "cpu":
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
    except ImportError:
        return
    ShareMemCommBuilder().load(verbose=False)
    CPUAdamBuilder().load(verbose=False)     # DeepSpeedCPUAdam, used by zero3_offload.json


def gen(seed: int) -> torch.Generator:
    """A seeded generator on the test device (sampling draws its noise there)."""
    return torch.Generator(device=DEVICE).manual_seed(seed)



def make_model(arch: str, dtype=torch.float64, seed: int = 0, randomize: bool = True, **kw):
    """(QuietStarModel, tokenizer) of a tiny random `arch`; with `randomize`, the mixing head and
    the thought embeddings get random non-zero values (so every term has a gradient)."""
    tok = tiny_tokenizer()
    base = tiny_causal_lm(arch, len(tok), dtype=dtype, seed=seed, **kw)
    model = QuietStarModel.from_base(base, tok)
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.mixing_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            model.thought_embeds.add_(torch.randn(model.thought_embeds.shape, generator=g,
                                                  dtype=model.thought_embeds.dtype) * 0.02)
    return model.to(DEVICE), tok


def random_batch(n: int, B: int, vocab: int, pad: str | None, seed: int = 0):
    """(input_ids, attention_mask) of real token ids; pad = "left", "right", "both" (row 0 left,
    row 1 right-padded) or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (B, n), generator=g)
    am = torch.ones(B, n, dtype=torch.long)
    if pad in ("left", "both"):
        am[0, :2] = 0
    if pad in ("right", "both"):
        am[-1, n - 3:] = 0
    x = x.masked_fill(am == 0, 0)
    return x.to(DEVICE), am.to(DEVICE)


def random_thoughts(B: int, M: int, t: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(1, vocab, (B, M, t), generator=g).to(DEVICE)


def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


SHARED = os.environ.get("QSTAR_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def shared_file(rel: str) -> str:
    path = os.path.join(SHARED, rel)
    if not os.path.isfile(path):
        if ci():
            pytest.fail(f"{path} is missing: CI must provide the shared data folder (QSTAR_SHARED_DATA)")
        pytest.skip(f"{path} not found (the shared data folder sits next to a developer checkout; "
                    "set QSTAR_SHARED_DATA to point at it)")
    return path
