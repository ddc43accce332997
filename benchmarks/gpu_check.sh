#!/usr/bin/env bash
# The GPU check, one script for one NVIDIA H100/H200 (< 10 minutes, installs nothing):
#   1. the Triton kernels compiled for the card, against the reference on fresh random inputs,
#      at tiny odd shapes and at MSA-4B shapes, and a query's selection read through the store
#      from device- and host-tier memories (tests/kernel_checks/*.py --gpu);
#   2. the server end to end with --attention-backend msa on a small model, when SGLang and its
#      CUDA kernels (sgl_kernel) are installed (`make install` does that on a GPU machine);
#   3. the kernel benchmark table (benchmarks/kernels.py);
#   4. memory at scale through the store (slot pools, routing scan through slots, host-tier
#      content copied to the GPU on a side stream during the dense attention), embedded-model
#      shapes to 100M tokens, MSA-4B shapes to 30M per placement and 100M with fp8 router keys
#      placed `auto` (device, then host memory), when SGLang is importable (its allocator hands
#      out the slots): benchmarks/memory_scale.py. Sized for an 80 GB card with 128 GB of host
#      memory (the 100M run takes a 70 GB device budget and ~66 GB of host memory); ~4 minutes.
# Usage: bash benchmarks/gpu_check.sh            (from the repository root)
#        STEPS="1 4" RESULTS_DIR=/some/dir bash benchmarks/gpu_check.sh   (some steps; JSON there)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
STEPS=${STEPS:-1 2 3 4}
status=0
step() { [[ " $STEPS " == *" $1 "* ]]; }
echo "== $(nvidia-smi -L | head -1)"
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"

if step 1; then
echo "== 1. kernels vs reference (compiled, tiny odd shapes + MSA-4B shapes)"
seed=$($PY -c "import random; print(random.randrange(2**31))")
for check in routing_scan_check indexed_attention_check pooling_check selection_gather_check; do
  start=$SECONDS
  if timeout 200 $PY "tests/kernel_checks/$check.py" "$seed" --gpu > "/tmp/$check.log" 2>&1; then
    echo "PASS $check ($(grep -c '^ok ' "/tmp/$check.log") cases, $((SECONDS - start)) s, seed $seed)"
  else
    echo "FAIL $check (seed $seed):"; grep -v '^ok ' "/tmp/$check.log" | tail -20; status=1
  fi
done
fi

if step 2; then
echo "== 2. server end to end (--attention-backend msa)"
if $PY -c "import sglang, sgl_kernel" 2>/dev/null; then
  $PY -m pytest -x -q tests/test_server_e2e.py || status=1
else
  echo "NOT RUN: SGLang with its CUDA kernels (sgl_kernel) is not installed for $PY here (run 'make install'" \
       "first; on a lent machine whose torch cannot load sglang-kernel, run benchmarks/gpu_serve_check.sh)"
  status=2
fi
fi

mkdir -p "$RESULTS_DIR"
if step 3; then
echo "== 3. kernel benchmarks"
$PY benchmarks/kernels.py --out "$RESULTS_DIR/kernels_${card}.json" || status=1
fi

if step 4; then
echo "== 4. memory at scale (store + kernels, by placement)"
if $PY -c "import sglang" 2>/dev/null; then
  timeout 150 $PY benchmarks/memory_scale.py --shape embedded --doc-tokens 2048 --sizes 1000000,10000000,100000000 \
      --out "$RESULTS_DIR/memory_scale_embedded_${card}.json" || status=1
  timeout 150 $PY benchmarks/memory_scale.py --shape msa-4b --doc-tokens 2048 --sizes 1000000,10000000,30000000 \
      --out "$RESULTS_DIR/memory_scale_msa4b_${card}.json" || status=1
  timeout 200 $PY benchmarks/memory_scale.py --shape msa-4b --doc-tokens 4096 --sizes 10000000,100000000 \
      --placements auto --router-keys fp8 --device-budget-gb 70 \
      --out "$RESULTS_DIR/memory_scale_msa4b_100m_${card}.json" || status=1
else
  echo "NOT RUN: SGLang is not installed for $PY on this machine (its allocator hands out memory slots)"
  status=2
fi
fi
exit $status
