"""The DeepSpeed JSON with its "auto" fields filled from the config and checked, the
training dtype and the LR schedule: pure configuration, no process group.

Batch accounting (what the DS JSON's batch fields mean here). One optimizer step trains on
`train.batch_size` sequences. Their thought streams are cut into chunks (schedule.plan_step: a
chunk = one sequence's n base tokens + up to `streams_per_chunk` streams, at most
`train.chunk_tokens` packed tokens); the chunks are dealt to the ranks, each chunk is one
micro-step of one "sample":

    train_micro_batch_size_per_gpu = 1
    gradient_accumulation_steps    = ceil(total chunks / world size)      (same on every rank)
    train_batch_size               = gradient_accumulation_steps * world size

A JSON that sets one of these to a number that disagrees is refused, naming the field.
"""
from __future__ import annotations

import json
import math

import torch

from .config import Config, ConfigError
from .schedule import StepPlan


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


def resolve_dtype(cfg: Config, device_type_: str) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device_type_ == "cuda" else torch.float32
    return getattr(torch, cfg.model.dtype)


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
