#!/usr/bin/env bash
# One GPU session's checks for the core: the equivalence and rollout tests on CUDA, then
# core_step timings of a SmolLM2-shaped model. Expects transformers' wheel in .whl/ when the
# machine's transformers is older than the one we pin.
set -u
. tools/gpu_env.sh
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
QSTAR_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_equivalence.py tests/test_rollout.py 2>&1 | tail -6
for dt in float32 bfloat16; do
  timeout 120 python3 tools/core_step.py --model random-smollm2 --device cuda --dtype $dt --steps 2
done
timeout 150 python3 tools/core_step.py --model random-smollm2 --device cuda --dtype bfloat16 --n 256 --thought_len 16 --steps 1
