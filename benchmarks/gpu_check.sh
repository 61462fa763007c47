#!/usr/bin/env bash
# One-shot GPU check for a short loan of an H200 (torch + nvcc preinstalled, no internet).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT
#
# Steps (each under its own `timeout`, never longer than what is left of GPU_CHECK_BUDGET_S;
# a failed step is logged and the next one runs):
#   build     pip install --no-build-isolation --no-deps -e .  (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0)
#   pytest    tests/test_native.py tests/test_empirical.py -k cuda   (the CUDA cases)
#   bench     benchmarks/bench_native.py on cuda, exact float32 and with TF32 allowed
#   empirical python -m torch_ntk bench --device cuda, structured vs structured-torch
#   trace100k benchmarks/gpu_trace_100k.py: N=100,000 trace kernel into pinned host memory
# Everything is written under $OUT (default ./gpu_out); summary.txt lists each step's status.
#
# Sizes: the full K x K kernel costs 2 N^2 sum_l (p_l + K^2 q_l) ~ 3.1e5 N^2 FLOP on the
# benchmark MLP: 2e16 FLOP at N = 8192 (minutes per call even on tensor cores), so the full
# mode runs at the FULL_SIZES below by default; the trace kernel (~3.4e4 N^2 FLOP) runs at
# TRACE_SIZES. Override with the environment variables, e.g. FULL_SIZES="1024 8192".
set -u

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET_S:-780}"          # whole script, seconds
TRACE_SIZES="${TRACE_SIZES:-1024 8192}"
FULL_SIZES="${FULL_SIZES:-1024}"              # exact float32 (FMA)
FULL_SIZES_TF32="${FULL_SIZES_TF32:-1024 2048}"
REPEATS="${REPEATS:-3}"
TRACE_N="${TRACE_N:-100000}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONUNBUFFERED=1

START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# run NAME TIMEOUT_S LOGFILE CMD... : runs CMD under timeout, tees to LOGFILE, records status.
run() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then
    echo "$name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; elif (( rc != 0 )); then status="FAILED rc=$rc"; fi
  echo "$name: $status (${dt}s, log $(basename "$log"))" | tee -a "$SUMMARY"
  tail -n 5 "$log" | sed 's/^/    /'
  return 0
}

{
  echo "date: $(date -Is)"
  echo "host: $(hostname)  cores: $(nproc)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  git rev-parse HEAD 2>/dev/null && git status --short | head -n 20
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# (a) Build the extension (CUDA forced: a CPU-only build would make every CUDA test skip).
run build 420 "$OUT/build.log" env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 TORCH_NTK_FORCE_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e .
run info 60 "$OUT/info.log" "$PY" -c "
import json, torch, torch_ntk.native as n
i = n.info(); print(json.dumps(i, indent=1))
assert i['cuda'] and torch.cuda.is_available(), 'CUDA kernel not usable'"

# (b) Tests, CUDA cases included.
run pytest 300 "$OUT/pytest.log" "$PY" -m pytest -q tests/test_native.py tests/test_empirical.py -k cuda \
  -rs --junitxml="$OUT/pytest_junit.xml"

# (c) Native kernel vs pure torch (and a same-FLOP cuBLAS GEMM), exact float32 then TF32.
BENCH_PY='
import sys
sys.path.insert(0, "benchmarks")
import torch
tf32, mode, sizes, out, repeats = sys.argv[1] == "1", sys.argv[2], sys.argv[3].split(), sys.argv[4], sys.argv[5]
torch.backends.cuda.matmul.allow_tf32 = tf32  # before any call: the native op reads it per call
print("allow_tf32 =", torch.backends.cuda.matmul.allow_tf32, flush=True)
import bench_native
bench_native.main(["--device", "cuda", "--sizes", *sizes, "--modes", mode, "--repeats", repeats,
                   "--json", out])
'
run bench_exact_trace 150 "$OUT/bench_native.log" "$PY" -c "$BENCH_PY" \
  0 trace "$TRACE_SIZES" "$OUT/bench_native_cuda_trace.json" "$REPEATS"
run bench_exact_full 150 "$OUT/bench_native.log" "$PY" -c "$BENCH_PY" \
  0 full "$FULL_SIZES" "$OUT/bench_native_cuda_full.json" "$REPEATS"
run bench_tf32_trace 120 "$OUT/bench_native.log" "$PY" -c "$BENCH_PY" \
  1 trace "$TRACE_SIZES" "$OUT/bench_native_cuda_tf32_trace.json" "$REPEATS"
run bench_tf32_full 180 "$OUT/bench_native.log" "$PY" -c "$BENCH_PY" \
  1 full "$FULL_SIZES_TF32" "$OUT/bench_native_cuda_tf32_full.json" "$REPEATS"

# (d) Empirical NTK end to end on the GPU: native vs pure-torch structured method.
run empirical_trace 150 "$OUT/bench_empirical.log" "$PY" -m torch_ntk bench --device cuda \
  --sizes $TRACE_SIZES --modes trace --methods structured structured-torch --repeats 2 \
  --no-kernel --json "$OUT/bench_empirical_cuda_trace.json"
run empirical_full 150 "$OUT/bench_empirical.log" "$PY" -m torch_ntk bench --device cuda \
  --sizes $FULL_SIZES --modes full --methods structured structured-torch --repeats 2 \
  --no-kernel --json "$OUT/bench_empirical_cuda_full.json"

# (e) N = 100,000 trace kernel into (pinned) host memory, entries checked in float64.
run trace100k 240 "$OUT/trace_100k.log" "$PY" benchmarks/gpu_trace_100k.py --n "$TRACE_N" \
  --json "$OUT/trace_100k.json"

echo
echo "=== summary ($(( $(date +%s) - START ))s of ${BUDGET}s budget)"
cat "$SUMMARY"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -n 3
ls -l "$OUT"
