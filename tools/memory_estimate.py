"""GPU memory per rank of a qstar_ds run under ZeRO-3: model states + the learn micro-step's
activations + the rollout's KV cache, computed, not guessed.

    python tools/memory_estimate.py                                   # mistral7b_owm on 8 x 8 GPUs
    python tools/memory_estimate.py --preset mistral7b_owm --nodes 8 --gpus_per_node 8 --chunk_tokens 4096
    python tools/memory_estimate.py --preset smollm2 --nodes 1 --gpus_per_node 1 --hf_config path/to/config.json

Model states: DeepSpeed's own estimator, deepspeed.runtime.zero.stage3.
estimate_zero3_model_states_mem_needs (fp32 master + Adam moments + bf16 params/grads, 18 bytes
per parameter partitioned over all ranks, plus the largest layer gathered; no offload), plus
ZeRO-3's working set of gathered parameters (prefetch bucket + the live layer; the config's
stage3_prefetch_bucket_size).

Activations of one learn micro-step (one chunk of `chunk_tokens` packed tokens: n base tokens and
whole thought streams of t + K + 1 tokens), with the trainer's settings: gradient checkpointing of
every decoder layer, the split attention backend and the vocabulary-chunked losses. Assumed sizes
(bytes b = 2 for bf16; per token unless said):
- checkpointed layer inputs kept for backward: layers x H x b
- one layer recomputed in backward with autograd: (4 H + q + 2 kv + 3 I) x b  [norms, residual,
  attention output, o_proj input; q/k/v projections; MLP gate, up, act*up]
- split attention inside that layer: heads x (n + L) scores and probabilities, x 2 x b for stream
  tokens (base tokens: heads x n); one layer at a time
- logits: loss_chunk_tokens x V x 4 bytes x 3 (fp32 logits, softmax, their gradient)
- hidden states of the chunk at the head: 3 x H x 4 bytes (base, thought, mixed; fp32 for the losses)
Rollout (no grad; a rank's units of the step in one forward, train.rollout_batch caps it): per
unit, the KV cache of the base and its streams, layers x 2 x kv x (n + M_u (t + 2 + K)) x b, and
the logits of one decoding step, M_u x V x 4 bytes; plus the whole model held gathered
(params x b) where train.rollout_gather holds it (auto: at most half of --gpu_gib).
Peak = model states + max(gathered params + learn activations, held or gathered params +
rollout). Chunks and rollout units follow the trainer's plan for the world size. Not counted: CUDA
context and allocator fragmentation (typically +1-3 GiB), NCCL buffers, DeepSpeed's bucket
buffers (reduce_bucket_size x 2 x b).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 1024 ** 3

# shapes of the presets' models, so the tool works without the hub (override with --hf_config)
KNOWN = {
    "mistralai/Mistral-7B-v0.1": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                                      tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-360M": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                                       num_key_value_heads=5, intermediate_size=2560, vocab_size=49152,
                                       tie_word_embeddings=True),
}


def param_counts(c: dict) -> tuple[int, int]:
    """(total parameters, largest single layer's parameters) of a Llama/Mistral-style model,
    including the two thought-token rows and the mixing head (2H*H + H*H + H)."""
    H, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"] + 2
    head_dim = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    attn = H * H + 2 * H * kv + H * H
    mlp = 3 * H * I
    layer = attn + mlp + 2 * H
    emb = V * H
    total = L * layer + emb * (1 if c.get("tie_word_embeddings") else 2) + H + (3 * H * H + 2 * H + 1) + 2 * H
    return total, max(layer, emb)


def estimate(c: dict, cfg, nodes: int, gpus_per_node: int, loss_chunk: int, gpu_gib: float = 80.0,
             prefetch_bucket: float = 5e7, b: int = 2) -> dict:
    """Per-GPU memory of `cfg` (a qstar_ds Config) on nodes x gpus_per_node GPUs, with the
    trainer's own step plan (schedule.plan_step, schedule.rollout_units) for that world size."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from qstar_ds.schedule import plan_step, rollout_units

    H, I, Lyr, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"] + 2
    heads = c["num_attention_heads"]
    head_dim = H // heads
    kv = c["num_key_value_heads"] * head_dim
    n, t, K, r = cfg.data.seq_len, cfg.thought.thought_len, cfg.thought.talk_len, cfg.thought.n_thoughts
    world = nodes * gpus_per_node
    total, largest = param_counts(c)
    _, states, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes, cpu_offload=False,
                                                         cpu_offload_params=False, zero_init=True)
    gathered = (prefetch_bucket + largest) * b
    L = t + K + 1
    plan = plan_step(cfg, world)
    per = plan.streams_per_chunk
    C = n + per * L                                                  # packed tokens of one chunk
    ckpt_inputs = Lyr * C * H * b
    layer_recompute = C * (4 * H + H + 2 * kv + 3 * I) * b
    attn = (per * L * heads * (n + L) + n * heads * n) * 2 * b
    logits = min(loss_chunk or C, C) * V * 4 * 3
    head = C * 3 * H * 4
    learn = ckpt_inputs + layer_recompute + attn + logits + head
    units = rollout_units(cfg.train.batch_size, cfg.think_positions, world)
    per_rank = -(-len(units) // world)
    rows = min(cfg.train.rollout_batch or per_rank, per_rank)          # units in one rollout forward
    Mu = max(bb - a for _, a, bb in units) * r                          # streams of one unit
    rollout = rows * (Lyr * 2 * kv * (n + Mu * (t + 2 + K)) * b + Mu * V * 4)
    held = total * b if cfg.train.rollout_gather == "always" or (
        cfg.train.rollout_gather == "auto" and total * b <= 0.5 * gpu_gib * GiB) else 0
    peak = states + max(gathered + learn, max(gathered, held) + rollout)
    return {"params": total, "largest_layer_params": largest, "ranks": world,
            "streams_per_sequence": plan.n_streams, "streams_per_chunk": per, "chunk_tokens_used": C,
            "chunks_per_sequence": plan.chunks_per_seq, "rollout_units_per_forward": rows,
            "streams_per_rollout_unit": Mu, "model_held_in_rollout": bool(held),
            "GiB": {"model_states (DeepSpeed estimator)": states / GiB, "gathered params (prefetch + layer)": gathered / GiB,
                    "learn: checkpointed layer inputs": ckpt_inputs / GiB, "learn: one layer recomputed": layer_recompute / GiB,
                    "learn: split attention (one layer)": attn / GiB, "learn: logits (chunked)": logits / GiB,
                    "learn: head states": head / GiB, "learn total": learn / GiB,
                    "rollout: whole model held": held / GiB, "rollout: KV cache + logits": rollout / GiB,
                    "peak per GPU": peak / GiB}}


def main(argv=None) -> int:
    from qstar_ds.cli import make_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mistral7b_owm")
    ap.add_argument("--hf_config", default=None, help="a config.json (default: the preset model's known shape)")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus_per_node", type=int, default=8)
    ap.add_argument("--chunk_tokens", type=int, default=None, help="default: the preset's train.chunk_tokens")
    ap.add_argument("--loss_chunk_tokens", type=int, default=None, help="default: the preset's, or 1024 if 0")
    ap.add_argument("--seq_len", type=int, default=None)
    ap.add_argument("--thought_len", type=int, default=None)
    ap.add_argument("--gpu_gib", type=float, default=80.0, help="GPU memory (decides train.rollout_gather=auto)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = make_config(args.preset)
    if args.hf_config:
        with open(args.hf_config) as f:
            shape = json.load(f)
    elif cfg.model.name in KNOWN:
        shape = KNOWN[cfg.model.name]
    else:
        print(f"memory_estimate: error: no built-in shape for model {cfg.model.name!r}; pass --hf_config", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("data.seq_len", args.seq_len), ("thought.thought_len", args.thought_len),
                                   ("train.chunk_tokens", args.chunk_tokens)) if v}
    cfg = make_config(args.preset, None, overrides)
    n, t, chunk = cfg.data.seq_len, cfg.thought.thought_len, cfg.train.chunk_tokens
    loss_chunk = args.loss_chunk_tokens or cfg.thought.loss_chunk_tokens or 1024
    est = estimate(shape, cfg, args.nodes, args.gpus_per_node, loss_chunk, args.gpu_gib)
    if args.json:
        print(json.dumps(est, indent=1))
        return 0
    print(f"{cfg.model.name}: {est['params'] / 1e9:.2f} B parameters on {args.nodes} x {args.gpus_per_node} = "
          f"{est['ranks']} GPUs, ZeRO-3 bf16, n={n} t={t} K={cfg.thought.talk_len} r={cfg.thought.n_thoughts}; "
          f"chunk {chunk} tokens = base + {est['streams_per_chunk']} streams "
          f"({est['chunks_per_sequence']} chunks per sequence), loss chunk {loss_chunk}; rollout "
          f"{est['rollout_units_per_forward']} unit(s) of {est['streams_per_rollout_unit']} streams per forward"
          f"{', whole model held' if est['model_held_in_rollout'] else ''}")
    for k, v in est["GiB"].items():
        print(f"  {k:<40} {v:8.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
