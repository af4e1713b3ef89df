"""Leaving a distributed process without a crash at interpreter shutdown.

Gloo runs each collective on a worker thread that drops its reference to the finished work (and
so to the work's tensors) a moment after the caller's wait() returns. If the main thread has
returned from main() by then, Python is finalizing; releasing a tensor that has a Python object
needs the GIL, CPython ends the thread with pthread_exit, and that unwind through a noexcept C++
destructor aborts the whole process: SIGABRT, "terminate called without an active exception",
exit code -6 after a run that finished and saved everything (pytorch/pytorch#190489). We saw it
on ~5% of 2-rank ZeRO-3 runs on a loaded CPU (DeepSpeed's async all-gathers; backtrace:
take_gil <- THPVariable_dealloc <- ~AsyncAllgatherWork <- ProcessGroupGloo::runLoop, main thread
in Py_FinalizeEx), and under mpirun. destroy_process_group() does not stop those threads while
DeepSpeed still holds its groups.

So distributed entry points, once their work is written and flushed, leave with os._exit: there is
no interpreter finalization for a worker thread to race with. Everything that must outlive the
process (checkpoints, metrics, wandb) is closed explicitly before this is called; MPI, which
mpi4py would finalize at exit, is finalized here.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """Finalize MPI if this process initialised it, flush logging and the standard streams, then
    end the process with `code` at once."""
    # Under mpirun, DeepSpeed's rank discovery initialises MPI through mpi4py, whose atexit hook
    # (skipped by os._exit) would call MPI_Finalize; a rank that exits without it is reported by
    # mpirun as an abnormal termination (exit 1) even after a clean run.
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to say
            pass
    os._exit(code)
