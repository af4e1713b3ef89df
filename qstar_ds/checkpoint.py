"""Checkpoints: DeepSpeed sharded states + our metadata, written so that a kill at any moment
leaves the previous complete checkpoint as the one `--resume auto` picks, and verified before
they are trusted.

Layout under <output_dir>/checkpoints/:
    step_00000050/                 DeepSpeed's files for tag step_00000050 (every rank's shards)
    step_00000050/rank_state_00000.json  per-rank RNG states (JSON: nothing to unpickle)
    step_00000050/qstar_meta.json  step, samples consumed, data state, resolved config, architecture
                                   signature, world size, run id, and the size and sha256 of every
                                   file of the checkpoint (written after all of them are fsynced)
    step_00000050/COMPLETE         written last (atomically, by rank 0, after a barrier)
    superseded/step_00000060/      checkpoints of a branch left by `--resume PATH` to an older step
                                   (moved, never deleted)

A directory without COMPLETE is an interrupted save: never resumed from, removed by the next
successful save. Rotation keeps the newest `keep_last` complete checkpoints *of this run* (the
run id in the meta); it renames a checkpoint to .trash-* before deleting it, so a kill mid-delete
never leaves a half-deleted directory that looks complete. Every file we read goes through
safe_load (no code from a checkpoint ever runs).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import time

import numpy as np
import torch

from . import distributed
from .config import ConfigError
from .safe_load import safe_torch_load, unsafe_globals

CKPT_SUBDIR = "checkpoints"
COMPLETE = "COMPLETE"
META = "qstar_meta.json"
SUPERSEDED = "superseded"
TRASH_PREFIX = ".trash-"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (damaged, missing, ambiguous): one line, exit code 2."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


MIN_FREE_BYTES = 64 * 2**20


def check_output_dir(path: str, rank: int = 0) -> None:
    """Refuse an output_dir that is a file, cannot be created or written, or has less than 64 MiB
    free, with one line, before anything expensive starts (every rank writes its shards there)."""
    key = f"train.output_dir={path!r}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{rank}_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}: not writable ({e.strerror})") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"{key}: only {free / 2**20:.0f} MiB free on its disk")


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints (COMPLETE and meta present), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, META)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def candidates(resume: str, output_dir: str) -> tuple[list[str], bool]:
    """Checkpoints `resume` may mean, best first, and whether it named one checkpoint exactly
    (then it is that one or an error; otherwise the newest that verifies is taken).
    auto -> the complete checkpoints of output_dir, newest first; none -> []; PATH -> that tag
    directory, or the complete checkpoints of a checkpoints/ or run directory."""
    if resume == "none":
        return [], False
    if resume == "auto":
        return [p for _, p in reversed(complete_checkpoints(os.path.join(output_dir, CKPT_SUBDIR)))], False
    path = resume.rstrip("/")
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return [path], True
    found = complete_checkpoints(path) or complete_checkpoints(os.path.join(path, CKPT_SUBDIR))
    if not found:
        why = "no such directory" if not os.path.isdir(path) else \
            "an interrupted save (no COMPLETE marker)" if os.path.isfile(os.path.join(path, META)) else \
            "no complete checkpoint there"
        raise CheckpointError(f"train.resume={resume!r}: {why}")
    return [p for _, p in reversed(found)], False


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint `resume` means: the newest one that verifies (one process; see `pick`)."""
    import sys
    return pick(resume, output_dir, lambda reason: reason,
                report=lambda msg: print(f"qstar_ds: {msg}", file=sys.stderr, flush=True))


def pick(resume: str, output_dir: str, agree, report, rank: int = 0, world: int = 1,
         hashes: bool = True) -> str | None:
    """The checkpoint to resume from: the first candidate that verifies on every rank (`agree`
    turns this rank's reason into the first reason of any rank: a collective), or None. Skipped
    ones are reported in one line each; an exactly named one that fails is an error, as is a
    run directory with checkpoints none of which verifies."""
    paths, exact = candidates(resume, output_dir)
    skipped = []
    for path in paths:
        reason = agree(verify(path, rank, world, hashes))
        if reason is None:
            return path
        if exact:
            raise CheckpointError(f"cannot resume from {path}: {reason}")
        skipped.append(f"{os.path.basename(path)} ({reason})")
        report(f"checkpoint {path} skipped: {reason}")
    if skipped:
        where = os.path.dirname(paths[0])
        raise CheckpointError(f"no checkpoint under {where} verifies: {'; '.join(skipped)}. Nothing was deleted; "
                              f"move them away or use a new output_dir")
    return None


