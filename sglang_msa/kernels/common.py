"""Small helpers the Triton kernels share."""

from __future__ import annotations

import os


def interpreted() -> bool:
    """True when Triton runs its CPU interpreter (`TRITON_INTERPRET=1`, the CI path).

    The kernels then compute their 16-bit dot products as float32 products of the same rounded
    operands (exact in float32), because the interpreter's own 16-bit `tl.dot` returns garbage
    (Triton 3.8).
    """
    return os.environ.get("TRITON_INTERPRET") == "1"
