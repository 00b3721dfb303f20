#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (at most 8 minutes):
#   tests/gpu/run.sh [RESULTS_DIR]
# Here, before the device call: tests/gpu/wheels.sh (the machine reaches no
# package index; its image's python3 has a CUDA build of torch, CuPy and
# cuda-bindings, and the wheels bring what it lacks). The call:
#   run(command="tests/gpu/run.sh $OUT", carry=[".whl"], timeout_s=540)
# First the emulated driver's conformance cases on the real driver
# (tests/cuda/test_emulated_driver.py with TORPOR_DRIVER=real): what the
# driver returned goes to conformance.json, which, committed as
# tests/emulator/real-driver.json, holds the emulator to it in CI. Then the
# GPU tests (the agent's CUDA side, the kernels against their NumPy models,
# the CUDA backend, a real torpord with an engine on the GPU), then the GPU
# benchmarks; results (junit XML, logs, conformance.json, results.json,
# summary.txt) go to RESULTS_DIR (default gpu-results). A step that fails
# sets the exit status; the later steps still run.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The whole run within 8 minutes (450 s, and the timeouts' grace): each step
# gets its own limit, but never more than is left before the deadline less
# what the steps after it need (limit CAP RESERVE).
deadline=$((SECONDS + 450))
limit() {
  local left=$((deadline - SECONDS - $2))
  if [ "$left" -lt "$1" ]; then echo $((left > 10 ? left : 10)); else echo "$1"; fi
}
OUT=${1:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/agent:$PWD/daemon:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  # (Not fatal: wheels for another Python fail here, and what the image has
  # may be enough; the import check below says.)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tee "$OUT/wheels.txt" || echo "wheels not installed" | tee -a "$OUT/wheels.txt"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
"$PY" -c 'import torch, cupy, cuda.bindings, grpc, structlog; print("torch", torch.__version__, torch.cuda.is_available(), "cupy", cupy.__version__, "grpc", grpc.__version__)' \
  2>&1 | tee "$OUT/imports.txt" || status=$?
# (Warnings stay warnings here: another image's libraries may deprecate things.
# No asyncio plugin: the GPU tests don't use it, and the image's pytest may be
# older than the shipped plugin wants.)
# The conformance cases, each in a process of its own (60 s in all).
TORPOR_DRIVER=real TORPOR_CONFORMANCE_OUT="$OUT" timeout -k 5 60 "$PY" -m pytest -rs \
  tests/cuda/test_emulated_driver.py -p no:cacheprovider -p no:asyncio \
  -o filterwarnings=default --timeout 40 \
  --junitxml="$OUT/conformance.xml" 2>&1 | tee "$OUT/conformance.txt" || status=$?
if [ ! -s "$OUT/conformance.json" ]; then
  echo "no conformance.json: the real driver's outcomes were not recorded" | tee -a "$OUT/conformance.txt"
  status=1
fi
# The GPU tests: each has 120 s, all of them 250 s at most.
timeout -k 10 "$(limit 250 180)" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -p no:asyncio \
  -o filterwarnings=default --timeout 120 \
  --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" || status=$?
# The GPU benchmarks (ratios against baselines measured in the same run); each
# section's figures are written as soon as it ends.
timeout -k 10 "$(limit 200 0)" "$PY" -m tests.bench.bench_gpu --out "$OUT" --runs 2 --dir /tmp/torpor-bench \
  2>&1 | tee "$OUT/bench_gpu.txt" || status=$?
exit $status
