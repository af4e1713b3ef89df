"""Pre-emption: stop at a step boundary, on every rank together, when a signal arrives.

SLURM warns a job before its time limit (`#SBATCH --signal=B:USR1@300`: the batch script traps it
and forwards it to the ranks) and sends SIGTERM on `scancel`, pre-emption and node failure
(SIGKILL follows after KillWait, 30 s by default). The handler only records the signal; after
each optimizer step the ranks agree (an all-reduce MAX of the flag), so all of them save the same
step and exit together: a rank that stopped alone would leave the others blocked in a collective.

Ctrl-C (SIGINT, sent to every process of the foreground group) is handled the same way the first
time, with a one-line notice; a second Ctrl-C stops at once (KeyboardInterrupt, which train.py
turns into one line and exit code 130; nothing after the last checkpoint is kept).
"""
from __future__ import annotations

import signal
import sys

import torch

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self, device: torch.device, signals=SIGNALS):
        self.device = device
        self.received: int | None = None
        self.interrupts = 0
        self._old = {}
        for s in signals:
            self._old[s] = signal.signal(s, self._handler)

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
        import torch.distributed as dist
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
