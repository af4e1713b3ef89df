"""Helpers shared by the tests that launch the trainer: torchrun on free ports, the SGD
DeepSpeed config that makes an update equal to the gradient, and the update comparison."""
import json
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
SGD_JSON = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}},
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
COMMON = {"model.mixing_init_std": 0.1, "optim.lr": 0.05, "optim.weight_decay": 0, "optim.warmup_steps": 0, "optim.decay": "constant",
          "optim.grad_clip": 0.0, "train.max_steps": 2, "train.save_every": 0, "train.batch_size": 3}


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node nproc <args> (CPU accelerator, gloo)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}"] + args
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def run_worker(tmp_path, name: str, nproc: int, overrides: dict) -> dict:
    ds = tmp_path / "sgd.json"
    ds.write_text(json.dumps(SGD_JSON))
    dump = tmp_path / f"{name}.pt"
    args = [WORKER, str(dump), "--preset", "debug_cpu", "--ds_config", str(ds),
            "--output_dir", str(tmp_path / name)]
    for k, v in {**COMMON, **overrides}.items():
        args += [f"--{k}", str(v)]
    launch(args, nproc)
    return torch.load(dump)


def assert_same_update(init: dict, a: dict, b: dict, tol: float = 1e-3) -> None:
    assert set(a) == set(b)
    moved = 0
    for k in a:
        upd = (b[k] - init[k]).abs().max().item()
        moved += upd > 0
        err = (a[k] - b[k]).abs().max().item()
        ulp = 4 * torch.finfo(b[k].dtype).eps * b[k].abs().max().item()
        assert err <= tol * upd + ulp, f"{k}: differs by {err:.3g}, update {upd:.3g}"
    assert moved == len(a), "every parameter must move, or the comparison proves nothing"




def assert_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """torch.equal(a, b), failing with what differs: the shapes, or how many entries and the first."""
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    if torch.equal(a, b):
        return
    diff = (a != b) & ~(a.isnan() & b.isnan()) if a.is_floating_point() else a != b
    first = tuple(diff.nonzero()[0].tolist())
    raise AssertionError(f"{what}: {int(diff.sum())} of {a.numel()} entries differ; first at {first}: "
                         f"{a[first].item()} vs {b[first].item()}")
