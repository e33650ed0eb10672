#!/usr/bin/env bash
# Install keepgpu with its test dependencies and run the whole suite.
# torch is pinned and installed first so that pip never pulls a multi-GB CUDA build.
# The interpreter: $PYTHON, else python3 when pip may install into it (CI), else .venv of this
# checkout (stock Debian/Ubuntu python3 is externally managed). tests/slurm builds its own venv
# for the Slurm users (tests/slurm/cluster.sh, $KEEPGPU_SLURM_BUILD_PYTHON): not this one.
# As root, tests/slurm installs Slurm and munge with apt, creates test users and fake GPU
# device files: KEEPGPU_SKIP_SLURM=1 leaves all of that out.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pyenv.sh
pick_python
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
# Most tests wait on real processes rather than compute: several pytest workers overlap those
# waits (the Slurm tests keep to one worker, see tests/conftest.py). KEEPGPU_TEST_JOBS=0 runs
# everything in this one process.
jobs=${KEEPGPU_TEST_JOBS:-3}
if [[ $jobs == 0 ]]; then
    exec "$PY" -m pytest -q "$@"
fi
exec "$PY" -m pytest -q -n "$jobs" --dist loadgroup "$@"
