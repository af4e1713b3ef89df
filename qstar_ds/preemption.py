"""Pre-emption: stop at a step boundary, on every rank together, when a signal arrives.

SLURM warns a job before its time limit (`#SBATCH --signal=B:USR1@300`: the batch script traps it
and forwards it to the ranks) and sends SIGTERM on `scancel`, pre-emption and node failure
(SIGKILL follows after KillWait, 30 s by default). The handler only records the signal; after
each optimizer step the ranks agree (an all-reduce MAX of the flag), so all of them save the same
step and exit together: a rank that stopped alone would leave the others blocked in a collective.

Ctrl-C (SIGINT, sent to every process of the foreground group) is handled the same way the first
time, with a one-line notice; a second Ctrl-C stops at once (KeyboardInterrupt, which train.py
turns into one line and exit code 130; nothing after the last checkpoint is kept). It can land
anywhere, also inside a library's context manager whose exit then fails in its own way (DeepSpeed's
GatheredParameters: "Cannot free a ZeRO-3 parameter while it is still active"): `by_ctrl_c` finds
the KeyboardInterrupt behind such an error.

A launcher that goes away counts as a signal too: SIGTERM to the `deepspeed` runner alone ends the
runner but not its launcher and ranks, which would train on unattended. A watcher thread checks
the launcher processes above this rank (deepspeed, torchrun) every few seconds; when one is gone
the rank saves after the current step and exits, like after SIGTERM.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import torch

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
LAUNCHER_MARKS = ("deepspeed", "torch.distributed.run", "torchrun", "torch/distributed/run.py")


def launcher_chain() -> list[tuple[int, float, str]]:
    """(pid, start time, name) of the launcher processes above this one, nearest first: parents
    whose command line is a deepspeed or torchrun launcher (stops at the first other one)."""
    import psutil
    out = []
    try:
        p = psutil.Process().parent()
        while p is not None and p.pid > 1:
            args = p.cmdline()
            mark = next((a for a in args if any(m in a for m in LAUNCHER_MARKS)), None)
            if mark is None:
                break
            out.append((p.pid, p.create_time(), os.path.basename(mark)))
            p = p.parent()
    except (psutil.Error, OSError):
        pass
    return out


def _alive(pid: int, started: float) -> bool:
    import psutil
    try:
        return psutil.Process(pid).create_time() == started      # same pid, same process (not reused)
    except psutil.Error:
        return False


def by_ctrl_c(error: BaseException) -> bool:
    """True when `error` is a KeyboardInterrupt, or was raised while one was being handled
    (its __context__ / __cause__ chain holds one)."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return False


class Preemption:
    def __init__(self, device: torch.device, signals=SIGNALS, watch_every: float = 2.0):
        self.device = device
        self.received: int | str | None = None
        self.interrupts = 0
        self._old = {}
        for s in signals:
            self._old[s] = signal.signal(s, self._handler)
        self._stop_watch = threading.Event()
        chain = launcher_chain()
        if chain and watch_every > 0:
            threading.Thread(target=self._watch, args=(chain, watch_every), daemon=True,
                             name="qstar-launcher-watch").start()

    def _watch(self, chain, every: float) -> None:
        while not self._stop_watch.wait(every):
            gone = next(((pid, name) for pid, started, name in chain if not _alive(pid, started)), None)
            if gone is not None:
                if self.received is None:
                    self.received = f"the loss of its launcher ({gone[1]}, pid {gone[0]})"
                    print(f"qstar_ds: the launcher {gone[1]} (pid {gone[0]}) is gone: stopping after this step "
                          "and saving it", file=sys.stderr, flush=True)
                return

    def _handler(self, signum, frame) -> None:          # runs between bytecodes: record, nothing more
        if signum == signal.SIGINT:
            if self.interrupts:
                raise KeyboardInterrupt
            self.interrupts += 1
            print("qstar_ds: Ctrl-C: stopping after this step and saving it; Ctrl-C again to stop at once "
                  "(without saving)", file=sys.stderr, flush=True)
        if self.received is None:
            self.received = signum

    def should_stop(self) -> bool:
        """True on every rank if any rank has received a signal (a collective: call it at the
        same point on every rank)."""
        from .distributed import all_reduce
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.device)
        return bool(all_reduce(flag, "max").item() > 0)

    @property
    def name(self) -> str:
        if isinstance(self.received, str):
            return self.received
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        self._stop_watch.set()
        for s, h in self._old.items():
            signal.signal(s, h)