def file_digest(path: str) -> str:
    """sha256 of a file, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def data_files(path: str) -> list[str]:
    """The files of a checkpoint that its meta describes (all but the meta and the marker)."""
    return sorted(n for n in os.listdir(path) if n not in (META, COMPLETE) and not n.endswith(".tmp")
                  and os.path.isfile(os.path.join(path, n)))


def manifest_share(path: str, rank: int, world: int, hashes: bool = True) -> dict:
    """{name: [size, sha256 or None]} of this rank's share of the checkpoint's files (every
    world-th one), each fsynced first: the meta that lists them is written after every rank returned."""
    out = {}
    for name in data_files(path)[rank::world]:
        full = os.path.join(path, name)
        with open(full, "rb") as f:
            os.fsync(f.fileno())
        out[name] = [os.path.getsize(full), file_digest(full) if hashes else None]
    return out


def verify(path: str, rank: int = 0, world: int = 1, hashes: bool = True) -> str | None:
    """Why checkpoint `path` cannot be trusted, or None. Every rank checks that every listed
    file exists with its recorded size (cheap) and the sha256 of its share of them."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"{META} unreadable ({str(e).splitlines()[0][:120]})"
    if not isinstance(meta, dict):
        return f"{META} is not a JSON object"
    missing = [k for k in ("step", "samples", "data_state", "signature", "world_size") if k not in meta]
    if missing:
        return f"{META} incomplete (no {', '.join(missing)})"
    files = meta.get("files")                # None: written before checkpoints listed their files
    for name, (size, _) in (files or {}).items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, {size} were written"
    share = (sorted(files) if files is not None else data_files(path))[rank::world]
    for name in share:
        if hashes and files is not None and files[name][1] is not None:
            try:
                digest = file_digest(os.path.join(path, name))
            except OSError as e:
                return f"{name} unreadable ({e.strerror})"
            if digest != files[name][1]:
                return f"{name} is damaged (sha256 differs from the one recorded when it was written)"
        if name.endswith(".pt"):
            bad = unsafe_globals(os.path.join(path, name))
            if bad:
                return f"{name} holds pickled objects that are not tensor data ({', '.join(bad[:3])}): not loaded"
    return None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def rng_state() -> dict:
    """This process's RNG states as JSON-able lists (python, numpy, torch, cuda)."""
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *[v if not isinstance(v, np.generic) else v.item()
                                                           for v in np_state[2:]]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


SIGNATURE_DEFAULTS = {"mix": "hidden"}   # keys added later: what checkpoints written before them mean


def check_compatible(meta: dict, signature: dict, path: str) -> None:
    """Refuse a resume that changes the architecture or the thought settings."""
    old = {**SIGNATURE_DEFAULTS, **meta["signature"]}
    diff = {k: (old.get(k), v) for k, v in signature.items() if old.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"cannot resume from {path}: the checkpoint was written with different "
                              f"architecture/thought settings ({what}); use a new output_dir")


UNIVERSAL = "universal"


def universal_dir(path: str, rank: int) -> str:
    """DeepSpeed's universal form of checkpoint `path` (every parameter's fp32 value and Adam
    moments whole, loadable by any number of ranks), made once by rank 0 with DeepSpeed's
    ds_to_universal (every file read through safe_load) into path/universal. Collective."""
    import argparse
    out = os.path.join(path, UNIVERSAL)
    if rank == 0 and not os.path.isfile(os.path.join(out, COMPLETE)):
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        from .safe_load import weights_only_loading
        tmp = f"{out}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=path, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        with weights_only_loading():
            to_universal(args)
        _atomic_write(os.path.join(tmp, COMPLETE), "universal\n")
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    distributed.barrier()
    return out


