"""DeepSpeed glue: the DS JSON with its "auto" fields filled and checked, distributed setup,
model construction under ZeRO-3, parameter groups and the LR schedule.

Batch accounting (what the DS JSON's batch fields mean here). One optimizer step trains on
`train.batch_size` sequences. Their thought streams are cut into chunks (a chunk = one sequence's
n base tokens + up to `streams_per_chunk` streams, at most `train.chunk_tokens` packed tokens);
the chunks are dealt round-robin to the ranks, each chunk is one micro-step of one "sample":

    train_micro_batch_size_per_gpu = 1
    gradient_accumulation_steps    = ceil(total chunks / world size)      (same on every rank)
    train_batch_size               = gradient_accumulation_steps * world size

A JSON that sets one of these to a number that disagrees is refused, naming the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from .config import Config, ConfigError


@dataclass
class StepPlan:
    """How one optimizer step is cut into micro-steps."""
    n_streams: int          # M: streams per sequence (positions * r)
    streams_per_chunk: int
    chunks_per_seq: int
    total_chunks: int       # over the global batch
    world: int

    @property
    def grad_accum(self) -> int:
        return math.ceil(self.total_chunks / self.world)

    @property
    def wasted(self) -> float:
        """Share of the step's micro-steps that are weight-0 repeats (ranks without a chunk)."""
        return 1 - self.total_chunks / (self.grad_accum * self.world)

    def chunks(self) -> list[tuple[int, int, int]]:
        """(sequence, first stream, end stream) of every chunk of the global batch."""
        out = []
        for s in range(self.total_chunks // self.chunks_per_seq):
            for c in range(self.chunks_per_seq):
                a = c * self.streams_per_chunk
                out.append((s, a, min(a + self.streams_per_chunk, self.n_streams)))
        return out


def plan_step(cfg: Config, world: int) -> StepPlan:
    """Cut each sequence's M streams into chunks of at most `train.chunk_tokens` packed tokens,
    choosing the chunk count that makes a step fastest on `world` ranks: the critical path is
    (micro-steps per rank) x (tokens of the largest chunk), each chunk also re-encoding the n
    base tokens. With few ranks that is the fewest chunks; with more ranks than chunks, smaller
    chunks so that every rank has one (no rank runs a weight-0 repeat while others work)."""
    B = cfg.train.batch_size
    if cfg.thought.mode == "off":           # no streams: one base-only chunk per sequence
        return StepPlan(0, 0, 1, B, world)
    n, L = cfg.data.seq_len, cfg.thought.stream_len
    M = (n - cfg.thought.talk_len) * cfg.thought.n_thoughts
    most = min(M, max(1, (cfg.train.chunk_tokens - n) // L))      # streams per chunk that fit
    best = None
    for cps in range(math.ceil(M / most), M + 1):
        per = math.ceil(M / cps)                                     # even chunks of this count
        cps = math.ceil(M / per)
        cost = (math.ceil(B * cps / world) * (n + per * L), cps)     # then fewer chunks: less work
        if best is None or cost < best[0]:
            best = (cost, per, cps)
    _, per, cps = best
    return StepPlan(M, per, cps, cps * B, world)


def rollout_units(batch: int, positions: int, world: int) -> list[tuple[int, int, int]]:
    """The (sequence, first position, end position) units of a step's rollout, in order: whole
    sequences when there are at least as many as ranks; otherwise each sequence's positions cut
    into as many even blocks as it takes to give every rank a unit. Rank q takes the q-th run of
    ceil(units / world) of them (`units_of`)."""
    blocks = 1 if batch >= world else min(positions, -(-world // batch))
    size = -(-positions // blocks)
    return [(s, a, min(a + size, positions)) for s in range(batch) for a in range(0, positions, size)]


def units_of(units: list, rank: int, world: int) -> list:
    """Rank `rank`'s share of `units`: a contiguous run, padded with the last unit (whose result is
    dropped) so that every rank has as many."""
    per = -(-len(units) // world)
    return [units[min(rank * per + j, len(units) - 1)] for j in range(per)]


def load_ds_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"ds_config={path!r}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config={path!r}: not valid JSON ({e})") from None


def _fill(ds: dict, key: str, value, path: str, why: str) -> None:
    """Set ds[key] = value if absent or "auto"; refuse a different explicit value."""
    cur = ds.get(key, "auto")
    if cur == "auto":
        ds[key] = value
    elif cur != value and not (isinstance(cur, (int, float)) and isinstance(value, (int, float))
                               and math.isclose(cur, value)):
        raise ConfigError(f"ds_config {path}{key}={cur!r} contradicts {why} (= {value!r}); "
                          f"set it to \"auto\" or to {value!r}")


def fill_ds_config(ds: dict, cfg: Config, plan: StepPlan, device_type: str) -> dict:
    """Copy of `ds` with every "auto" field filled from `cfg` and `plan`, and consistency checked."""
    ds = json.loads(json.dumps(ds))
    gas = plan.grad_accum
    why = (f"train.batch_size={cfg.train.batch_size} sequences x {plan.chunks_per_seq} chunks "
           f"(train.chunk_tokens={cfg.train.chunk_tokens}) over {plan.world} ranks")
    _fill(ds, "train_micro_batch_size_per_gpu", 1, "", "one chunk per micro-step")
    _fill(ds, "gradient_accumulation_steps", gas, "", why)
    _fill(ds, "train_batch_size", gas * plan.world, "", why)
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), "", "optim.grad_clip")
    bf16 = resolve_dtype(cfg, device_type) == torch.bfloat16
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", bf16, "bf16.", f"model.dtype={cfg.model.dtype} on {device_type}")
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError("ds_config fp16.enabled=true: fp16 is not supported (use bf16 or fp32)")
    ds.setdefault("fp16", {})["enabled"] = False
    if "scheduler" in ds:
        raise ConfigError("ds_config scheduler: remove it; the schedule comes from optim.* and keeps "
                          "the thought-embedding learning-rate multiplier (a DS scheduler sets one lr for all groups)")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    fields = [("lr", cfg.optim.lr, "optim.lr"), ("weight_decay", cfg.optim.weight_decay, "optim.weight_decay")]
    if str(opt.get("type", "")).lower() in ("adam", "adamw"):
        fields += [("betas", list(cfg.optim.betas), "optim.betas"), ("eps", cfg.optim.eps, "optim.eps")]
    for key, value, src in fields:
        _fill(params, key, value, "optimizer.params.", src)
    if device_type == "cpu" and not _offloads_optimizer(ds) and str(opt.get("type", "")).lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)   # DeepSpeed's fused Adam needs CUDA
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config zero_optimization.stage={stage!r}: must be 0, 1, 2 or 3")
    return ds


def _offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def device_type() -> str:
    """cuda when GPUs are visible (and DS_ACCELERATOR is not cpu), else cpu."""
    if os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def resolve_dtype(cfg: Config, device_type_: str) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device_type_ == "cuda" else torch.float32
    return getattr(torch, cfg.model.dtype)


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


def lr_lambda(cfg: Config):
    """Multiplier of each group's base lr at optimizer step s (warm-up, then decay)."""
    o, total = cfg.optim, cfg.train.max_steps

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.decay == "constant":
            return 1.0
        frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.decay == "linear":
            return 1.0 - (1.0 - o.min_lr_ratio) * frac
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


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


def prepare_zero_init() -> None:
    """Import torch._dynamo's tensor polyfills before deepspeed.zero.Init patches tensor
    construction: imported lazily inside it (by transformers), their signature check fails with
    'Signature mismatch ... tensor_pynew' (torch 2.13 + deepspeed 0.19)."""
    import torch._dynamo.polyfills.tensor  # noqa: F401


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
                                                    ("train", "max_steps")]
    for sec, k in keys:
        old, new = saved.get(sec, {}).get(k), getattr(getattr(cfg, sec), k)
        if isinstance(new, tuple):
            new = list(new)
        if old is not None and old != new:
            changes.append(f"{sec}.{k} {old} -> {new}")
    return changes
