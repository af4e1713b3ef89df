"""Turn a qstar_ds DeepSpeed checkpoint into a HF-format directory that QuietStarModel loads
without DeepSpeed: safetensors weights, config, tokenizer with the thought tokens, mixing head.

    python tools/export_hf.py OUTPUT_DIR/checkpoints/step_00000100 EXPORT_DIR [--dtype float32]
    python tools/export_hf.py OUTPUT_DIR EXPORT_DIR          # newest complete checkpoint

Runs on CPU in one process: DeepSpeed's zero_to_fp32 merges the ZeRO shards of every rank.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def export(checkpoint: str, out_dir: str, dtype: str | None = None) -> str:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    from qstar_ds.checkpoint import read_meta, resolve_resume
    from qstar_ds.model import QuietStarModel, ThoughtTokens, load_tokenizer

    path = resolve_resume(checkpoint, checkpoint)          # a tag dir, or the newest under a run dir
    meta = read_meta(path)
    template = meta["template"]
    if not os.path.isdir(template):
        raise FileNotFoundError(f"{template} (base config + tokenizer written at the start of training) is missing")
    ckpt_dir, tag = os.path.split(path.rstrip("/"))
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    config = AutoConfig.from_pretrained(template)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sig = meta["signature"]
    tokens = ThoughtTokens(sig["sot_id"], sig["eot_id"])
    tok = load_tokenizer(template, tokens)
    model = QuietStarModel(base, tokens)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"base.lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        model.base.tie_weights()
    model.to(getattr(torch, dtype or "float32"))
    model.save_pretrained(out_dir, tokenizer=tok)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (step_XXXXXXXX) or a run's output_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    print(export(args.checkpoint, args.out_dir, args.dtype))


if __name__ == "__main__":
    main()
