"""Run the trainer for a few steps and dump the full parameters (used by test_trainer.py under
torchrun with 1 or 2 ranks).

    torchrun --nproc_per_node 2 tests/dist_worker.py DUMP.pt --preset debug_cpu [--key value ...]

DUMP.pt gets {"init": state, "final": state, "metrics": last metrics, "fed": [...]} from rank 0,
where a state is {parameter name: full tensor} gathered from ZeRO-3 shards and "fed" lists the
token ids of every grad-enabled model pass on rank 0 (what the learn micro-steps fed the model).
"""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qstar_ds.cli import parse_args  # noqa: E402
from qstar_ds.trainer import Trainer  # noqa: E402


def full_state(model) -> dict:
    import deepspeed
    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone().float() for n, p in params}


def record_fed_ids() -> list:
    """Wrap QuietStarModel.hidden to keep the ids of every pass that builds a graph."""
    from qstar_ds.model import QuietStarModel
    fed, hidden = [], QuietStarModel.hidden

    def spy(self, ids, layout, cache=None):
        if torch.is_grad_enabled():
            fed.append(ids.detach().cpu().clone())
        return hidden(self, ids, layout, cache)

    QuietStarModel.hidden = spy
    return fed


def main() -> None:
    dump = sys.argv[1]
    cfg, _ = parse_args(sys.argv[2:])
    fed = record_fed_ids()
    trainer = Trainer(cfg)
    init = full_state(trainer.model)
    metrics = trainer.fit()
    final = full_state(trainer.model)
    if dist.get_rank() == 0:
        torch.save({"init": init, "final": final, "metrics": metrics, "fed": fed,
                    "eval": trainer.last_eval}, dump)
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    from qstar_ds.process_exit import exit_process
    main()
    exit_process(0)
