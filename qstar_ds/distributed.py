"""Distributed plumbing in one place: process groups from the launcher's environment
(deepspeed, torchrun, srun, mpirun), the collectives that training, evaluation, checkpointing and
pre-emption use, and the DeepSpeed engine (built under ZeRO-3, held gathered for the rollout,
stepped, its optimizer settings replaced on resume). What each rank works on is decided in
schedule.py (pure); the trainer reads as the algorithm and calls `Strategy`.

ZeRO-3's rule, kept by the callers: every rank runs the same modules the same number of times
(each forward gathers parameters collectively), so a rank short of work repeats a unit with
weight 0 (schedule.py) instead of skipping it.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .config import Config, ConfigError
from .ds_config import lr_lambda, zero_stage


# ---- process group ------------------------------------------------------------------------------
def device_type() -> str:
    """cuda when GPUs are visible (and DS_ACCELERATOR is not cpu), else cpu."""
    if os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def slurm_master_addr(nodelist: str) -> str:
    """Address of the first node of a SLURM node list: its NodeAddr from `scontrol show node`
    (right on real clusters and for emulated nodes, whose names do not resolve), else its name."""
    import subprocess
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        raise ConfigError(f"SLURM_STEP_NODELIST={nodelist!r}: cannot expand it with scontrol; "
                          "export MASTER_ADDR") from None
    out = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, timeout=30).stdout
    for tok in out.split():
        if tok.startswith("NodeAddr="):
            return tok.split("=", 1)[1]
    return first


def slurm_env(env: dict) -> dict:
    """The torch.distributed variables of one task of an `srun` step (SLURM_PROCID etc.), for
    variables the launcher did not set. Only inside a step (SLURM_STEP_NUM_TASKS): a batch script
    running python directly is one process, whatever the allocation."""
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)   # same on every task
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = slurm_master_addr(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
    return out


def init_distributed(device_type_: str) -> tuple[int, int, int]:
    """Initialise torch.distributed from the launcher's environment: deepspeed / torchrun (RANK,
    WORLD_SIZE, ...), srun (SLURM_PROCID, ... mapped by slurm_env), mpirun (mpi4py discovery; port
    MASTER_PORT or 29500); a single process without a launcher gets a world of 1.
    -> (rank, world, local_rank)."""
    import deepspeed
    import torch.distributed as dist

    if device_type_ == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(slurm_env(dict(os.environ)))
    mpi = "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ
    if "RANK" not in os.environ and not mpi:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device_type_ == "cpu" else "nccl",
                                   auto_mpi_discovery=True, distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                                   verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type_ == "cuda":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def join_launcher_group() -> tuple[int, int]:
    """Inference without DeepSpeed (evaluate.py): (rank, world) from the launcher's environment
    (torchrun, deepspeed), joining torch.distributed when world > 1."""
    world_ = int(os.environ.get("WORLD_SIZE", "1"))
    if world_ <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world_


# ---- collectives (no-ops in a single process) ---------------------------------------------------
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if d := _dist():
        d.barrier()


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows(v: torch.Tensor) -> torch.Tensor:
    """Every rank's (rows, ...) tensor concatenated along dim 0 in rank order (same shapes)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return v
    buf = [torch.empty_like(v) for _ in range(d.get_world_size())]
    d.all_gather(buf, v)
    return torch.cat(buf)


def all_reduce(v: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over the ranks: "sum" or "max". -> v."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.all_reduce(v, op={"sum": d.ReduceOp.SUM, "max": d.ReduceOp.MAX}[op])
    return v


def close(wait: bool = True) -> None:
    """Tear the process group down (the end of a run), after every rank got here when `wait`
    (not after an error: the other ranks may never come)."""
    if d := _dist():
        if wait:
            d.barrier()
        d.destroy_process_group()


# ---- the DeepSpeed engine -----------------------------------------------------------------------
def prepare_zero_init() -> None:
    """Import torch._dynamo's tensor polyfills before deepspeed.zero.Init patches tensor
    construction: imported lazily inside it (by transformers), their signature check fails with
    'Signature mismatch ... tensor_pynew' (torch 2.13 + deepspeed 0.19)."""
    import torch._dynamo.polyfills.tensor  # noqa: F401


def build_engine(model, cfg: Config, ds_config: dict):
    """deepspeed.initialize with our parameter groups and LR schedule. -> engine."""
    import deepspeed

    groups = model.parameter_groups(cfg.optim.lr, cfg.optim.weight_decay, cfg.thought.thought_lr_mult,
                                    cfg.thought.mixing_lr_mult)
    groups = [g for g in groups if g["params"]]

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           lr_scheduler=scheduler)
    return engine


