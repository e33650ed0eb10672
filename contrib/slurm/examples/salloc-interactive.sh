#!/bin/bash
# Interactive allocations (salloc): two ways to keep the GPUs while you work in the shell.
# Not meant to be run as is: copy the lines you need.

# 1. With the Prolog keeper (the admin set KEEPGPU_PROLOG_KEEP=comment, see docs/slurm.md):
#    the GPUs are held from the allocation until your first srun step starts.
salloc --gres=gpu:2 --comment=keepgpu --time=02:00:00
#   ... edit, debug, prepare data on the login/allocation shell ...
#   srun python train.py          # the keeper releases the GPUs before this task starts

# 2. With an interactive step on the node (LaunchParameters=use_interactive_step, or
#    `srun --pty bash` inside salloc): start and stop the keeper yourself, as in a batch script.
salloc --gres=gpu:2 --time=02:00:00
#   keepgpu-job start             # holds the allocation's GPUs
#   ... work ...
#   keepgpu-job stop              # before your own GPU work
#   python train.py
