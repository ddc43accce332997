"""The routing scan in plain PyTorch for the CPU serving path: `reference.chunk_scores` computed
without expanding KV heads, over the memory's keys in tiles read through their slots.

`reference.chunk_scores` repeats every KV head for its query-head group and forms the whole
[tokens × chunks × heads] score tensor: clear, but at a million chunks it moves gigabytes. Here
the queries of each GQA group are handled against their one KV head, and for a head mean (the
default) they are summed first (exact algebra: the mean over heads of <q_h, k_g(h)> is the dot
product of the summed group query with k_g, and the sum over KV heads folds into one matrix
product over Hkv·d), so a tile of chunks costs one [T, Hkv·d] × [Hkv·d, tile] product. Keys are
read per tile, gathered through the memory's key slots and dequantized there when float8, so
nothing of the memory's size is materialised but the [C] result.

Equal to the reference up to float32 summation order (`tests/test_routing_torch.py`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from sglang_msa.kernels import reference as ref

TILE_CHUNKS = 32768


def chunk_scores(
    router_q: torch.Tensor, num_chunks: int, read_keys: Callable[[int, int], torch.Tensor],
    similarity: ref.Similarity = "dot", head_reduce: ref.HeadReduce = "mean", query_reduce: ref.QueryReduce = "max",
    tile: int = TILE_CHUNKS,
) -> torch.Tensor:
    """[C] chunk scores as `reference.chunk_scores(router_q, keys, ...)`, where `read_keys(start,
    end)` returns keys [end - start, Hkv, d] (float) of chunks start..end-1."""
    if router_q.shape[0] == 0:
        raise ValueError("routing needs at least one routing-query token")
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"unknown similarity {similarity!r}")
    if head_reduce not in ("mean", "max"):
        raise ValueError(f"unknown head_reduce {head_reduce!r}")
    if query_reduce not in ("max", "mean", "last"):
        raise ValueError(f"unknown query_reduce {query_reduce!r}")
    dtype = ref.accumulation_dtype(router_q)
    q = router_q.to(dtype)
    if query_reduce == "last":
        q = q[-1:]
    tokens, heads, dim = q.shape
    if similarity == "cosine":
        q, scale = torch.nn.functional.normalize(q, dim=-1), 1.0
    else:
        scale = 1.0 / math.sqrt(dim)
    out = torch.empty(num_chunks, dtype=dtype, device=q.device)
    for start in range(0, num_chunks, tile):
        keys = read_keys(start, min(start + tile, num_chunks)).to(dtype)
        kv_heads = keys.shape[1]
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
        if similarity == "cosine":
            keys = torch.nn.functional.normalize(keys, dim=-1)
        grouped = q.view(tokens, kv_heads, heads // kv_heads, dim)
        if head_reduce == "mean":  # [T, Hkv·d] @ [Hkv·d, tile]: the sum over heads and dims at once
            summed = grouped.sum(dim=2).reshape(tokens, kv_heads * dim)
            per_token = summed @ keys.reshape(keys.shape[0], kv_heads * dim).T * (scale / heads)
        else:  # per KV head: [Hkv, T·G, d] @ [Hkv, d, tile], then the max over every head
            per_head = torch.bmm(grouped.transpose(0, 1).reshape(kv_heads, -1, dim), keys.permute(1, 2, 0))
            per_token = per_head.view(kv_heads, tokens, -1, keys.shape[0]).amax(dim=(0, 2)) * scale
        out[start : start + keys.shape[0]] = per_token.mean(dim=0) if query_reduce == "mean" else per_token.amax(dim=0)
    return out
