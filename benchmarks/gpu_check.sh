#!/usr/bin/env bash
# The GPU check of issue #4, one script for one NVIDIA H100/H200 (< 8 minutes, installs nothing):
#   1. the Triton kernels compiled for the card, against the reference on fresh random inputs,
#      at tiny odd shapes and at MSA-4B shapes (tests/kernel_checks/*.py --gpu);
#   2. the server end to end with --attention-backend msa on a small model, when SGLang is
#      installed on the machine (`make install` does that on a GPU machine);
#   3. the kernel benchmark table (benchmarks/kernels.py), JSON to $RESULTS (default
#      benchmarks/results/kernels_<card>.json);
#   4. memory at scale through the store (slot pools, routing scan through slots, host-tier
#      content copied to the GPU), embedded-model and MSA-4B shapes, when SGLang is installed
#      (its allocator hands out the slots): benchmarks/memory_scale.py.
# Usage: bash benchmarks/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
RESULTS=${RESULTS:-benchmarks/results/kernels_${card}.json}
status=0
echo "== $(nvidia-smi -L | head -1)"
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"

echo "== 1. kernels vs reference (compiled, tiny odd shapes + MSA-4B shapes)"
seed=$($PY -c "import random; print(random.randrange(2**31))")
for check in routing_scan_check indexed_attention_check pooling_check; do
  start=$SECONDS
  if $PY "tests/kernel_checks/$check.py" "$seed" --gpu > "/tmp/$check.log" 2>&1; then
    echo "PASS $check ($(grep -c '^ok ' "/tmp/$check.log") cases, $((SECONDS - start)) s, seed $seed)"
  else
    echo "FAIL $check (seed $seed):"; grep -v '^ok ' "/tmp/$check.log" | tail -20; status=1
  fi
done

echo "== 2. server end to end (--attention-backend msa)"
if $PY -c "import sglang" 2>/dev/null; then
  $PY -m pytest -x -q tests/test_server_e2e.py || status=1
else
  echo "NOT RUN: SGLang is not installed for $PY on this machine (run 'make install' first)"
  status=2
fi

echo "== 3. kernel benchmarks"
mkdir -p "$(dirname "$RESULTS")"
$PY benchmarks/kernels.py --out "$RESULTS" || status=1

echo "== 4. memory at scale (store + kernels, device vs host placement)"
if $PY -c "import sglang" 2>/dev/null; then
  $PY benchmarks/memory_scale.py --shape embedded --sizes 1000000,10000000,30000000 \
      --out "benchmarks/results/memory_scale_embedded_${card}.json" || status=1
  $PY benchmarks/memory_scale.py --shape msa-4b --sizes 1000000,10000000,20000000 \
      --out "benchmarks/results/memory_scale_msa4b_${card}.json" || status=1
else
  echo "NOT RUN: SGLang is not installed for $PY on this machine (its allocator hands out memory slots)"
  status=2
fi
exit $status
