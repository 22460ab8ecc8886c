#!/usr/bin/env bash
# The GPU check of the fused Triton MoE FFN, in one command on a CUDA machine (≈ 6-8 min on an H100 / H200):
#
#   bash benchmarks/gpu_check.sh
#
#  1. the GPU-only tests (bf16, every tuning candidate, large T, no host sync, CUDA-graph capture)
#  2. the kernel benchmark (benchmarks/bench_kernel.py: table + PNG + JSON, and end to end)
#  3. the rest of tests/test_kernels_triton.py, now on compiled kernels instead of the interpreter
#
# Results go to benchmarks/results/ (gpu_env.txt, gpu_tests*.{txt,xml}, bench_kernel.{md,json,png} + its log bench_kernel.txt) and are
# copied to "$OUT" when that variable is set. Each step has its own time limit, so a slow step cannot eat
# the others' time and whatever was measured is kept. Exit status: 0 when every step passed.
# Needs a Python with a CUDA build of torch and triton (PYTHON=... to choose one; tried: .venv, python3).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
unset TRITON_INTERPRET  # compiled kernels, never the interpreter
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # kernels/ and moebert/ without an install
export MPLBACKEND=Agg

PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 \
     && "$candidate" -c "import torch, triton; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    PY=$candidate
    break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check.sh: no Python with a CUDA torch and triton found (set PYTHON=...); nvidia-smi says:" >&2
  nvidia-smi -L >&2 || true
  exit 2
fi

{
  date
  nvidia-smi -L 2>/dev/null || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
  git log -1 --format='commit %H %s' 2>/dev/null || true
} | tee "$RESULTS/gpu_env.txt"

# The tests' conftest imports transformers (for the whole-model test); without it, collect without conftest.
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --durations=15)
if ! "$PY" -c "import transformers, moebert" >/dev/null 2>&1; then
  echo "transformers / moebert deps missing: running without conftest (the whole-model test is skipped)" \
    | tee -a "$RESULTS/gpu_env.txt"
  PYTEST+=(--noconftest -k "not model_logits")
fi

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $RESULTS/NAME.txt, remember failures
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -eq 0 ]; then echo "=== $name: skipped"; return; fi
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$RESULTS/$name.txt"
  [ "$rc" -eq 0 ] || status=1
}

# Step time limits in seconds (0 skips a step), e.g. REST_S=0 when the device time is short.
step gpu_tests "${GPU_TESTS_S:-210}" "${PYTEST[@]}" -m gpu tests/test_kernels_triton.py --junitxml="$RESULTS/gpu_tests.xml"
step bench_kernel "${BENCH_S:-210}" "$PY" benchmarks/bench_kernel.py
step gpu_tests_rest "${REST_S:-150}" "${PYTEST[@]}" -m "not gpu" tests/test_kernels_triton.py \
  --junitxml="$RESULTS/gpu_tests_rest.xml"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp -f "$RESULTS"/gpu_env.txt "$RESULTS"/gpu_tests*.txt "$RESULTS"/gpu_tests*.xml "$RESULTS"/bench_kernel.* \
    "$OUT/results/" 2>/dev/null || true
  echo "copied results to $OUT/results"
fi
echo "gpu_check.sh: $([ $status -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED') (${SECONDS}s)"
exit $status
