"""sgl_kernel.utils in the GPU stand-in: the one name SGLang 0.5.23 imports on CUDA."""

from __future__ import annotations

import functools

import torch


@functools.cache
def is_arch_support_pdl() -> bool:
    """Programmatic dependent launch needs compute capability 9.0 or higher (Hopper)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
