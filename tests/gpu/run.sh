#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (a few minutes):
#   tests/gpu/run.sh
# The GPU machine reaches no package index: it needs a Python with a CUDA
# build of torch and cuda-bindings already there ($PYTHON, default python3),
# or a .venv carried over. Runs the GPU tests, then the engine benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/agent:$PWD/daemon:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch, cuda.bindings; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
# The agent's CUDA side (the daemon's CUDA backend is the next issue).
"$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
# The engine path on this machine's CPUs (host backend), for comparison.
timeout 300 "$PY" -m tests.bench.bench_engine --runs 3 || true
