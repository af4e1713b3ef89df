#!/usr/bin/env bash
# One GPU session's check of the trainer, unchanged code on CUDA (NCCL, bf16 by "auto"):
# train the debug preset 4 steps with checkpoints, resume to 6, export; then the SmolLM2-shaped
# core step timings. Wheels for packages the GPU image lacks travel in .whl/.
set -u
. tools/gpu/env.sh
export PYTHONWARNINGS=ignore
out=${OUT:-/tmp}
python3 - <<'PY'
import json
ds = json.load(open("ds_configs/zero3.json"))
ds["optimizer"]["params"]["torch_adam"] = True   # skip the ~1 min FusedAdam JIT build here
json.dump(ds, open("/tmp/zero3_torch_adam.json", "w"))
PY
common="--preset debug_cpu --ds_config /tmp/zero3_torch_adam.json --output_dir /tmp/g1 --train.save_every 2"
timeout 200 torchrun --nproc_per_node 1 qstar_ds/train.py $common --max_steps 4 2>&1 | grep -E "qstar_ds|error|Error" | head -5
timeout 200 torchrun --nproc_per_node 1 qstar_ds/train.py $common --max_steps 6 2>&1 | grep -E "qstar_ds|error|Error" | head -5
cut -c1-400 /tmp/g1/metrics.jsonl
timeout 120 python3 tools/export_hf.py /tmp/g1 /tmp/g1_hf 2>&1 | tail -1
python3 -c "from qstar_ds.model import QuietStarModel; m = QuietStarModel.from_pretrained('/tmp/g1_hf'); print('export loads', m.base.dtype, m.thought_embeds.shape)"
# SmolLM2-135M shape (random weights), the paper's n=256, r=2, K=4, thought 8 and 16, bf16:
for t in 8 16; do
  timeout 240 torchrun --nproc_per_node 1 qstar_ds/train.py --preset smollm2 --model.name random-smollm2 \
    --ds_config /tmp/zero3_torch_adam.json --output_dir /tmp/g2_$t --max_steps 3 --train.save_every 0 \
    --data.seq_len 256 --thought.thought_len $t --train.batch_size 4 --train.chunk_tokens 16384 2>&1 | grep -E "qstar_ds|rror" | head -3
  python3 -c "import json; [print({k: round(v, 3) if isinstance(v, float) else v for k, v in json.loads(l).items() if k in ('step','loss','step_time_s','rollout_time_s','tokens_per_s','peak_gpu_gb')}) for l in open('/tmp/g2_$t/metrics.jsonl')]"
done
