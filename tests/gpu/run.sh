#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (a few minutes):
#   tests/gpu/run.sh [RESULTS_DIR]
# The GPU machine reaches no package index: it needs a Python with a CUDA
# build of torch, CuPy and cuda-bindings already there ($PYTHON, default
# python3), or a .venv carried over. Runs the GPU tests (the agent's CUDA
# side, the custom kernels against their NumPy models, the CUDA backend),
# then the GPU benchmarks and the engine benchmark; results (junit XML, logs) go to RESULTS_DIR (default
# gpu-results).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-gpu-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/agent:$PWD/daemon:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch, cuda.bindings; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
"$PY" -c 'import cupy; print("cupy", cupy.__version__)' || echo "no CuPy: the kernel tests skip"
status=0
"$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
  2>&1 | tee "$OUT/gpu-tests.txt" || status=$?
# The GPU benchmarks (ratios against baselines measured in the same run).
timeout 420 "$PY" -m tests.bench.bench_gpu --out "$OUT" --runs 3 2>&1 | tee "$OUT/bench_gpu.txt" || status=$?
# The engine path on this machine's CPUs (host backend), for comparison.
timeout 300 "$PY" -m tests.bench.bench_engine --runs 3 2>&1 | tee "$OUT/bench_engine.txt" || true
exit $status
