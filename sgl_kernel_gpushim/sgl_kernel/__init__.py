"""GPU stand-in for `sgl_kernel` (SGLang 0.5.23), a test rig for the GPU serving check. See README.md.

Not the real `sglang-kernel`: nothing here is compiled, and it is never installed. The GPU check
(`benchmarks/gpu_serve_check.sh`) puts this directory first on PYTHONPATH and sets
SGLANG_MSA_GPU_STANDIN=1; without that variable importing it raises, so a stray PYTHONPATH cannot
shadow a real installation unnoticed.

It provides exactly the names SGLang 0.5.23 imports from `sgl_kernel` at module level on CUDA:
- implemented in PyTorch (computing in float32, like the CUDA kernels): `rmsnorm`,
  `fused_add_rmsnorm`, `gemma_rmsnorm`, `gemma_fused_add_rmsnorm`, `silu_and_mul`, `gelu_and_mul`,
  `gelu_tanh_and_mul`, `top_k_renorm_prob(s)`, `top_p_renorm_prob(s)`; each logs a warning the first
  time it runs in a process, so a server log shows whether stand-in code ran at all (with
  SGLANG_FORCE_FUSED_OP_BACKEND=torch, none should);
- importable but raising NotImplementedError naming themselves when called: `int8_scaled_mm`,
  `moe_sum`, `moe_sum_reduce`, `quantization.ggml_*`, `kvcacheio.transfer_kv_*`;
- `utils.is_arch_support_pdl`, and `scalar_type` (names only; any use raises).
Any other name is absent, so a code path that needs it fails at import with its name.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F

__version__ = "0.0.0+gpu.standin"

STANDIN = True
STANDIN_KIND = "gpu"
ENABLE_VARIABLE = "SGLANG_MSA_GPU_STANDIN"

if os.environ.get(ENABLE_VARIABLE) != "1":
    # RuntimeError, not ImportError: SGLang's guarded imports catch ImportError and fall back.
    raise RuntimeError(
        f"sgl_kernel GPU stand-in imported from {os.path.dirname(__file__)} without {ENABLE_VARIABLE}=1: "
        "it is a test rig for benchmarks/gpu_serve_check.sh, not the real sglang-kernel; remove it from "
        "PYTHONPATH (or set the variable if this is the GPU check)"
    )

logger = logging.getLogger("sgl_kernel.gpu_standin")
logger.warning("sgl_kernel GPU stand-in (pure PyTorch, not the real sglang-kernel) loaded from %s", __file__)

_ran: set[str] = set()


def _note(name: str) -> None:
    if name not in _ran:
        _ran.add(name)
        logger.warning("sgl_kernel GPU stand-in: %s ran (PyTorch code, not a CUDA kernel)", name)


def unavailable(name: str, module: str = "sgl_kernel"):
    """A function named `name` that raises NotImplementedError naming itself when called."""

    def raise_unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel GPU stand-in: {module}.{name} is not implemented (the stand-in implements the "
            "norms, act-and-mul and top-k/top-p renorm only); this path needs the real sglang-kernel"
        )

    raise_unavailable.__name__ = raise_unavailable.__qualname__ = name
    return raise_unavailable


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """float32 x * rsqrt(mean(x^2) + eps) * (weight + offset), like the kernels' float accumulation."""
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x * (weight.float() + offset) if offset else x * weight


