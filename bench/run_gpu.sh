#!/usr/bin/env bash
# Run the GPU-level benchmarks on the device machine (one NVIDIA GPU, torch with CUDA,
# nvidia-ml-py, psutil, click; pyzmq and keep-gpu 1.0.0 brought as wheels in ./.whl).
#   bench/run_gpu.sh OUT_DIR [PART ...]
# Writes one result JSON per benchmark and a log per part into OUT_DIR; copy the JSON files into
# bench/results/ and run bench/render.py afterwards. Without a GPU every part stops at once with
# exit code 2 and says so: nothing is faked.
#
# PART (device time, approximate)       what
#   release-interference   (~6 min)     gpu_release, then gpu_interference
#   signal-duty            (~7 min)     keepgpu duty 10 / 30 / 60, 120 s each
#   signal-peer-start      (~6 min)     KeepGPU defaults and --interval 1, 120 s each; gpu_start
#   signal-modes           (~7 min)     keepgpu sm / compute / pstate, 120 s each
#   all                    (~26 min)    the four above in this order
# One device call may run at most 10 minutes: give one or two parts per call, in the order above
# (most decisive first), e.g.  bench/run_gpu.sh "$OUT" release-interference
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${1:?usage: bench/run_gpu.sh OUT_DIR [PART ...]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(all)
py=${PYTHON:-python3}
mkdir -p "$out"

# Bring pyzmq and keep-gpu from ./.whl (no network on the device machine).
if ! "$py" -c 'import zmq, keep_gpu' 2>/dev/null; then
    if [ -d /tmp/site/zmq ] || { [ -d "$root/.whl" ] && "$py" -m pip install -q --no-index \
            --no-deps --target /tmp/site "$root"/.whl/*.whl; }; then
        export PYTHONPATH=/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
"$py" -c 'import zmq, keep_gpu, keepgpu' || {
    echo "run_gpu: pyzmq, keep-gpu or keepgpu not importable (see bench/README.md)" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit \
    --format=csv >&2

failed=()
run() {  # run NAME SCRIPT ARGS...
    local name=$1; shift
    echo "== $name: $* ($(date -u +%H:%M:%S))" >&2
    "$py" "$here/$1" --out "$out" "${@:2}" 2>&1 | tee -a "$out/$name.log" >&2
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 2 ] && { echo "run_gpu: no GPU; stopping" >&2; exit 2; }
    [ "$rc" -ne 0 ] && failed+=("$name")
}
part() {
    case $1 in
        release-interference)
            run gpu_release gpu_release.py
            run gpu_interference gpu_interference.py ;;
        signal-duty)
            run signal-duty gpu_signal.py --configs keepgpu-duty10,keepgpu-duty30,keepgpu-duty60 ;;
        signal-peer-start)
            run signal-peer gpu_signal.py --configs KeepGPU-default,KeepGPU-interval1
            run gpu_start gpu_start.py --reps 2 ;;
        signal-modes)
            run signal-modes gpu_signal.py --configs keepgpu-sm,keepgpu-compute,keepgpu-pstate ;;
        all)
            for p in release-interference signal-duty signal-peer-start signal-modes; do
                part "$p"
            done ;;
        *) echo "run_gpu: unknown part $1" >&2; exit 64 ;;
    esac
}
for p in "${parts[@]}"; do part "$p"; done
if [ ${#failed[@]} -gt 0 ]; then
    echo "run_gpu: FAILED: ${failed[*]} (see $out/*.log and the result files)" >&2
    exit 1
fi
echo "run_gpu: done; results in $out" >&2
