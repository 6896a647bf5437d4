#!/bin/sh
# tests/check-gpu-e2e-cpu.sh: perf/gpu_e2e.py (the e2e replay's GPU part,
# run by perf/gpu-check.sh on a GPU machine) run here with --cpu: the same
# script on CPU tensors and kvrt's host backend, 4 layers. It keeps the GPU
# script working where there is no GPU: every call through the shim's
# binding succeeds and every load is byte-exact (the script exits 1
# otherwise). Needs torch: $KVRT_PYTHON, else ./configure's .venv; 77 =
# skipped without one.
set -u
cd "$(dirname "$0")/.."
PY=${KVRT_PYTHON:-}
[ -z "$PY" ] && [ -x .venv/bin/python ] && PY=$(pwd)/.venv/bin/python
[ -n "$PY" ] && "$PY" -c "import torch" 2>/dev/null || { echo "skip: no python with torch"; exit 77; }
ninja build/plain/libkvrt.so.0.1.0 >/dev/null 2>&1 || { echo "FAIL: ninja"; exit 1; }
KVRT_LIB=$(pwd)/build/plain/libkvrt.so "$PY" perf/gpu_e2e.py --cpu
