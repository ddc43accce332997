"""The CPU serving path's routing scan (`kernels/routing_torch.py`) equals the reference
`chunk_scores` on random inputs: every similarity and reduction, MHA, GQA 2/3, MQA, odd sizes,
tiles that split the chunks unevenly, float8 keys dequantized per tile, and an empty memory."""

from __future__ import annotations

import itertools

import pytest
import torch

from sglang_msa.kernels import reference as ref, routing_torch
from sglang_msa.kernels.routing_scan import quantize_fp8

SHAPES = [(1, 4, 4, 8, 1), (3, 6, 2, 24, 13), (5, 6, 3, 16, 70), (2, 8, 1, 32, 33), (4, 4, 2, 8, 0)]  # T, H, Hkv, d, C


@pytest.mark.parametrize("similarity,head_reduce,query_reduce", list(itertools.product(
    ("dot", "cosine"), ("mean", "max"), ("max", "mean", "last"))))
def test_equals_the_reference(similarity, head_reduce, query_reduce):
    gen = torch.Generator().manual_seed(hash((similarity, head_reduce, query_reduce)) % 2**31)
    for (tokens, heads, kv_heads, dim, chunks), tile, fp8 in itertools.product(SHAPES, (7, 32768), (False, True)):
        q = torch.randn(tokens, heads, dim, generator=gen)
        keys = torch.randn(chunks, kv_heads, dim, generator=gen)
        if fp8:
            stored, scales = quantize_fp8(keys)
            keys = stored.float() * scales.unsqueeze(-1)
            read = lambda start, end: stored[start:end].float() * scales[start:end].unsqueeze(-1)  # noqa: E731
        else:
            read = lambda start, end: keys[start:end]  # noqa: E731
        want = ref.chunk_scores(q.double(), keys.double(), similarity, head_reduce, query_reduce)
        got = routing_torch.chunk_scores(q, chunks, read, similarity, head_reduce, query_reduce, tile=tile)
        assert got.shape == (chunks,) and got.dtype == torch.float32
        bound = 1.0 if similarity == "cosine" or not chunks else \
            (q.norm(dim=-1).max() * keys.norm(dim=-1).max()).item() / dim**0.5
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * bound)


def test_bad_arguments_are_refused():
    q, keys = torch.randn(2, 6, 8), torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        routing_torch.chunk_scores(q, 3, lambda s, e: keys[s:e])
    with pytest.raises(ValueError, match="at least one"):
        routing_torch.chunk_scores(q[:0], 3, lambda s, e: keys[s:e])
