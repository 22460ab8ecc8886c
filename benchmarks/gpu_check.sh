#!/usr/bin/env bash
# The GPU check, in one command on a CUDA machine (≤ 9.5 min on an H200: every step has its own time limit,
# 200 + 150 + 100 + 100 s by default):
#
#   bash benchmarks/gpu_wheels.sh        # first, where pip reaches PyPI: the server's web stack into .whl/
#   bash benchmarks/gpu_check.sh         # then on the GPU machine (carry .whl there)
#
#  1. gpu_tests      the GPU-only tests: Triton kernel (bf16, every tuning candidate, large T, no host sync,
#                    CUDA-graph capture) and the serving path (CUDA-graph buckets replayed under
#                    torch.cuda.set_sync_debug_mode("error"), 16-bit logits vs fp32)
#  2. bench_e2e_gpu  whole model, dense teacher vs MoEBERT, CUDA graphs, BERT-base + MiniLM, batch 1/8/64/256 × 128
#  3. bench_kernel_graph_tuned  the MoE FFN sub-layer vs its anchors at T = 2048, 4096, 16384, bf16: the
#                    graph-timed tuner, the new T = 2k-4k candidates, and the two kernel refactors re-timed
#  4. load_test_gpu  HTTP load: `moebert serve --device cuda` (bf16, Triton, CUDA graphs), MoEBERT vs its dense
#                    teacher (random BERT-base classifiers), closed loop
#  (5. gpu_tests_rest  the interpreter tests of tests/kernels/test_kernels_triton.py on compiled kernels: REST_S=150)
#
# Results go to benchmarks/results/ and, when $OUT is set, to $OUT: gpu_results.tgz (everything) plus the
# headline files, 8 files at most. Step limits in seconds (0 skips a step): GPU_TESTS_S, E2E_S, BENCH_S, LOAD_S,
# REST_S. Exit status: 0 when every step passed.
# Needs a Python with a CUDA build of torch and triton (PYTHON=... to choose one; tried: .venv, python3).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
unset TRITON_INTERPRET  # compiled kernels, never the interpreter
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # kernels/, moebert/ and server/ without an install
export MPLBACKEND=Agg PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

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
if ls .whl/*.whl >/dev/null 2>&1; then  # the web stack for the load benchmark (benchmarks/gpu_wheels.sh)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  date
  nvidia-smi -L 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(),
'| bf16', torch.cuda.is_bf16_supported(), '| SMs', torch.cuda.get_device_properties(0).multi_processor_count)"
  "$PY" -c "import transformers, fastapi, uvicorn, pydantic_settings; print('transformers', transformers.__version__,
'| fastapi', fastapi.__version__, '| uvicorn', uvicorn.__version__)" 2>&1 | tail -1
  git log -1 --format='commit %H %s' 2>/dev/null || true
} | tee "$RESULTS/gpu_env.txt"

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --durations=15)
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

CKPT=$(mktemp -d /tmp/moebert-gpu-ckpt.XXXXXX)
step gpu_tests "${GPU_TESTS_S:-200}" "${PYTEST[@]}" -m gpu tests/server/test_cuda_graphs.py tests/kernels/test_kernels_triton.py \
  --junitxml="$RESULTS/gpu_tests.xml"
step bench_e2e_gpu "${E2E_S:-150}" "$PY" benchmarks/bench_e2e_gpu.py --save-checkpoints "$CKPT"
step bench_kernel_graph_tuned "${BENCH_S:-100}" "$PY" benchmarks/bench_kernel.py --dtypes bf16 --tokens 2048 4096 16384 \
  --max-ref 0 --no-e2e --out "$RESULTS/bench_kernel_graph_tuned"
step load_test_gpu "${LOAD_S:-100}" "$PY" benchmarks/load_test.py --moe "$CKPT/moe" --dense "$CKPT/dense" \
  --configs moebert-torch dense-torch --device cuda --max-seq-len 128 --concurrency 64 --duration 10 \
  --name load_test_gpu
step gpu_tests_rest "${REST_S:-0}" "${PYTEST[@]}" -m "not gpu" tests/kernels/test_kernels_triton.py \
  --junitxml="$RESULTS/gpu_tests_rest.xml"
rm -rf "$CKPT"

if [ -n "${OUT:-}" ]; then  # at most 8 files come back from $OUT: one archive + the headline files
  mkdir -p "$OUT"
  (cd "$RESULTS" && tar czf "$OUT/gpu_results.tgz" gpu_env.txt gpu_tests*.txt gpu_tests*.xml bench_e2e_gpu.* \
     bench_kernel_graph_tuned.* load_test_gpu.* 2>/dev/null)
  for file in gpu_env.txt gpu_tests.txt bench_e2e_gpu.md bench_kernel_graph_tuned.md load_test_gpu.md; do
    cp -f "$RESULTS/$file" "$OUT/" 2>/dev/null || true
  done
  echo "copied results to $OUT (unpack gpu_results.tgz into benchmarks/results/ to commit them)"
fi
echo "gpu_check.sh: $([ $status -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED') (${SECONDS}s)"
exit $status
