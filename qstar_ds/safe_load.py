"""Reading checkpoint files without running code from them.

A checkpoint directory is what people copy between clusters and download. Pickle (torch.load with
weights_only=False) can execute anything a file asks for; DeepSpeed's checkpoint engine and
zero_to_fp32 pass weights_only=False explicitly. Inside `weights_only_loading()` every torch.load
(ours, DeepSpeed's engine, zero_to_fp32) unpickles with torch's weights_only unpickler, which
rebuilds only tensors, containers, numbers and strings plus the allow-listed classes below (data
holders of DeepSpeed's own state: their constructors are not called, no code from the file runs).
A file that asks for anything else is refused with `UnsafeCheckpoint`, naming the file and what it
asked for.
"""
from __future__ import annotations

import contextlib
import pickle
import re

import torch

from .config import ConfigError


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file holds pickled objects outside the allow-list (it could run code)."""


def allowed_globals() -> list:
    """DeepSpeed's state classes found in its checkpoints (loss scaler, ZeRO stage enum, ZeRO-1/2
    fragment addresses: plain data), and numpy arrays (older qstar_ds RNG state files)."""
    import numpy as np
    out = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType, np.dtypes.Int64DType]
    out.append(np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        out += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:        # pure-tensor use without deepspeed: nothing of DeepSpeed's to allow
        pass
    return out


def _name(f) -> str:
    return str(getattr(f, "name", f))


def safe_torch_load(f, *args, **kwargs):
    """torch.load(f) with weights_only=True (whatever the caller asked) and the allow-list."""
    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _ORIGINAL_LOAD(f, *args, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|unsupported GLOBAL|Unsupported operand)[^\n]*", str(e))
        what = found.group(0).strip().rstrip(".") if found else str(e).splitlines()[0][:200]
        raise UnsafeCheckpoint(f"{_name(f)}: refusing to load it: it holds pickled objects that are not "
                               f"tensor data ({what}); loading them could run code from the file") from None


_ORIGINAL_LOAD = torch.load


@contextlib.contextmanager
def weights_only_loading():
    """Within the block, torch.load anywhere in the process is `safe_torch_load`."""
    saved = torch.load
    torch.load = safe_torch_load
    try:
        yield
    finally:
        torch.load = saved


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def unsafe_globals(path: str) -> list[str]:
    """What a torch.save file would make the unpickler import beyond tensor data and the
    allow-list (read from its pickle opcodes: nothing is executed). [] = safe to load."""
    allowed = {_qualname(g) for g in allowed_globals()}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:          # not a torch zip file at all: torch.load would refuse it too
        return [f"unreadable as a torch file ({str(e).splitlines()[0][:80]})"]
    return [g for g in found if g not in allowed]