def apply_optimizer_settings(engine, model, cfg: Config, saved: dict) -> list[str]:
    """After a checkpoint is loaded: its optimizer groups carry the lr, weight decay, betas and eps
    it was written with; set them to this run's optim.* (the moments are kept) and the LR to this
    run's schedule at the restored step. -> the changes against the checkpoint's config, in words
    (empty when nothing changed). `saved` is the checkpoint's resolved config."""
    o, sched = cfg.optim, engine.lr_scheduler
    want = [g for g in model.parameter_groups(o.lr, o.weight_decay, cfg.thought.thought_lr_mult,
                                              cfg.thought.mixing_lr_mult) if g["params"]]
    groups = engine.optimizer.param_groups
    if len(groups) != len(want):
        raise ConfigError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run {len(want)}")
    for i, (g, w) in enumerate(zip(groups, want)):
        sched.base_lrs[i] = g["initial_lr"] = w["lr"]
        g["weight_decay"] = w["weight_decay"]
        if "betas" in g:
            g["betas"] = tuple(o.betas)
        if "eps" in g:
            g["eps"] = o.eps
        g["lr"] = w["lr"] * sched.lr_lambdas[i](sched.last_epoch)
    sched._last_lr = [g["lr"] for g in groups]
    changes = []
    keys = [("optim", k) for k in ("lr", "weight_decay", "betas", "eps", "warmup_steps", "decay", "min_lr_ratio",
                                   "grad_clip")] + [("thought", "thought_lr_mult"), ("thought", "mixing_lr_mult"),
                                                    ("thought", "positions"), ("train", "max_steps")]
    for sec, k in keys:
        old, new = saved.get(sec, {}).get(k), getattr(getattr(cfg, sec), k)
        if isinstance(new, tuple):
            new = list(new)
        if old is not None and old != new:
            changes.append(f"{sec}.{k} {old} -> {new}")
    return changes


_HOLD = -1    # a module id no module has: "in use" for DeepSpeed while a `held` block runs


@contextlib.contextmanager
def held(params):
    """ZeRO-3 parameters whole for a block of several forwards: all-gathered once on entry and
    kept until exit (DeepSpeed re-partitions a parameter after every module forward unless some
    module is still using it: a sentinel user keeps them). A no-op for ordinary parameters."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            p.ds_active_sub_modules.add(_HOLD)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(_HOLD)


class Strategy:
    """One run's process group and DeepSpeed engine: what the trainer calls for everything that
    involves other ranks."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device_type = device_type()
        self.rank, self.world, self.local_rank = init_distributed(self.device_type)
        self.device = torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")
        self.engine, self.ds_config = None, {}          # set by build()
        self._hf_ds_config = None

    def zero_init(self, ds_config: dict) -> None:
        """Build the next HF model partitioned over the ranks (ZeRO-3's zero.Init), not whole."""
        prepare_zero_init()
        from transformers.integrations import HfDeepSpeedConfig
        self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # kept alive: HF builds under zero.Init while it exists

    def build(self, model, ds_config: dict):
        """deepspeed.initialize with our parameter groups and LR schedule. -> the engine."""
        self.ds_config = ds_config
        self.engine = build_engine(model, self.cfg, ds_config)
        if zero_stage(ds_config) == 3:  # the chunked loss reads the output weight directly
            import deepspeed
            module = self.engine.module
            deepspeed.zero.register_external_parameter(module.chunked_logprobs, module.lm_head.weight)
        return self.engine

    def rollout_held(self):
        """A context holding the whole model gathered on every rank for the rollout (ZeRO-3), so its
        t + 2 forwards all-gather the parameters once instead of at every forward; None where
        DeepSpeed gathers per forward: train.rollout_gather=never, ZeRO stage < 3 (nothing to
        gather), or auto on a GPU where the model takes over half the free memory."""
        mode = self.cfg.train.rollout_gather
        if mode == "never" or zero_stage(self.ds_config) != 3:
            return None
        params = list(self.engine.module.parameters())
        if mode == "auto" and self.device_type == "cuda":
            need = sum(p.ds_numel * p.element_size() for p in params if hasattr(p, "ds_numel"))
            if need > 0.5 * torch.cuda.mem_get_info(self.device)[0]:
                return None
        return held(params)

    def backward_step(self, loss: torch.Tensor, weight: float) -> None:
        """One micro-step's backward and (at the last micro-step of a step) the optimizer step.
        The loss is normalised by the whole step's counts and DeepSpeed averages gradients over
        ranks, so it is multiplied by the world size and not divided by the accumulation steps:
        the update is the whole batch's, whatever the chunking and the number of ranks."""
        self.engine.backward(loss * (weight * self.world), scale_wrt_gas=False)
        self.engine.step()

    def peak_memory_gb(self) -> tuple[float, float]:
        """(peak resident CPU memory, peak GPU memory) in GiB, the maximum over the ranks."""
        import resource
        mem = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                            torch.cuda.max_memory_allocated() / 2**30 if self.device_type == "cuda" else 0.0],
                           device=self.device)
        all_reduce(mem, "max")
        return mem[0].item(), mem[1].item()

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm (None where DeepSpeed does not compute it: stage 0)."""
        gn = self.engine.get_global_grad_norm()
        return None if gn is None else float(gn)
