#!/usr/bin/env bash
# The GPU check of keepgpu, sized for the device budget (one NVIDIA GPU, <= 6 minutes).
#
#   scripts/gpu-check.sh                 on your own machine (network): downloads the wheels the
#                                        GPU machine lacks into ./.whl and prints the one command
#                                        to run there
#   scripts/gpu-check.sh --on-gpu OUT    on the GPU machine: installs ./.whl into /tmp/site, runs
#                                        tests/gpu/test_gpu_torch_engine.py and bench/gpu_check.py,
#                                        writes JSON + logs under OUT
# Exit codes (--on-gpu): 0 every check passed, 1 some failed, 2 no GPU / pyzmq (one line,
# nothing measured). Never fakes a GPU.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}

if [ "${1:-}" != "--on-gpu" ]; then
    [ $# -eq 0 ] || { echo "usage: scripts/gpu-check.sh [--on-gpu OUT_DIR]" >&2; exit 2; }
    cd "$root" || exit 2
    exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" \
        && { grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"; }
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl pyzmq keep-gpu==1.0.0 || {
        echo "gpu-check: could not download the pyzmq / keep-gpu wheels into .whl" >&2; exit 1; }
    ls .whl >&2
    echo "gpu-check: wheels ready. On the GPU machine (carry .whl), run:" >&2
    echo 'scripts/gpu-check.sh --on-gpu "$OUT"'
    exit 0
fi

out=${2:?usage: scripts/gpu-check.sh --on-gpu OUT_DIR}
mkdir -p "$out"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU here (nvidia-smi finds none); run it on the GPU machine" >&2
    exit 2
fi
if ! "$py" -c 'import zmq' 2>/dev/null; then
    if [ -d "$root/.whl" ] && ls "$root"/.whl/pyzmq-*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --target /tmp/site "$root"/.whl/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
"$py" -c 'import zmq' 2>/dev/null || {
    echo "gpu-check: pyzmq not importable: run scripts/gpu-check.sh on a networked machine first and carry .whl" >&2
    exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv > "$out/nvidia-smi.csv" 2>&1

rc=0
echo "== engine tests ($(date -u +%H:%M:%S))" >&2
timeout 90 "$py" -m pytest -q -rs -p no:cacheprovider "$root/tests/gpu/test_gpu_torch_engine.py" \
    --junitxml="$out/engine-tests.xml" > "$out/engine-tests.log" 2>&1 || rc=1
tail -3 "$out/engine-tests.log" >&2
echo "== gpu_check ($(date -u +%H:%M:%S))" >&2
timeout 360 "$py" "$root/bench/gpu_check.py" --out "$out" 2>&1 | tee "$out/gpu_check.log" >&2
check=${PIPESTATUS[0]}
[ "$check" -eq 2 ] && exit 2
[ "$check" -ne 0 ] && rc=1
echo "gpu-check: done (rc $rc); results in $out" >&2
exit $rc
