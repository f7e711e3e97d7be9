#!/usr/bin/env bash
# One run on a GPU machine, inside a time budget: build the extensions, run the GPU tests
# (with compute-sanitizer memcheck and racecheck on a tiny case beside them), then the
# benchmark until the budget is spent. Leaves 8 files in one folder:
#   env.txt build.log tests.log sanitizer.log time-mma.log bench.log bench-fwd.json bench-fwdbwd.json
# and, where matplotlib exists, bench.md and the plots (``python -m benchmarks.report`` redraws them anywhere).
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR] [SECONDS]   (defaults: benchmarks/results/gpu-<date>, 1800)
# Uses the machine's python3 as it is (no installs): torch, triton, pytest, pytest-xdist, pytest-benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
BUDGET=${2:-1800}
END=$(( $(date +%s) + BUDGET ))
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
left() { echo $(( END - $(date +%s) )); }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -n 2
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

# In-place build for this GPU's architecture only; no pip or registry needed. The GPU machine's
# python has no nvidia-cutlass: carry .venv/lib/python3*/site-packages/cutlass_library/source/include
# (27 MB) with the tree, or point CUTLASS_INCLUDE_DIR at another copy of the headers.
if [ -z "${CUTLASS_INCLUDE_DIR:-}" ]; then
  CUTLASS_INCLUDE_DIR=$(ls -d "$PWD"/.venv/lib/python3*/site-packages/cutlass_library/source/include 2>/dev/null | head -n 1)
  export CUTLASS_INCLUDE_DIR
fi
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} ECHO_KERNELS_CUDA=1 timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || echo "build failed: see $OUT/build.log (the Triton backend still runs)"
echo "build: $(( $(date +%s) - start )) s"

# The sanitizers watch one tiny case in their own processes while the suite runs.
(
  for kernels in wmma mma; do
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool, $kernels kernels"
      ECHO_KERNELS_CUDA_FORWARD=$kernels ECHO_KERNELS_CUDA_BACKWARD=$kernels timeout 240 \
        compute-sanitizer --tool $tool --error-exitcode 9 \
        $PY -m pytest tests/test_cuda.py -k tiny_case_for_compute_sanitizer -q -p no:cacheprovider 2>&1 | tail -n 25
      echo "exit: ${PIPESTATUS[0]}"
    done
  done
) > "$OUT/sanitizer.log" 2>&1 &
sanitizer=$!

start=$(date +%s)
# ECHO_GPU_TESTS narrows the tests (say, to rerun what failed in a short lease).
timeout 300 $PY -m pytest -n 8 ${ECHO_GPU_TESTS:-tests/test_cuda.py tests/test_triton.py tests/test_reference.py} -q -rs \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests ($(( $(date +%s) - start )) s): $(tail -n 1 "$OUT/tests.log")"
wait $sanitizer
grep -h "ERROR SUMMARY\|exit:" "$OUT/sanitizer.log" | tr '\n' ' '; echo

# The opt-in CuTe kernels (ECHO_KERNELS_CUDA_{FORWARD,BACKWARD}=mma) timed beside Triton, the
# WMMA kernels and SDPA, until they replace the WMMA ones.
start=$(date +%s)
timeout 240 $PY benchmarks/time_triton.py --methods triton cuda cuda-mma --lengths 4096 16384 --dims 64 128 \
  > "$OUT/time-mma.log" 2>&1
echo "time_triton with cuda-mma ($(( $(date +%s) - start )) s): $OUT/time-mma.log"

# The benchmark gets what is left, split between forward and forward+backward; a case
# that starts before its deadline finishes, so keep 60 s in reserve.
METHODS=${ECHO_BENCH_METHODS:-cuda,triton,sdpa,sdpa_rope_bias}
half=$(( ( $(left) - 60 ) / 2 ))
for mode in fwd fwdbwd; do
  test=test_forward; [ $mode = fwdbwd ] && test=test_forward_backward
  deadline=$(( $(date +%s) + half ))
  ECHO_BENCH_METHODS=$METHODS ECHO_BENCH_DEADLINE=$deadline timeout $(( half + 120 )) \
    $PY -m pytest "benchmarks/test_attention.py::$test" --benchmark -q -rs -p no:cacheprovider \
    --benchmark-json "$OUT/bench-$mode.json" >> "$OUT/bench.log" 2>&1
  echo "benchmark $mode: $(tail -n 1 "$OUT/bench.log")"
done
$PY -m benchmarks.report "$OUT"/bench-fwd.json "$OUT"/bench-fwdbwd.json --out "$OUT/bench" > /dev/null \
  2>> "$OUT/bench.log" && echo "table: $OUT/bench.md"
