#!/usr/bin/env bash
# Wheels the GPU check's load benchmark needs that the device image lacks (the server's web stack), saved in
# .whl/ (git-ignored) for a machine with no package index. Run here, where pip reaches PyPI, before the device
# call; that call carries .whl and benchmarks/gpu_check.sh installs them into /tmp/site:
#
#   bash benchmarks/gpu_wheels.sh         # ≈ 4 MB, CPython 3.12, manylinux x86-64
#
# Versions are those of the venv the tests pass with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PIP=(python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl)
"${PIP[@]}" fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 uvicorn==0.54.0
ls -la .whl
