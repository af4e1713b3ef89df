"""Keep freed large blocks in the heap on CPU runs (glibc malloc settings).

PyTorch's CPU allocator is plain malloc. glibc serves an allocation above its mmap threshold
(adjusted at run time, never above 32 MiB) with a fresh mmap and unmaps it on free, so every
activation-sized tensor of a Quiet-STaR step comes back as new pages that the kernel must zero
and fault in on first touch, at every layer of every step (measured cost: docs/PERFORMANCE.md).

keep_freed_memory() sets a fixed mmap threshold of 1 GiB (blocks below it come from the heap
and are reused after free) and a trim threshold of 2 GiB (free memory at the top of the heap is
kept rather than returned to the kernel between steps). Cost: the process's resident size stays
near its peak instead of shrinking between steps. GPU runs do not need it (activations live in
CUDA's caching allocator); the trainer and the benchmark call it on CPU only.
"""
from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1        # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1     # mallopt takes an int

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; False (and nothing changed) where the C library is
    not glibc (musl, macOS) or mallopt refuses them."""
    global _done
    if _done is None:
        _done = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
