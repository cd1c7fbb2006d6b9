#!/usr/bin/env bash
# GPU benchmark (see the docstring of benchmarks/gpu_bench.py): ratios against references measured in the same run.
#   bash benchmarks/gpu.sh                 # on a CUDA machine: the real figures, < 5 minutes, offline
#   bash benchmarks/gpu.sh --smoke         # tiny sizes, CPU ok (the test suite runs this)
#   bash benchmarks/gpu.sh --json out.json # also write the numbers to a JSON file
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1     # tiny or embedded models only: never the hub
exec "$PY" benchmarks/gpu_bench.py "$@"