def begin(resume: str, output_dir: str, hashes: bool, report) -> tuple[str | None, dict | None, str]:
    """Where a run starts (collective): -> (checkpoint to resume from or None, its meta, run id).
    The run id is inherited from a checkpoint of this output_dir, else new; rotation deletes only
    checkpoints with this id. `--resume none` where complete checkpoints exist is refused.
    Newer checkpoints than the resumed one are moved aside once it has loaded (leave_branch)."""
    import uuid
    rank, world = distributed.rank(), distributed.world()
    ckpt_dir = os.path.join(output_dir, CKPT_SUBDIR)
    existing = complete_checkpoints(ckpt_dir)
    if resume == "none" and existing:
        raise CheckpointError(f"train.resume=none, but {ckpt_dir} holds complete checkpoints (newest: step "
                              f"{existing[-1][0]}): --resume auto continues them; to start over, use a new "
                              f"output_dir (nothing was deleted)")

    def agree(reason):
        return next((r for r in distributed.gather_objects(reason) if r is not None), None)

    path = pick(resume, output_dir, agree, report, rank, world, hashes)
    meta = read_meta(path) if path else None
    own = path is not None and os.path.realpath(os.path.dirname(path)) == os.path.realpath(ckpt_dir)
    run_id = distributed.broadcast_object(meta.get("run_id") if own and meta.get("run_id") else uuid.uuid4().hex[:12])
    return path, meta, run_id


def leave_branch(output_dir: str, step: int, report) -> None:
    """After a resume from `step` has loaded (collective): move output_dir's complete checkpoints
    newer than it (the branch being left: `--resume PATH` to an older step, or newer ones that
    failed verification) to checkpoints/superseded/, with one line."""
    left = newer_than(output_dir, step)
    if left and distributed.is_main():
        moved = [supersede(p) for p in left]
        report(f"resuming from step {step}: the newer checkpoints of {os.path.join(output_dir, CKPT_SUBDIR)} "
               f"({', '.join(os.path.basename(p) for p in left)}) belong to the branch left behind; "
               f"moved to {os.path.dirname(moved[0])} (not deleted)")
    distributed.barrier()


def _trash(path: str) -> None:
    """Delete a checkpoint directory: renamed first (atomic), so a kill mid-delete leaves a
    .trash-* directory (removed by the next save), never a damaged step_* one."""
    trash = os.path.join(os.path.dirname(path), f"{TRASH_PREFIX}{os.path.basename(path)}-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def supersede(path: str) -> str:
    """Move a complete checkpoint to checkpoints/superseded/ (never deleted). -> its new path."""
    ckpt_dir = os.path.dirname(path)
    dest_dir = os.path.join(ckpt_dir, SUPERSEDED)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, os.path.basename(path))
    if os.path.exists(dest):
        dest += f"-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.rename(path, dest)
    return dest


def newer_than(output_dir: str, step: int) -> list[str]:
    """Complete checkpoints of output_dir after `step`: the branch a resume from `step` leaves."""
    return [p for s, p in complete_checkpoints(os.path.join(output_dir, CKPT_SUBDIR)) if s > step]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _newest_line(ckpt_dir: str) -> str:
    newest = complete_checkpoints(ckpt_dir)
    return f"the newest complete checkpoint is {newest[-1][1]}" if newest else "no checkpoint was written yet"


