"""Run under TRITON_INTERPRET=1 (set by tests/test_kernels.py), or on a GPU at real shapes
(benchmarks/gpu_check.sh): the Triton pooling kernel against `reference.pool_chunks` on fresh
random inputs, outputs poisoned with NaN first."""

from __future__ import annotations

import torch
from check_main import run_checks

from sglang_msa.kernels import reference as ref
from sglang_msa.kernels.pooling import pool_layer

TINY = [  # (kv heads, head dim, value dim, document lengths, chunk size, with router keys)
    (2, 8, 8, [5, 9, 3], 4, True),          # partial last chunks
    (1, 24, 16, [1], 8, False),             # one token, training-free (no router keys)
    (3, 16, 16, [64, 130, 7], 64, True),    # the MSA chunk size, more columns than one block
    (2, 8, 8, [], 4, True),                 # nothing to pool
]
REAL = [(8, 128, 128, [4096, 1000, 64, 1, 8191], 64, True)]


def check(shapes, dtype, device, gen, tolerance, block_cols) -> int:
    failures = 0
    for kv_heads, dim, dim_v, doc_lens, chunk, with_router in shapes:
        n = sum(doc_lens)
        k = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, dim_v, generator=gen).to(dtype)
        r = torch.randn(n, kv_heads, dim, generator=gen).to(dtype) if with_router else None
        num_chunks = ref.chunk_layout(doc_lens, chunk).num_chunks
        poisoned = [None if x is None else torch.full((num_chunks, *x.shape[1:]), float("nan"), dtype=dtype,
                                                      device=device) for x in (k, v, r)]
        got = pool_layer(k.to(device), v.to(device), None if r is None else r.to(device), doc_lens, chunk,
                         block_cols=block_cols, out=poisoned)
        ok, worst = True, 0.0
        for x, pooled in zip((k, v, r), got):
            if x is None:
                ok &= pooled is None
                continue
            want = ref.pool_chunks(x.double(), doc_lens, chunk)
            ok &= pooled.dtype == dtype
            pooled = pooled.cpu().double()
            ok &= pooled.shape == want.shape and not pooled.isnan().any()
            if want.numel():
                worst = max(worst, ((pooled - want).abs().max() / want.abs().max()).item())
        ok &= worst < tolerance
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} Hkv={kv_heads} d={dim}/{dim_v} docs={doc_lens} P={chunk} "
              f"router={with_router} {str(dtype).replace('torch.', '')} rel_err={worst:.1e}")
    return failures


def checks(gpu: bool, gen: torch.Generator) -> int:
    device = "cuda" if gpu else "cpu"
    failures = check(TINY, torch.float32, device, gen, 1e-6, 32) + check(TINY, torch.bfloat16, device, gen, 1e-2, 32)
    if gpu:
        failures += check(REAL, torch.bfloat16, device, gen, 1e-2, 256)
    return failures


if __name__ == "__main__":
    run_checks(checks)
