"""Rank-0 output: print0, a progress bar, a plain-text/JSONL log in output_dir, and wandb
(imported only when enabled; offline mode needs no network)."""
from __future__ import annotations

import json
import os
import sys
import time


def is_rank0() -> bool:
    from .distributed import is_main
    return is_main()


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


class MetricsLogger:
    """Writes metrics as JSON lines (metrics.jsonl) and text (train.log) in output_dir and, when
    mode != disabled, to wandb. Does nothing on ranks other than 0."""

    def __init__(self, output_dir: str, mode: str = "disabled", project: str = "qstar_ds",
                 config: dict | None = None, run_name: str | None = None):
        self.active = is_rank0()
        self.wandb = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        self.text = open(os.path.join(output_dir, "train.log"), "a")
        if mode != "disabled":
            import wandb  # lazy: a disabled logger never imports it
            self.wandb = wandb.init(project=project, mode=mode, dir=output_dir, config=config,
                                    name=run_name, resume="allow")

    def line(self, msg: str) -> None:
        if self.active:
            self.text.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
            self.text.flush()

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        self.line(f"step {step} " + " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in metrics.items()))
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_thoughts(self, step: int, rows: list[dict]) -> None:
        if not self.active or not rows:
            return
        for r in rows:
            self.line(f"thought step={step} pos={r['position']} after={r['context']!r} "
                      f"thought={r['thought']!r} reward={r['reward']:.4f}")
        if self.wandb is not None:
            import wandb
            cols = list(rows[0])
            self.wandb.log({"thoughts": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])},
                           step=step)

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.text.close()
            if self.wandb is not None:
                self.wandb.finish()


def progress(total: int, initial: int, desc: str = "train", unit: str = "step"):
    """A tqdm bar on rank 0 (to stderr), a silent stand-in elsewhere."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not is_rank0(), file=sys.stderr,
                dynamic_ncols=True, desc=desc, unit=unit, leave=desc == "train")
