#!/bin/bash
# The paper's run at scale: Mistral-7B on OpenWebMath, 8 nodes x 8 GPUs, ZeRO-3, requeued on
# pre-emption and on the time limit (SIGUSR1 five minutes before it: save, exit, requeue, resume).
#
#   sbatch slurm/owm_8node.sh                                    (from the repository root)
#   sbatch -A myacct -p gpu slurm/owm_8node.sh --max_steps 200   (sbatch options, then train.py ones)
#   OUTPUT_DIR=/scratch/me/owm1 sbatch slurm/owm_8node.sh --optim.lr 2e-6
#
# The rendezvous, signal handling and requeue logic are in slurm/train.sh; this file only sets the
# allocation and the defaults of this experiment.
#SBATCH --job-name=qstar-owm
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

export PRESET=${PRESET:-mistral7b_owm}
export DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
export OUTPUT_DIR=${OUTPUT_DIR:-runs/owm_8node}
export QSTAR_ROOT=${QSTAR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
exec bash "$QSTAR_ROOT/slurm/train.sh" "$@"
