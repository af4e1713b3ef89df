#!/bin/bash
# qstar_ds on SLURM, any preset: one task per GPU, DeepSpeed ZeRO-3, requeue on pre-emption.
#
#   sbatch [sbatch options] slurm/train.sh [train.py arguments...]          (from the repository root)
#   PRESET=smollm2 OUTPUT_DIR=runs/smol sbatch --nodes=2 slurm/train.sh --max_steps 200
#
# sbatch options on the command line override the #SBATCH lines below (account, partition, nodes,
# tasks and GPUs per node, time). Arguments after the script go to train.py unchanged, after the
# ones this script sets, so they win (e.g. --preset, --output_dir, --train.save_every 100).
#SBATCH --job-name=qstar
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail

# ---- what users adapt (environment variables override these defaults) ----------------------
PRESET=${PRESET:-smollm2}                           # debug_cpu | smollm2 | mistral7b_owm
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}       # any ds_configs/*.json or your own
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-qstar}-${PRESET}}   # one per run: requeues resume from it
QSTAR_ROOT=${QSTAR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}} # the repository (sbatch runs a spooled copy of this file)
PYTHON=${PYTHON:-python}                            # e.g. /path/to/venv/bin/python
SRUN_ARGS=${SRUN_ARGS:-}                            # extra srun options (e.g. --mpi=pmix)

cd "$QSTAR_ROOT" || { echo "qstar_ds: QSTAR_ROOT=$QSTAR_ROOT does not exist" >&2; exit 2; }

# ---- rendezvous: from the allocation, the same on every node --------------------------------
# torch.distributed's master: the first node's NodeAddr from slurmctld (names of emulated or
# multi-homed nodes need not resolve); train.py maps SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS
# to RANK/LOCAL_RANK/WORLD_SIZE itself.
MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$MASTER_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-$MASTER_NODE}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # per job: jobs sharing a node do not collide

# ---- NCCL / runtime settings (one line each; all harmless on CPU-only test clusters) --------
export NCCL_ASYNC_ERROR_HANDLING=1           # a failed rank aborts collectives instead of hanging forever
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1     # the same for torch >= 2.2's name of the variable
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}        # INFO when debugging the network topology
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}   # bootstrap over real interfaces, not loopback/docker
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0} # keep InfiniBand on; set 1 on clusters without IB
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}   # no CPU oversubscription by torch
export TOKENIZERS_PARALLELISM=false          # HF tokenizers' threads fight the data loader otherwise
export PYTHONUNBUFFERED=1                    # per-rank lines reach the job log as they happen
export WANDB_MODE=${WANDB_MODE:-offline}     # compute nodes often have no internet: sync later

echo "qstar_ds: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} node(s) x" \
     "${SLURM_NTASKS_PER_NODE:-?} task(s); master ${MASTER_ADDR}:${MASTER_PORT}; preset ${PRESET}; output ${OUTPUT_DIR}"

# ---- run; on the warning signal (or SIGTERM) forward it, let train.py save, then requeue -----
PREEMPTED=""
forward() {
  PREEMPTED=$1
  echo "qstar_ds: batch script got SIG$1: forwarding to the ranks (they save after the current step)"
  kill -s "$1" "$SRUN_PID" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --kill-on-bad-exit=1 $SRUN_ARGS "$PYTHON" qstar_ds/train.py --ds_config "$DS_CONFIG" --preset "$PRESET" \
    --output_dir "$OUTPUT_DIR" --resume auto "$@" &
SRUN_PID=$!
while true; do
  wait "$SRUN_PID"; RC=$?
  # > 128: `wait` was interrupted by a trapped signal; keep waiting while srun runs
  [ "$RC" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null && continue
  break
done
if [ "$RC" -gt 128 ]; then   # srun ended right after the signal: fetch its own status
  wait "$SRUN_PID" 2>/dev/null; R2=$?; [ "$R2" -ne 127 ] && RC=$R2
fi

if [ -n "$PREEMPTED" ] && [ "$RC" -eq 0 ]; then
  echo "qstar_ds: checkpoint written after SIG${PREEMPTED}; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$RC"
