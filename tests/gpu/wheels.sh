#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks (it reaches no package index;
# its image has Python 3.12 with torch, CuPy, cuda-bindings, numpy, xxhash,
# uvloop, nvidia-ml-py, safetensors and pytest, but not these, or older):
#   tests/gpu/wheels.sh            # -> .whl/ (ignored by git; ~15 MB)
# Then carry `.whl` in the device call; tests/gpu/run.sh installs them first.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# The versions this tree's generated code and tests were made with.
WHEELS=(
  grpcio==1.85.3 grpcio-status==1.85.3 grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1 protobuf==7.36.2 googleapis-common-protos==1.76.0
  structlog==26.1.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0
)
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$w"
done
du -sh .whl
