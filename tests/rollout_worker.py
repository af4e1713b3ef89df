"""The rollout's parameter traffic under ZeRO-3 (used by test_scale.py under torchrun, 2 ranks).

    torchrun --nproc_per_node 2 tests/rollout_worker.py DUMP.pt --preset debug_cpu [--key value ...]

Counts the bytes every all-gather of DeepSpeed's torch backend returns while (a) the trainer's
rollout of one batch runs and (b) the same batch is rolled out the way it was before the rollout
held the gathered model: one sequence per forward, DeepSpeed gathering every layer at each of the
t + 2 forwards. Rank 0 writes {"bytes": {...}, "param_bytes", "thoughts"/"rewards": {...}}.
"""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from qstar_ds.cli import parse_args  # noqa: E402
from qstar_ds.distributed import gather_rows  # noqa: E402
from qstar_ds.rollout import Rollout, rollout, sequence_noise  # noqa: E402
from qstar_ds.trainer import Trainer  # noqa: E402

GATHERED = [0]


def count_all_gathers() -> None:
    """Add the output size of every all-gather DeepSpeed's torch backend runs to GATHERED."""
    from deepspeed.comm.torch import TorchBackend
    for name in ("all_gather_into_tensor", "all_gather", "all_gather_coalesced"):
        if not hasattr(TorchBackend, name):
            continue

        def counted(self, *a, _orig=getattr(TorchBackend, name), **k):
            out = k.get("output_tensor", a[0] if a else None)
            outs = out if isinstance(out, (list, tuple)) else [out]
            GATHERED[0] += sum(t.numel() * t.element_size() for t in outs if t is not None)
            return _orig(self, *a, **k)

        setattr(TorchBackend, name, counted)


def one_sequence_at_a_time(tr: Trainer, x, am):
    """The rollout before it held the model: per sequence, DeepSpeed's own per-forward gathering."""
    B = x.shape[0]
    per_rank = -(-B // tr.world)
    positions = tr._positions(x.shape[1])
    th, rw = [], []
    for j in range(per_rank):
        seq = min(tr.rank * per_rank + j, B - 1)
        ro = Rollout(**tr.engine(fn=rollout, cfg=tr.cfg.thought, input_ids=x[seq:seq + 1],
                                 attention_mask=am[seq:seq + 1], positions=positions,
                                 generator=sequence_noise(tr.cfg.train.seed, tr.step, [seq], tr.device)))
        th.append(ro.thoughts[0]); rw.append(ro.rewards[0].float())
    return tuple(gather_rows(torch.stack(v))[:B] for v in (th, rw))


def held_model(tr: Trainer, x, am):
    """The trainer's rollout, holding the model gathered, at the step's positions."""
    return tr._rollouts(x, am, tr._positions(x.shape[1]))


def main() -> None:
    dump = sys.argv[1]
    cfg, _ = parse_args(sys.argv[2:])
    count_all_gathers()
    tr = Trainer(cfg)
    x, am = tr.stream.next_batch(cfg.train.batch_size)
    out = {"bytes": {}, "thoughts": {}, "rewards": {}}
    for name, fn in (("before", one_sequence_at_a_time), ("held", held_model)):
        GATHERED[0] = 0
        th, rw = fn(tr, x, am)
        out["bytes"][name], out["thoughts"][name], out["rewards"][name] = GATHERED[0], th.cpu(), rw.cpu()
    out["param_bytes"] = sum(p.ds_numel * p.element_size() for p in tr.model.parameters())
    if dist.get_rank() == 0:
        torch.save(out, dump)
    tr.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    from qstar_ds.process_exit import exit_process
    main()
    exit_process(0)
