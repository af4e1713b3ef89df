#!/usr/bin/env bash
# One GPU session's checks for the performance issue, in one call (<= 8 min on an H100/H200):
# the backend equivalence tests on CUDA (FlexAttention values *and gradients* against the dense
# reference in float32 -- its CUDA kernels have no float64 -- and split in float64 and float32: CPU
# cannot run FlexAttention's backward), then tools/bench.py in bf16 on the SmolLM2-360M shape at
# batch 4 (MFU against the 989 TFLOP/s bf16 dense peak of an H100/H200): fast (flex), dense, plain,
# and the fast path with the split backend (what `auto` picks) for comparison.
# Expects transformers' wheel in .whl/ when the machine's transformers is older than ours.
# Logs go to $OUT (they come back even when a step times out).
set -u
. tools/gpu/env.sh
O="${OUT:-.}"
{ nvidia-smi -L; python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$O/env.txt"
QSTAR_TEST_DEVICE=cuda timeout 170 python3 -m pytest -v -rf -p no:cacheprovider tests/test_backends.py 2>&1 \
    | grep -v Warn > "$O/tests.log"; tail -25 "$O/tests.log"
B="python3 tools/bench.py --preset smollm2_360m --device cuda --dtype bfloat16 --batch 4 --peak_tflops 989"
timeout 230 $B --backend flex --out "$O/bench_360m_flex.json" 2>&1 | grep -v Warn | tee "$O/bench_flex.txt"
timeout 70 $B --backend split --modes fast --out "$O/bench_360m_split.json" 2>&1 | grep -v Warn | tee "$O/bench_split.txt"
