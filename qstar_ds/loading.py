"""Load a QuietStarModel for inference (evaluate, generate, the thought viewer) from any of:

- a directory written by QuietStarModel.save_pretrained / tools/export_hf.py (has quiet_star.json)
- a DeepSpeed checkpoint of the trainer: a step_XXXXXXXX directory, its checkpoints/ directory or
  the run's output_dir (newest one that verifies); ZeRO shards are merged on CPU by DeepSpeed's
  zero_to_fp32, in one process, whatever the world size that wrote them, with no code from the
  files run (safe_load)
- a base model name as in ModelConfig: "smollm2" (the embedded default), "tiny-<arch>", a local HF
  directory or a hub name: wrapped with fresh thought tokens and a zero mixing head, i.e. the
  model *before* any Quiet-STaR training (its mixed distribution equals the base model's only
  where the mixing weight is 0, i.e. at init)
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

from .config import TALK_POSITIONS, ThoughtConfig
from .checkpoint import CKPT_SUBDIR, COMPLETE, META, read_meta, resolve_resume
from .model import META_FILE, QuietStarModel, ThoughtTokens, load_tokenizer
from .safe_load import weights_only_loading


@dataclass
class Loaded:
    model: QuietStarModel
    tokenizer: object
    device: torch.device
    thought_len: int
    """The thought length the model was trained with (8 when unknown)."""
    source: str
    """What was loaded, in words (goes into result files)."""
    filler_id: int | None = None
    """The filler token when the model was trained with thought.mode=filler (its thoughts are
    that token repeated, not sampled), else None."""
    run_config: dict | None = None
    """The training run's config (nested dict) when loaded from a trainer checkpoint, else None."""
    talk_positions: str = "after_thought"
    """The thought.talk_positions the model was trained with (after_thought when unknown)."""
    oracle: tuple[int, str] | None = None
    """When the model was trained with thought.mode=oracle: (its filler token, its
    thought.oracle_focus, "" = every position): its thoughts are the text's own continuation
    where the pattern marks the next token and the filler elsewhere. Else None."""
    teacher: int | None = None
    """When the model was trained with thought.mode=teacher: its filler token (it thinks its own
    thought where the context asks for a sum, the filler elsewhere). Else None."""


def is_checkpoint(path: str) -> bool:
    p = path.rstrip("/")
    return os.path.isfile(os.path.join(p, COMPLETE)) or os.path.isdir(os.path.join(p, CKPT_SUBDIR)) or \
        any(n.startswith("step_") for n in (os.listdir(p) if os.path.isdir(p) else []))


