#!/usr/bin/env bash
# Install keepgpu with its test dependencies and run the whole suite.
# torch is pinned and installed first so that pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
exec "$PY" -m pytest -q "$@"
