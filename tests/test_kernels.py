"""Triton kernels run under TRITON_INTERPRET=1 on tiny shapes and must match the reference
(fresh random inputs each run; the seed is printed on failure)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

CHECKS = Path(__file__).with_name("kernel_checks")


def test_routing_scan_matches_reference_under_the_interpreter():
    seed = str(random.randrange(2**31))
    result = subprocess.run(
        [sys.executable, str(CHECKS / "routing_scan_check.py"), seed],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, f"seed {seed}\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.count("ok ") == 4 * 2 * 2 * 3
