"""Checkpoints: DeepSpeed sharded states + our metadata, written so that a kill at any moment
leaves the previous complete checkpoint as the one `--resume auto` picks.

Layout under <output_dir>/checkpoints/:
    step_00000050/                 DeepSpeed's files for tag step_00000050 (every rank's shards)
    step_00000050/rank_state_00000.pt   per-rank RNG states
    step_00000050/qstar_meta.json  step, samples consumed, data state, resolved config,
                                   architecture signature, world size
    step_00000050/COMPLETE         written last (atomically, by rank 0, after a barrier)

A directory without COMPLETE is an interrupted save: never resumed from, removed by the next
successful save. Rotation keeps the newest `keep_last` complete checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from .config import ConfigError

CKPT_SUBDIR = "checkpoints"
COMPLETE = "COMPLETE"
META = "qstar_meta.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, META)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """auto -> newest complete checkpoint or None; none -> None; PATH -> that checkpoint (a tag
    directory, or a checkpoints directory whose newest complete one is taken)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(os.path.join(output_dir, CKPT_SUBDIR))
        return found[-1][1] if found else None
    path = resume.rstrip("/")
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    found = complete_checkpoints(path) or complete_checkpoints(os.path.join(path, CKPT_SUBDIR))
    if not found:
        raise ConfigError(f"train.resume={resume!r}: no complete checkpoint there")
    return found[-1][1]


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_compatible(meta: dict, signature: dict, world: int, path: str) -> None:
    """Refuse a resume that changes the architecture, the thought settings or the world size."""
    old = meta["signature"]
    diff = {k: (old.get(k), v) for k, v in signature.items() if old.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"cannot resume from {path}: the checkpoint was written with different "
                          f"architecture/thought settings ({what}); use --resume none or a new output_dir")
    if meta["world_size"] != world:
        raise ConfigError(f"cannot resume from {path}: written by {meta['world_size']} ranks, now {world}. "
                          "ZeRO shards are per rank: resume with the same number of ranks (or convert "
                          "the checkpoint with DeepSpeed's ds_to_universal.py and load it as universal)")


def save(engine, output_dir: str, step: int, meta: dict, keep_last: int) -> str:
    """Write checkpoint `step` (collective: every rank calls it). Returns its path."""
    import torch.distributed as dist

    ckpt_dir = os.path.join(output_dir, CKPT_SUBDIR)
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    rank = dist.get_rank()
    if rank == 0 and os.path.isdir(path):  # an interrupted earlier save of the same step
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"qstar_step": step}, save_latest=False)
    torch.save(rng_state(), os.path.join(path, f"rank_state_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        _atomic_write(os.path.join(path, META), json.dumps(meta, indent=1))
        _atomic_write(os.path.join(path, COMPLETE), f"{step}\n")
        _rotate(ckpt_dir, keep_last, newest=step)
    dist.barrier()
    return path


def _rotate(ckpt_dir: str, keep_last: int, newest: int) -> None:
    complete = complete_checkpoints(ckpt_dir)
    for step, path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(ckpt_dir):  # leftovers of interrupted saves
        m = TAG_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(path, COMPLETE)):
            shutil.rmtree(path, ignore_errors=True)


def load(engine, path: str) -> dict:
    """Restore engine states (model, optimizer, LR schedule) and this rank's RNG. -> meta."""
    import torch.distributed as dist

    ckpt_dir, tag = os.path.split(path.rstrip("/"))
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = os.path.join(path, f"rank_state_{dist.get_rank():05d}.pt")
    if os.path.isfile(rank_file):
        set_rng_state(torch.load(rank_file, weights_only=False))
    return read_meta(path)
