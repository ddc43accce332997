"""CPU stand-in for `sgl_kernel` (SGLang 0.5.23), for machines without a GPU. See README.md.

Implemented: `assign_req_to_token_pool_cpu`, the only entry point SGLang's CPU path calls while
serving a decoder model on a CPU without AMX. Any other `*_cpu` name imports, and raises
NotImplementedError naming itself when called. Any other name is absent: `from sgl_kernel import X`
raises ImportError and `hasattr(sgl_kernel, X)` is False, so SGLang's import fallbacks apply.
"""

from __future__ import annotations

__version__ = "0.0.0+cpu.standin"

STANDIN = True


def assign_req_to_token_pool_cpu(
    req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len
) -> None:
    """For each request r in order, write the next end-start entries of out_cache_loc into
    req_to_token[req_pool_indices[r], start:end]."""
    del pool_len  # the row width; slicing already bounds the write
    position = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        count = end - start
        req_to_token[row, start:end] = out_cache_loc[position : position + count].to(req_to_token.dtype)
        position += count


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name.endswith("_cpu"):

        def unavailable(*args, **kwargs):
            raise NotImplementedError(
                f"sgl_kernel CPU stand-in: {name} is not implemented (only "
                "assign_req_to_token_pool_cpu is); install the real sglang-kernel-cpu build"
            )

        unavailable.__name__ = name
        return unavailable
    raise AttributeError(f"sgl_kernel CPU stand-in does not provide {name!r}")
