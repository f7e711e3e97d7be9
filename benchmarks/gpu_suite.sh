#!/usr/bin/env bash
# One run on a GPU machine: build the extensions, run the GPU tests and the full benchmark,
# and leave everything in one folder of 8 files:
#   env.txt build.log tests.log bench.log bench.json bench.md bench-time.png bench-memory.png
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]   (default benchmarks/results/gpu-<date>)
# Uses the machine's python3 as it is (no installs): torch, triton, pytest, pytest-benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

# In-place build: no pip or registry needed on the GPU machine.
MAX_JOBS=${MAX_JOBS:-16} ECHO_KERNELS_CUDA=1 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || echo "build failed: see $OUT/build.log (the Triton backend still runs)"

$PY -m pytest tests/test_triton.py tests/test_cuda.py tests/test_reference.py -q -rs > "$OUT/tests.log" 2>&1
echo "tests: $(tail -n 1 "$OUT/tests.log")"

$PY -m pytest benchmarks --benchmark --benchmark-json "$OUT/bench.json" -q -rs > "$OUT/bench.log" 2>&1
echo "benchmark: $(tail -n 1 "$OUT/bench.log")"
$PY -m benchmarks.report "$OUT/bench.json" > /dev/null 2>> "$OUT/bench.log" && echo "table: $OUT/bench.md"
