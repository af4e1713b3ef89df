#!/usr/bin/env bash
# One GPU session's checks for the core: the equivalence and rollout tests on CUDA, then
# fast-path step timings (tools/bench.py) of SmolLM2-shaped models. Expects transformers' wheel in .whl/ when the
# machine's transformers is older than the one we pin.
set -u
. tools/gpu/env.sh
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
QSTAR_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_equivalence.py tests/test_rollout.py 2>&1 | tail -6
for dt in float32 bfloat16; do
  timeout 120 python3 tools/bench.py --preset smollm2 --device cuda --dtype $dt --modes fast --reps 2 --out "${OUT:-.}/bench_$dt.json"
done
timeout 150 python3 tools/bench.py --preset smollm2_360m --device cuda --dtype bfloat16 --thought_len 16 --modes fast --reps 1 \
  --out "${OUT:-.}/bench_360m_t16.json"
