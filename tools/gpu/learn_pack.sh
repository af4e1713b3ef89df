#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repository root, before a GPU session's learning
# experiment (tools/gpu/learn.sh). The GPU machine reaches nothing and a device call carries at
# most 64 MiB, so what it cannot fetch travels in two ignored folders, one per call:
#   .gpu_a/  wheels the GPU image lacks, the corpus (gzipped), the first part of SmolLM2-135M's GGUF
#   .gpu_b/  the rest of the GGUF
# Usage: bash tools/gpu/learn_pack.sh [CORPUS.jsonl]   (default: the shared OWM sample)
set -euo pipefail
corpus=${1:-../shared/data/owm_sample/text.jsonl}
limit=$((64 * 1024 * 1024))
[ -f "$corpus" ] || { echo "learn_pack.sh: corpus $corpus: no such file" >&2; exit 2; }
gguf=$(python3 -c "import os; from qstar_ds.hub import smollm2_dir, SMOLLM2_GGUF; print(os.path.join(smollm2_dir(), SMOLLM2_GGUF))")
rm -rf .gpu_a .gpu_b
mkdir -p .gpu_a/whl .gpu_b
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
# The GPU image (device KINDS.md) has torch, numpy, pyyaml, tokenizers, safetensors, huggingface-hub,
# psutil, msgpack, ninja, py-cpuinfo, einops, tqdm; these are missing or older there. The versions
# are the ones installed here, which the test suite ran with.
pins=""
for p in gguf transformers pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson; do
  pins="$pins $p==$(ver $p)"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu_a/whl $pins
# DeepSpeed is published as a source archive only: build its pure-Python wheel (no ops) here.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .gpu_a/whl "deepspeed==$(ver deepspeed)"
gzip -9 -c "$corpus" > .gpu_a/corpus.jsonl.gz
python3 -c "from qstar_ds.hub import SMOLLM2_GGUF_SHA256 as s; print(s)" > .gpu_a/gguf.sha256
# Split the GGUF so that both calls carry about as much, the repository's own files included.
repo=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
size=$(stat -c %s "$gguf")
rest=$(du -sb .gpu_a | cut -f1)
first=$(( (size - rest) / 2 ))
head -c "$first" "$gguf" > .gpu_a/gguf.part0
tail -c +"$((first + 1))" "$gguf" > .gpu_b/gguf.part1
for d in .gpu_a .gpu_b; do
  total=$(( $(du -sb $d | cut -f1) + repo ))
  echo "$d: $(ls $d | tr '\n' ' ')-> $((total / 1048576)) MiB with the repository's files (limit 64)"
  [ "$total" -lt "$limit" ] || { echo "learn_pack.sh: $d would not fit one device call" >&2; exit 1; }
done
echo "next, on the device, two calls less than 30 s apart (the machine stays warm 30 s):"
echo '  run(command="bash tools/gpu/learn.sh stage", carry=[".gpu_a"], timeout_s=120)'
echo '  run(command="bash tools/gpu/learn.sh run", carry=[".gpu_b"], timeout_s=600)'