def bytes_to_write(ckpt_dir: str, n_params: int, world: int) -> int:
    """This rank's share of the next checkpoint: the newest complete one's size over `world`, or,
    before the first, 16 bytes per parameter over `world` (fp32 weights and two Adam moments)."""
    newest = complete_checkpoints(ckpt_dir)
    if newest:
        try:
            total = sum(int(v[0]) for v in (read_meta(newest[-1][1]).get("files") or {}).values())
            if total:
                return -(-total // world)
        except (OSError, ValueError, AttributeError, TypeError, IndexError):
            pass
    return -(-16 * n_params // world)


def check_space(ckpt_dir: str, need: int, step: int) -> None:
    """Refuse, on every rank with the same line, a save that would not fit: ranks on one host
    writing to one filesystem add up their shares (a filesystem shared across hosts is only
    caught when the write fails: see save)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    row = (socket.gethostname(), os.stat(ckpt_dir).st_dev, shutil.disk_usage(ckpt_dir).free, need)
    disks: dict[tuple, list[int]] = {}
    for host, dev, free, n in distributed.gather_objects(row):
        disks.setdefault((host, dev), [free, 0])[1] += n
    for (host, _), (free, n) in disks.items():
        if free < n + MIN_FREE_BYTES:
            where = f" on {host}" if len(disks) > 1 else ""
            raise CheckpointError(f"checkpoint step {step}: about {_gib(n)} to write under {ckpt_dir}{where}, only "
                                  f"{_gib(free)} free there: free space or set train.output_dir to a larger disk "
                                  f"(train.keep_last sets how many are kept); nothing was written, "
                                  f"{_newest_line(ckpt_dir)}")


def save(engine, output_dir: str, step: int, meta: dict, keep_last: int, hashes: bool = True) -> str:
    """Write checkpoint `step` (collective: every rank calls it). Returns its path. The meta gets
    the size and sha256 of every file (each rank hashes and fsyncs a share) before COMPLETE.
    A save that cannot fit, or whose writing fails, is one CheckpointError line; the earlier
    complete checkpoints are untouched."""
    ckpt_dir = os.path.join(output_dir, CKPT_SUBDIR)
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    rank, world = distributed.rank(), distributed.world()
    if rank == 0 and os.path.isdir(path):
        if os.path.isfile(os.path.join(path, COMPLETE)):   # another run's or branch's: kept
            supersede(path)
        else:                                                # an interrupted earlier save of this step
            shutil.rmtree(path)
    distributed.barrier()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    check_space(ckpt_dir, bytes_to_write(ckpt_dir, n_params, world), step)
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"qstar_step": step}, save_latest=False)
        _atomic_write(os.path.join(path, f"rank_state_{rank:05d}.json"), json.dumps(rng_state()))
    except (OSError, RuntimeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:160]
        if "unexpected pos" in why or "file write failed" in why:     # how torch.save reports a short write
            why = f"a short write: disk full, quota or file-size limit ({why})"
        free = shutil.disk_usage(ckpt_dir).free
        raise CheckpointError(f"checkpoint step {step}: writing {path} failed ({type(e).__name__}: {why}; "
                              f"{_gib(free)} free on its disk): that directory is incomplete and never resumed "
                              f"from, {_newest_line(ckpt_dir)}") from None
    distributed.barrier()
    shares = distributed.gather_objects(manifest_share(path, rank, world, hashes))
    if rank == 0:
        meta = dict(meta, files={k: v for share in shares for k, v in share.items()})
        _fsync_dir(path)
        _atomic_write(os.path.join(path, META), json.dumps(meta, indent=1))
        _atomic_write(os.path.join(path, COMPLETE), f"{step}\n")
        _rotate(ckpt_dir, keep_last, newest=step, run_id=meta.get("run_id"))
    distributed.barrier()
    return path


def _rotate(ckpt_dir: str, keep_last: int, newest: int, run_id: str | None) -> None:
    """Delete this run's complete checkpoints beyond the newest `keep_last`, interrupted saves
    older than `newest`, and leftovers of interrupted deletions. Other runs' are never touched."""
    mine = []
    for step, path in complete_checkpoints(ckpt_dir):
        try:
            if read_meta(path).get("run_id") == run_id:
                mine.append(path)
        except (OSError, ValueError, AttributeError):
            continue
    for path in mine[:-keep_last]:
        _trash(path)
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if name.startswith(TRASH_PREFIX) or \
                (m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(path, COMPLETE))):
            shutil.rmtree(path, ignore_errors=True)


def load(engine, path: str, universal: bool = False) -> dict:
    """Restore engine states (model, optimizer, LR schedule) and this rank's RNG, every file read
    without unpickling code (safe_load). `universal`: written by another number of ranks; loaded
    from its universal form (the engine was built with checkpoint.load_universal). -> meta."""
    from .safe_load import weights_only_loading
    ckpt_dir, tag = os.path.split(path.rstrip("/"))
    rank = distributed.rank()
    if universal:
        ckpt_dir, tag = path, os.path.basename(universal_dir(path, rank))
    with weights_only_loading():
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"cannot resume from {path}: DeepSpeed found no checkpoint there")
    rank_file = os.path.join(path, f"rank_state_{rank:05d}.json")
    legacy = os.path.join(path, f"rank_state_{rank:05d}.pt")          # written before the JSON files
    if os.path.isfile(rank_file):
        with open(rank_file) as f:
            set_rng_state(json.load(f))
    elif os.path.isfile(legacy):
        legacy_state = safe_torch_load(legacy)
        set_rng_state({"python": [legacy_state["python"][0], legacy_state["python"][1], legacy_state["python"][2]],
                       "numpy": [legacy_state["numpy"][0], legacy_state["numpy"][1], *legacy_state["numpy"][2:]],
                       "torch": legacy_state["torch"].tolist(), **({"cuda": [c.tolist() for c in legacy_state["cuda"]]}
                                                          if "cuda" in legacy_state else {})})
    return read_meta(path)
