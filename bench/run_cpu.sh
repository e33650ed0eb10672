#!/usr/bin/env bash
# Run every CPU-level benchmark (keepgpu's fake engine; any Linux machine, no GPU), then render
# RESULTS.md and the plots.
#   bench/run_cpu.sh [OUT_DIR]        (default: bench/results; about 11 minutes on 2 cores)
# Each benchmark waits (at most 2 minutes) for the machine to be quiet before it starts.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/results}
py=${PYTHON:-python3}
mkdir -p "$out"
failed=()
for bench in cpu_start cpu_restart cpu_stop cpu_idle cpu_rtt cpu_metrics cpu_yield; do
    echo "== $bench" >&2
    "$py" "$here/$bench.py" --out "$out" || failed+=("$bench")
done
if [ "$out" = "$here/results" ]; then
    "$py" "$here/render.py" || failed+=(render)
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
