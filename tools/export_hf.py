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
    from qstar_ds.loading import model_from_checkpoint, trained_filler_id, trained_oracle, trained_teacher
    model, tok, meta, _ = model_from_checkpoint(checkpoint)
    model.to(getattr(torch, dtype or "float32"))
    sig = meta["signature"]
    filler = trained_filler_id(meta, tok)
    oracle, teacher = trained_oracle(meta, tok), trained_teacher(meta, tok)
    talk_positions = meta.get("config", {}).get("thought", {}).get("talk_positions", "after_thought")
    model.save_pretrained(out_dir, tokenizer=tok, extra={k: sig[k] for k in ("thought_len", "talk_len") if k in sig}
                          | {"talk_positions": talk_positions}
                          | {"step": meta.get("step")} | ({"filler_id": filler} if filler is not None else {})
                          | ({"oracle_filler_id": oracle[0], "oracle_focus": oracle[1]} if oracle is not None else {})
                          | ({"teacher_filler_id": teacher} if teacher is not None else {}))
    return out_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (step_XXXXXXXX) or a run's output_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    from qstar_ds.config import ConfigError
    try:
        print(export(args.checkpoint, args.out_dir, args.dtype))
    except (ConfigError, FileNotFoundError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
