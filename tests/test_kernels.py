"""Triton kernels run under TRITON_INTERPRET=1 on tiny shapes and must match the reference
(fresh random inputs each run; the seed is printed on failure). The same check scripts run at
real shapes on a GPU with --real (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("kernel_checks")

# check script -> the number of cases it must report ok
CASES = {
    "routing_scan_check.py": 5 * 3 * 2 * 2 * 3 * 2 + 5 * 3 * 6,  # + reading keys through pool slots
    "indexed_attention_check.py": 4 * 2 * 2,
    "pooling_check.py": 4 * 2,
    "selection_gather_check.py": 3 * 2,  # device- and host-tier memories, read through the store
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_kernel_matches_reference_under_the_interpreter(script):
    seed = str(random.randrange(2**31))
    result = subprocess.run(
        [sys.executable, str(CHECKS / script), seed],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, f"seed {seed}\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.count("ok ") == CASES[script], result.stdout[-4000:]
