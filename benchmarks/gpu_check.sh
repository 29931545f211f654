#!/usr/bin/env bash
# The GPU check on a fresh GPU machine without a package index: install from wheelhouse/ (made by
# benchmarks/gpu_prepare.sh and carried along), then run benchmarks/gpu_check.py into $OUT (or ARG 1).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
python3 -m venv --system-site-packages /tmp/perco-gpu-venv
/tmp/perco-gpu-venv/bin/pip install -q --no-index --no-deps wheelhouse/*.whl
/tmp/perco-gpu-venv/bin/python -m perco.benchmarks.gpu_check --out "$out" --source . "${@:2}"
