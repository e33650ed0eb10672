#!/usr/bin/env bash
# keepgpu in one minute, on any machine (no GPU needed: the fake engine stands in for GPUs).
# Installs keepgpu, holds 4 fake GPUs, kills a worker and watches it come back, then releases
# everything and checks that no keepgpu process is left. Where python3 refuses pip installs
# (stock Debian/Ubuntu) it installs into .venv of this checkout instead; PYTHON=... picks one.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pyenv.sh
pick_python
"$PY" -m pip install -q --disable-pip-version-check -e .
# The keepgpu-* commands of that interpreter, wherever pip put them.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export KEEPGPU_ENGINE=${KEEPGPU_ENGINE:-fake}
NAME=quickstart-$$

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "keepgpu-supervise --engine $KEEPGPU_ENGINE --gpus 0,1,2,3 --name $NAME --detach"
keepgpu-supervise --gpus 0,1,2,3 --name "$NAME" --detach --heartbeat 0.5 --restart-delay 0.5
sleep 1.5
keepgpu-ctl --name "$NAME" status

victim=$(keepgpu-ctl --name "$NAME" status --json \
  | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["gpus"][2]["pid"])')
step "kill -9 $victim (the worker of GPU 2)"
kill -9 "$victim"
for _ in $(seq 50); do
  back=$(keepgpu-ctl --name "$NAME" status --json | "$PY" -c \
    'import json,sys; g=json.load(sys.stdin)["gpus"][2]; print(g["state"] == "holding" and g["pid"] != '"$victim"')')
  [ "$back" = True ] && break
  sleep 0.1
done
keepgpu-ctl --name "$NAME" status

step "keepgpu-ctl stop"
pids=$(keepgpu-ctl --name "$NAME" status --json | "$PY" -c \
  'import json,sys; d=json.load(sys.stdin); print(" ".join(str(p) for p in [d["supervisor"]["pid"]] + [g["pid"] for g in d["gpus"]] if p))')
keepgpu-ctl --name "$NAME" stop
"$PY" - $pids <<'PY'
import sys, psutil
left = []
for pid in map(int, sys.argv[1:]):
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:  # a zombie holds nothing
            left.append(pid)
    except psutil.NoSuchProcess:
        pass
if left:
    sys.exit(f"processes still alive: {left}")
print(f"no keepgpu process left (checked pids {' '.join(sys.argv[1:])})")
PY
