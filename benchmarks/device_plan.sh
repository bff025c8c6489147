#!/usr/bin/env bash
# One device call that answers what the CPU cannot (run from the repository root on a GPU machine):
#
#   bash benchmarks/device_plan.sh [budget_seconds]      (default 560: under the 10-minute limit of one call)
#
# In order of value, each part with its own time limit from what is left of the budget, logs under $OUT
# (default ./device-out):
#   1. e2e (a) and (b), ours and HF in one process, with the A/B control rows of the fused adds and of the
#      dequantize prefetch (benchmarks/e2e.py --ab-adds --ab-prefetch)
#   2. benchmarks/diag/dequant_overlap.py: does a side-stream dequantize hide behind cuBLAS
#   3. the CUDA tests of the code not yet run on a GPU (prefetch, fused nodes, dropout, offload, graphs)
# bitsandbytes comes from .whl-slim/ when present (benchmarks/slim_wheel.py; carry it with the call).
# Prints each part's exit status and tail, then a summary line per part.
set -u
BUDGET=${1:-560}
OUT=${OUT:-./device-out}
mkdir -p "$OUT"
START=$(date +%s)
if ls .whl-slim/bitsandbytes*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl-slim/bitsandbytes*.whl
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
export E2E_COMMIT=${E2E_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

SUMMARY=()
part() {   # part NAME SHARE_OF_WHAT_IS_LEFT CMD...: run CMD with a limit of that share of the remaining budget
  local name=$1 share=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( left * share / 100 ))
  if [ "$limit" -lt 20 ]; then
    SUMMARY+=("$name: skipped (${left}s left)"); return
  fi
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name: rc=$rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)")
  echo "=== $name rc=$rc"; tail -n 30 "$OUT/$name.log"
}

part e2e-ab 60 python -m benchmarks.e2e --settings a,b --stacks ours,hf --steps 8 --ab-adds --ab-prefetch \
  --out "$OUT/e2e-ab.json"
part dequant-overlap 35 python benchmarks/diag/dequant_overlap.py --out "$OUT/dequant_overlap.json"
part cuda-tests 95 python -m pytest -q -rA -p no:cacheprovider tests/kernels/test_prefetch.py \
  tests/kernels/test_fused_ops_cuda.py tests/llama/test_fast_dropout_cuda.py tests/llama/test_offload_cuda.py \
  tests/train/test_cuda_graph_cuda.py

echo "=== summary ($(cat "$OUT/gpu.txt"), commit $E2E_COMMIT)"
printf '%s\n' "${SUMMARY[@]}"
