#!/usr/bin/env bash
# Set up a virtualenv (if none is active) and start the service on port 8000 with the bundled default
# models (models/). Extra arguments go to `moebert serve` (e.g. --model NAME=PATH, --port 9000).
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q -e ".[serve]"
exec moebert serve "$@"
