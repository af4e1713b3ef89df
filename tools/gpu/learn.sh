#!/usr/bin/env bash
# A GPU session's "Does it learn?" experiment (README): tools/experiment.py's three arms x 2 seeds
# on SmolLM2-135M on one GPU, at a scale the CPU runs could not reach (4 x 256-token windows a
# step instead of 1 x 64). Prepare here first: bash tools/gpu/learn_pack.sh. Then two device calls
# less than 30 s apart (the machine stays warm 30 s, and keeps what the first call wrote):
#   run(command="bash tools/gpu/learn.sh stage", carry=[".gpu_a"], timeout_s=120)
#   run(command="bash tools/gpu/learn.sh run", carry=[".gpu_b"], timeout_s=600)
# `run` takes train.py overrides after it (they win over the defaults below); LEARN_STEPS,
# LEARN_SEEDS and LEARN_SECONDS (the experiment's share of the 10-minute call) change the budget.
# Everything comes back in $OUT: learn.log, summary.json, experiment.png, runs.tgz (metrics,
# evaluations, reports; no checkpoints).
set -u
stage=/tmp/qstar_gpu
out=${OUT:-/tmp/qstar_gpu_out}
mkdir -p "$out"
case "${1:-}" in
stage)
  [ -f .gpu_a/gguf.part0 ] || { echo "learn.sh stage: .gpu_a/gguf.part0 missing: carry .gpu_a, made here by tools/gpu/learn_pack.sh"; exit 2; }
  rm -rf "$stage" && mkdir -p "$stage" && cp -r .gpu_a/. "$stage"/ || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$stage/site" "$stage"/whl/*.whl || exit 1
  gunzip -f "$stage/corpus.jsonl.gz" || exit 1
  echo "learn.sh stage: staged in $stage; now, within 30 s: learn.sh run, carrying .gpu_b"
  ;;
run)
  shift
  [ -f "$stage/gguf.part0" ] || { echo "learn.sh run: $stage/gguf.part0 missing: the machine was given back since 'learn.sh stage' (it stays warm 30 s); run stage again"; exit 2; }
  [ -f .gpu_b/gguf.part1 ] || { echo "learn.sh run: .gpu_b/gguf.part1 missing: carry .gpu_b, made here by tools/gpu/learn_pack.sh"; exit 2; }
  mkdir -p "$stage/cache/smollm2"
  gguf="$stage/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat "$stage/gguf.part0" .gpu_b/gguf.part1 > "$gguf"
  [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat "$stage/gguf.sha256")" ] || { echo "learn.sh run: $gguf: sha256 differs from qstar_ds.hub's (parts from different packs?)"; exit 2; }
  export QSTAR_CACHE="$stage/cache" PYTHONPATH="$stage/site:$PWD" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/learn.log" 2>&1
  python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" >> "$out/learn.log" 2>&1
  python3 - <<'PY'
import json
ds = json.load(open("ds_configs/zero3.json"))
ds["optimizer"]["params"]["torch_adam"] = True   # skip FusedAdam's JIT build (a minute per run)
json.dump(ds, open("/tmp/zero3_torch_adam.json", "w"))
PY
  steps=${LEARN_STEPS:-60}
  exp=(python3 tools/experiment.py --out "$stage/exp" --preset smollm2 --steps "$steps" --save_every 100000
       --launch "torchrun --nproc_per_node 1")
  train=(--ds_config /tmp/zero3_torch_adam.json --data.source "$stage/corpus.jsonl"
         --data.seq_len 256 --train.batch_size 4 --train.chunk_tokens 16384 --thought.beta 1
         --thought.temperature 0.1 --eval.temperature 0.1 --train.eval_every $((steps / 2))
         --eval.sequences 96 "$@")
  set -o pipefail
  timeout "${LEARN_SECONDS:-480}" "${exp[@]}" --seeds "${LEARN_SEEDS:-0,1}" -- "${train[@]}" 2>&1 | tee -a "$out/learn.log"
  rc=$?
  if [ $rc -ne 0 ] && [ ! -f "$stage/exp/summary.json" ]; then
    # Out of time (or a run failed): the table of what finished, seed 0 alone, if its three arms did.
    echo "learn.sh: experiment stopped (exit $rc); the table of seed 0 alone, if its arms finished:" | tee -a "$out/learn.log"
    timeout 60 "${exp[@]}" --seeds 0 --no_content_check -- "${train[@]}" 2>&1 | tee -a "$out/learn.log"
  fi
  cp "$stage/exp/summary.json" "$stage/exp/experiment.png" "$out"/ 2>/dev/null
  tar czf "$out/runs.tgz" --exclude=checkpoints --exclude=hf_template -C "$stage" exp
  ls -la "$out"
  ;;
*)
  echo "usage: bash tools/gpu/learn.sh stage | run [TRAIN.PY OVERRIDES]  (see the comment at the top)"; exit 2
  ;;
esac