def model_from_checkpoint(checkpoint: str) -> tuple[QuietStarModel, object, dict, str]:
    """(fp32 model, tokenizer, qstar_meta, resolved path) from a trainer checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_resume(checkpoint, checkpoint)          # a tag dir, or the newest that verifies under a run dir
    meta = read_meta(path)
    template = meta["template"]
    if not os.path.isdir(template):
        raise FileNotFoundError(f"{template} (base config + tokenizer written at the start of training) is missing")
    ckpt_dir, tag = os.path.split(path.rstrip("/"))
    with weights_only_loading():                           # no code from the checkpoint runs
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    config = AutoConfig.from_pretrained(template)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sig = meta["signature"]
    tokens = ThoughtTokens(sig["sot_id"], sig["eot_id"])
    tok = load_tokenizer(template, tokens)
    rule, _, init = sig.get("mix", "hidden").partition(":")
    model = QuietStarModel(base, tokens, mix_rule=rule, **({"mix_init": float(init)} if init else {}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"base.lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        model.base.tie_weights()
    return model, tok, meta, path


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               gguf_file: str | None = None) -> Loaded:
    """Load `spec` (see the module docstring) in eval mode on `device`."""
    from .hub import build_base

    thought_len, filler_id, run_config, talk_positions, oracle, teacher = 8, None, None, "after_thought", None, None
    if os.path.isfile(os.path.join(spec, META_FILE)):
        model = QuietStarModel.from_pretrained(spec, dtype=dtype)
        tok = load_tokenizer(spec)
        with open(os.path.join(spec, META_FILE)) as f:
            qs_meta = json.load(f)
        thought_len, filler_id = qs_meta.get("thought_len", thought_len), qs_meta.get("filler_id")
        talk_positions = qs_meta.get("talk_positions", talk_positions)
        if "oracle_focus" in qs_meta:
            oracle = (int(qs_meta["oracle_filler_id"]), str(qs_meta["oracle_focus"]))
        if "teacher_filler_id" in qs_meta:
            teacher = int(qs_meta["teacher_filler_id"])
        source = f"QuietStarModel directory {spec}"
    elif os.path.isdir(spec) and is_checkpoint(spec):
        model, tok, meta, path = model_from_checkpoint(spec)
        thought_len = meta["signature"].get("thought_len", thought_len)
        filler_id, run_config = trained_filler_id(meta, tok), meta.get("config")
        talk_positions = (run_config or {}).get("thought", {}).get("talk_positions", talk_positions)
        oracle, teacher = trained_oracle(meta, tok), trained_teacher(meta, tok)
        source = f"DeepSpeed checkpoint {path} (step {meta.get('step')})"
    elif os.path.isdir(spec) and os.path.isfile(os.path.join(spec, META)):
        raise FileNotFoundError(f"{spec} is an incomplete checkpoint (no {COMPLETE} marker)")
    else:
        base, tok = build_base(spec, dtype, gguf_file)
        model = QuietStarModel.from_base(base, tok)
        source = f"base model {spec} with untrained thought tokens"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device=device, dtype=dtype).eval()
    return Loaded(model, tok, torch.device(device), int(thought_len), source, filler_id, run_config,
                  str(talk_positions), oracle, teacher)


def trained_oracle(meta: dict, tokenizer) -> tuple[int, str] | None:
    """(filler token, thought.oracle_focus) of a checkpoint trained with thought.mode=oracle, else None."""
    thought = meta.get("config", {}).get("thought", {})
    if thought.get("mode") != "oracle":
        return None
    from .model import filler_token_id
    return filler_token_id(tokenizer, thought.get("filler", "...")), str(thought.get("oracle_focus", ""))


def trained_teacher(meta: dict, tokenizer) -> int | None:
    """The filler token of a checkpoint trained with thought.mode=teacher, else None."""
    thought = meta.get("config", {}).get("thought", {})
    if thought.get("mode") != "teacher":
        return None
    from .model import filler_token_id
    return filler_token_id(tokenizer, thought.get("filler", "..."))


def trained_filler_id(meta: dict, tokenizer) -> int | None:
    """The filler token of a checkpoint trained with thought.mode=filler, else None."""
    thought = meta.get("config", {}).get("thought", {})
    if thought.get("mode") != "filler":
        return None
    from .model import filler_token_id
    return filler_token_id(tokenizer, thought.get("filler", "..."))


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2",
                    help="QuietStarModel dir, DeepSpeed checkpoint/run dir, or base model name "
                         "(smollm2 = the embedded default, tiny-llama, HF dir or hub name)")
    ap.add_argument("--gguf_file", default=None, help="GGUF file inside --model (base models only)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention_backend", default="auto", choices=["auto", "dense", "split", "flex"],
                    help="auto: split (see qstar_ds.attention.AUTO_NOTE)")
    ap.add_argument("--thought_len", type=int, default=None, help="default: the model's training value or 8")
    ap.add_argument("--talk_positions", default=None, choices=list(TALK_POSITIONS),
                    help="thought.talk_positions; default: the model's training value or after_thought")


def check_model_arg(args: argparse.Namespace) -> None:
    """Fail early (before loading data) on a --model path that does not exist."""
    if args.model.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(args.model)):
        raise FileNotFoundError(f"--model={args.model!r}: no such directory")


def thought_config(loaded: Loaded, args: argparse.Namespace, **fields) -> ThoughtConfig:
    """The thought settings of an inference command: the model's own thought length and talk
    positions unless --thought_len / --talk_positions say otherwise, the resolved
    --attention_backend, and `fields`."""
    t = loaded.thought_len if args.thought_len is None else args.thought_len
    tp = getattr(args, "talk_positions", None) or loaded.talk_positions
    return ThoughtConfig(thought_len=t, attention_backend=args.attention_backend, talk_positions=tp, **fields)


def load_from_args(args: argparse.Namespace, device: str | None = None) -> Loaded:
    from .attention import resolve_backend
    check_model_arg(args)
    loaded = load_model(args.model, getattr(torch, args.dtype), device or args.device, args.gguf_file)
    args.attention_backend = resolve_backend(args.attention_backend)
    return loaded
