#!/bin/bash
#SBATCH --job-name=multinode-prepare-then-train
#SBATCH --nodes=4
#SBATCH --gres=gpu:2
#SBATCH --time=04:00:00
#
# Hold the GPUs of all 4 nodes while the shards are prepared, release them right before training.
# `keepgpu-job start` runs one background step with a keeper on every node (job-$SLURM_JOB_ID.0)
# and returns once every node's GPUs hold, naming any node that failed; each node's Epilog removes
# its keeper if this script never gets to `stop`.
set -euo pipefail
KEEPGPU_JOB=${KEEPGPU_JOB:-/etc/slurm/keepgpu/keepgpu-job}

"$KEEPGPU_JOB" start || echo "keepgpu: not every GPU held (exit $?), continuing" >&2

srun --ntasks-per-node=1 python prepare_shards.py   # runs alongside the keepers (--overlap)

"$KEEPGPU_JOB" stop             # returns once every node's workers are gone
srun python train.py
