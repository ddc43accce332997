"""Triton pooling at ingestion: the segment mean of K, V and router keys over every chunk of
every document, one launch per layer (`reference.pool_chunks`, partial last chunks included).

Each program reduces one chunk for a block of the flattened (head, dim) columns of all three
tensors in float32 and writes the means in the input dtype. Runs on a GPU; on a CPU only under
`TRITON_INTERPRET=1` (tests). Triton is imported lazily.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from sglang_msa.kernels import reference as ref


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def pool_kernel(k_ptr, v_ptr, r_ptr, k_out, v_out, r_out, chunk_first_token_ptr, chunk_count_ptr,
                    K_COLS: tl.constexpr, V_COLS: tl.constexpr, R_COLS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr):
        chunk = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        first = tl.load(chunk_first_token_ptr + chunk).to(tl.int64)
        count = tl.load(chunk_count_ptr + chunk)
        sum_k = tl.zeros([BLOCK_COLS], tl.float32)
        sum_v = tl.zeros([BLOCK_COLS], tl.float32)
        sum_r = tl.zeros([BLOCK_COLS], tl.float32)
        for p0 in range(0, count, BLOCK_P):
            tokens = first + p0 + tl.arange(0, BLOCK_P)
            valid = (p0 + tl.arange(0, BLOCK_P)) < count
            sum_k += tl.sum(tl.load(k_ptr + tokens[:, None] * K_COLS + cols[None, :],
                                    mask=valid[:, None] & (cols[None, :] < K_COLS), other=0.0).to(tl.float32), axis=0)
            sum_v += tl.sum(tl.load(v_ptr + tokens[:, None] * V_COLS + cols[None, :],
                                    mask=valid[:, None] & (cols[None, :] < V_COLS), other=0.0).to(tl.float32), axis=0)
            if R_COLS > 0:
                sum_r += tl.sum(tl.load(r_ptr + tokens[:, None] * R_COLS + cols[None, :],
                                        mask=valid[:, None] & (cols[None, :] < R_COLS), other=0.0).to(tl.float32),
                                axis=0)
        tl.store(k_out + chunk * K_COLS + cols, (sum_k / count).to(k_out.dtype.element_ty), mask=cols < K_COLS)
        tl.store(v_out + chunk * V_COLS + cols, (sum_v / count).to(v_out.dtype.element_ty), mask=cols < V_COLS)
        if R_COLS > 0:
            tl.store(r_out + chunk * R_COLS + cols, (sum_r / count).to(r_out.dtype.element_ty), mask=cols < R_COLS)

    return pool_kernel


def pool_layer(
    keys: torch.Tensor, values: torch.Tensor, router_keys: torch.Tensor | None, doc_lens: Sequence[int],
    chunk_size: int, block_cols: int = 256, out: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pooled (K, V, router keys) [C, ...] of documents packed back to back ([n, Hkv, d] each),
    written into `out` when given (e.g. a memory store's slots)."""
    import triton

    layout = ref.chunk_layout(doc_lens, chunk_size)
    for name, x in (("keys", keys), ("values", values), ("router_keys", router_keys)):
        if x is not None and x.shape[0] != sum(int(n) for n in doc_lens):
            raise ValueError(f"{name} has {x.shape[0]} tokens but doc_lens sum to {sum(doc_lens)}")
    num_chunks = layout.num_chunks
    pooled = list(out) if out is not None else [
        x.new_empty((num_chunks, *x.shape[1:])) if x is not None else None for x in (keys, values, router_keys)]
    if num_chunks == 0:
        return pooled[0], pooled[1], pooled[2]
    counts = layout.chunk_token_count
    first_token = torch.cumsum(counts, 0) - counts
    columns = [x[0].numel() if x is not None else 0 for x in (keys, values, router_keys)]
    inputs = [x.contiguous() if x is not None else keys for x in (keys, values, router_keys)]
    outputs = [p if p is not None else pooled[0] for p in pooled]
    _kernel()[(num_chunks, triton.cdiv(max(columns), block_cols))](
        *inputs, *outputs, first_token.to(torch.int32).to(keys.device), counts.to(torch.int32).to(keys.device),
        K_COLS=columns[0], V_COLS=columns[1], R_COLS=columns[2],
        BLOCK_P=min(64, triton.next_power_of_2(chunk_size)), BLOCK_COLS=block_cols,
    )
    return pooled[0], pooled[1], pooled[2]
