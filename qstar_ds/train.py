"""Quiet-STaR training with DeepSpeed ZeRO-3.

    deepspeed qstar_ds/train.py --ds_config ds_configs/zero3.json [--preset NAME] [--config FILE.yaml]
        [--output_dir DIR] [--max_steps N] [--resume auto|none|PATH] [--any.dotted.key VALUE ...]

Also runs under torchrun, and as a single process without a launcher.
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: make `qstar_ds` importable, and make sure this
    here = os.path.dirname(os.path.abspath(__file__))  # folder's module names (data, metrics, ...)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # shadow nothing
    sys.path.insert(0, os.path.dirname(here))

import gc  # noqa: E402
import warnings  # noqa: E402

# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, once per micro-step.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)

from qstar_ds.cli import parse_args          # noqa: E402
from qstar_ds.config import ConfigError      # noqa: E402


def main(argv=None) -> int:
    try:
        cfg, _ = parse_args(argv)
    except ConfigError as e:
        print(f"qstar_ds: error: {e}", file=sys.stderr)
        return 2
    from qstar_ds import distributed
    from qstar_ds.trainer import Trainer
    trainer = None
    ok = False
    try:
        trainer = Trainer(cfg)
        trainer.fit()
        ok = True
        # one line per rank (launchers interleave them): what cluster tests and users grep for
        how = f"pre-empted ({trainer.preempted_by})" if trainer.preempted_by else "finished"
        print(f"qstar_ds: rank {trainer.rank}/{trainer.world} {how} at step {trainer.step}, "
              f"samples {trainer.samples}", flush=True)
    except ConfigError as e:
        print(f"qstar_ds: error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:              # a second Ctrl-C (the first one saves and stops: preemption.py)
        from qstar_ds.preemption import by_ctrl_c
        if not by_ctrl_c(e):
            raise
        print(f"qstar_ds: interrupted: stopped at once without saving; the newest checkpoint is under "
              f"{os.path.join(cfg.train.output_dir, 'checkpoints')}", file=sys.stderr, flush=True)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
        if ok:
            # Let every rank's queued collectives (DeepSpeed's async gradient reduction) finish
            # and drop the engine's tensors before the process group goes away. Not enough on
            # its own against a gloo thread releasing a tensor during interpreter shutdown:
            # the entry point below leaves with os._exit (qstar_ds/process_exit.py).
            trainer.engine.destroy()
            del trainer
            gc.collect()
        distributed.close(wait=ok)
    return 0


if __name__ == "__main__":
    from qstar_ds.process_exit import exit_process
    exit_process(main())
