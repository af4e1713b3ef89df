#!/usr/bin/env bash
# One GPU session's checks for the performance issue, in one call (<= 9 min on an H100/H200):
# the backend equivalence tests on CUDA (FlexAttention values *and gradients* against the dense
# reference: CPU cannot run FlexAttention's backward), then tools/bench.py in bf16 with the flex
# backend on the SmolLM2-360M shape (MFU) and ref_tiny_mistral at thought_len 16.
# Expects transformers' wheel in .whl/ when the machine's transformers is older than ours.
set -u
. tools/gpu_env.sh
nvidia-smi -L
QSTAR_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_backends.py 2>&1 | tail -6
timeout 200 python3 tools/bench.py --preset smollm2_360m --device cuda --dtype bfloat16 --backend flex \
    --out "${OUT:-.}/bench_360m.json" 2>&1 | grep -v Warn
timeout 100 python3 tools/bench.py --preset ref_tiny_mistral --thought_len 16 --device cuda --dtype bfloat16 \
    --backend flex --modes fast,dense --out "${OUT:-.}/bench_mistral.json" 2>&1 | grep -v Warn