def _norm_into(name: str, input, weight, eps, out, offset: float) -> torch.Tensor:
    _note(name)
    result = _rms(input, weight, eps, offset).to(input.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def _fused_add_norm(name: str, input, residual, weight, eps, offset: float) -> None:
    """In place: residual += input (summed in float32); input = norm(that float32 sum)."""
    _note(name)
    total = input.float() + residual.float()
    residual.copy_(total)
    input.copy_(_rms(total, weight, eps, offset))


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: Optional[torch.Tensor] = None,
            enable_pdl: Optional[bool] = None) -> torch.Tensor:
    return _norm_into("rmsnorm", input, weight, eps, out, 0.0)


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      enable_pdl: Optional[bool] = None) -> None:
    _fused_add_norm("fused_add_rmsnorm", input, residual, weight, eps, 0.0)


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                  out: Optional[torch.Tensor] = None, enable_pdl: Optional[bool] = None) -> torch.Tensor:
    return _norm_into("gemma_rmsnorm", input, weight, eps, out, 1.0)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float = 1e-6, enable_pdl: Optional[bool] = None) -> None:
    _fused_add_norm("gemma_fused_add_rmsnorm", input, residual, weight, eps, 1.0)


def _act_and_mul(name: str, act, input: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """act(x[..., :d]) * x[..., d:], computed in float32 and cast to the input's dtype."""
    _note(name)
    d = input.shape[-1] // 2
    if out is not None and (out.shape[:-1] != input.shape[:-1] or out.shape[-1] != d):
        raise ValueError(f"sgl_kernel GPU stand-in: {name}: out {tuple(out.shape)} for input "
                         f"{tuple(input.shape)}")
    x = input.float()
    result = (act(x[..., :d]) * x[..., d:]).to(input.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def silu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _act_and_mul("silu_and_mul", F.silu, input, out)


def gelu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _act_and_mul("gelu_and_mul", lambda x: F.gelu(x, approximate="none"), input, out)


def gelu_tanh_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _act_and_mul("gelu_tanh_and_mul", lambda x: F.gelu(x, approximate="tanh"), input, out)


def _per_row(value: Union[torch.Tensor, int, float], rows: int, dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        value = value.to(device=device, dtype=dtype).reshape(-1)
        if value.numel() == 1:
            return value.expand(rows)
        if value.numel() != rows:
            raise ValueError(f"sgl_kernel GPU stand-in: {value.numel()} values for {rows} rows")
        return value
    return torch.full((rows,), value, dtype=dtype, device=device)


def _renorm_above(probs: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    kept = torch.where(probs >= pivots.unsqueeze(1), probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def top_k_renorm_probs(probs: torch.Tensor, top_k: Union[torch.Tensor, int]) -> torch.Tensor:
    """FlashInfer's semantics: keep each row's probabilities >= its k-th largest (ties at the pivot
    kept), zero the rest, renormalise; float32 out."""
    _note("top_k_renorm_probs")
    probs = probs.float()
    rows, vocab = probs.shape
    if rows == 0 or vocab == 0:
        return probs.clone()
    cutoff = (_per_row(top_k, rows, torch.int64, probs.device) - 1).clamp(min=0, max=vocab - 1)
    pivots = probs.sort(dim=-1, descending=True).values.gather(1, cutoff.unsqueeze(1)).squeeze(1)
    return _renorm_above(probs, pivots)


def top_p_renorm_probs(probs: torch.Tensor, top_p: Union[torch.Tensor, float]) -> torch.Tensor:
    """FlashInfer's semantics: keep each row's smallest set of largest probabilities whose mass
    reaches p (ties at the pivot kept), zero the rest, renormalise; float32 out."""
    _note("top_p_renorm_probs")
    probs = probs.float()
    rows, vocab = probs.shape
    if rows == 0 or vocab == 0:
        return probs.clone()
    ascending = probs.sort(dim=-1).values
    below = (1.0 - _per_row(top_p, rows, torch.float32, probs.device)).unsqueeze(1)
    cutoff = torch.searchsorted(ascending.cumsum(dim=-1), below, right=False).squeeze(1).clamp(max=vocab - 1)
    return _renorm_above(probs, ascending.gather(1, cutoff.unsqueeze(1)).squeeze(1))


top_k_renorm_prob = top_k_renorm_probs
top_p_renorm_prob = top_p_renorm_probs

int8_scaled_mm = unavailable("int8_scaled_mm")
moe_sum = unavailable("moe_sum")
moe_sum_reduce = unavailable("moe_sum_reduce")
