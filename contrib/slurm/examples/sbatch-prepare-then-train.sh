#!/bin/bash
#SBATCH --job-name=prepare-then-train
#SBATCH --gres=gpu:2
#SBATCH --time=04:00:00
#
# Hold this job's GPUs while the data is prepared on the CPU, release them right before training.
# The keeper is named job-$SLURM_JOB_ID; the node's Epilog removes it if this script never gets to
# `stop` (scancel, time limit, an error above it).
set -euo pipefail
KEEPGPU_JOB=${KEEPGPU_JOB:-/etc/slurm/keepgpu/keepgpu-job}

# Returns once every GPU holds (a second or so; a few with torch). A keeper that cannot start
# must not cost the job: say so and go on.
"$KEEPGPU_JOB" start || echo "keepgpu: GPUs not held (exit $?), continuing" >&2

python prepare_data.py          # CPU work: the GPUs are idle but held and look busy

"$KEEPGPU_JOB" stop             # returns once the keeper's memory is free (under a second)
srun python train.py
