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

Standardized reductions (`query_reduce` "zmax" / "zmean") need each token's mean and standard
deviation over all chunks before the token reduction: with a head mean they come in closed form
from the memory's key moments (`key_moments.KeyMoments`, kept by the store); otherwise (head max,
whose score is not linear in the key) from a first pass over the tiles that accumulates them
(Chan's parallel Welford update), before the pass that standardizes and reduces.

Equal to the reference up to float32 summation order (`tests/test_routing_torch.py`,
`tests/test_zscore_routing.py`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from sglang_msa.kernels import reference as ref
from sglang_msa.kernels.key_moments import KeyMoments

TILE_CHUNKS = 32768
KeyReader = Callable[[int, int], torch.Tensor]


def chunk_scores(
    router_q: torch.Tensor, num_chunks: int, read_keys: KeyReader,
    similarity: ref.Similarity = "dot", head_reduce: ref.HeadReduce = "mean", query_reduce: ref.QueryReduce = "max",
    tile: int = TILE_CHUNKS, key_moments: KeyMoments | None = None,
) -> torch.Tensor:
    """[C] chunk scores as `reference.chunk_scores(router_q, keys, ...)`, where `read_keys(start,
    end)` returns keys [end - start, Hkv, d] (float) of chunks start..end-1. `key_moments`: the
    moments of all C keys (`KeyMoments`), used by a standardized reduction with a head mean; without
    them the token moments are taken from the scores in a first pass over the keys."""
    if router_q.shape[0] == 0:
        raise ValueError("routing needs at least one routing-query token")
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"unknown similarity {similarity!r}")
    if head_reduce not in ("mean", "max"):
        raise ValueError(f"unknown head_reduce {head_reduce!r}")
    if query_reduce not in ("max", "mean", "last", *ref.STANDARDIZED_REDUCTIONS):
        raise ValueError(f"unknown query_reduce {query_reduce!r}")
    q = router_q.to(ref.accumulation_dtype(router_q))
    if query_reduce == "last":
        q = q[-1:]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if similarity == "cosine":
        q, scale = torch.nn.functional.normalize(q, dim=-1), 1.0
    out = torch.empty(num_chunks, dtype=q.dtype, device=q.device)
    if num_chunks == 0:
        return out
    tiles = (q, num_chunks, read_keys, similarity, head_reduce, scale, tile)
    standardize = query_reduce in ref.STANDARDIZED_REDUCTIONS
    if standardize:
        if key_moments is not None and head_reduce == "mean":
            token_mean, token_std = _moments_from_keys(q, num_chunks, scale, key_moments)
        else:
            token_mean, token_std = _moments_of_scores(_token_score_tiles(*tiles))
    for start, per_token in _token_score_tiles(*tiles):
        if standardize:
            per_token = ref.standardized_scores(per_token, token_mean, token_std)
        reduced = per_token.mean(dim=0) if query_reduce in ("mean", "zmean") else per_token.amax(dim=0)
        out[start : start + per_token.shape[1]] = reduced.to(out.dtype)
    return out


def _head_mean_queries(q: torch.Tensor, kv_heads: int, scale: float) -> torch.Tensor:
    """[T, H, d] queries -> [T, Hkv·d]: each GQA group summed and scaled so that its product with a
    flattened key [Hkv·d] is the head mean of the token's scores (exact algebra, see the module)."""
    tokens, heads, dim = q.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    summed = q.view(tokens, kv_heads, heads // kv_heads, dim).sum(dim=2).reshape(tokens, kv_heads * dim)
    return summed * (scale / heads)


def _moments_from_keys(q: torch.Tensor, num_chunks: int, scale: float,
                       key_moments: KeyMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation [T] of each token's head-mean scores over the memory's chunks, in
    closed form from the moments of their keys (`KeyMoments.token_moments`)."""
    if key_moments.count != num_chunks:
        raise ValueError(f"key moments of {key_moments.count} chunks for a memory of {num_chunks}")
    return key_moments.token_moments(_head_mean_queries(q, key_moments.num_features // q.shape[-1], scale))


def _token_score_tiles(
    q: torch.Tensor, num_chunks: int, read_keys: KeyReader, similarity: ref.Similarity,
    head_reduce: ref.HeadReduce, scale: float, tile: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first chunk, [T, tile] head-reduced scores of every token) of each tile of chunks, in order."""
    tokens, heads, dim = q.shape
    for start in range(0, num_chunks, tile):
        keys = read_keys(start, min(start + tile, num_chunks)).to(q.dtype)
        kv_heads = keys.shape[1]
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
        if similarity == "cosine":
            keys = torch.nn.functional.normalize(keys, dim=-1)
        if head_reduce == "mean":  # [T, Hkv·d] @ [Hkv·d, tile]: the sum over heads and dims at once
            yield start, _head_mean_queries(q, kv_heads, scale) @ keys.reshape(keys.shape[0], kv_heads * dim).T
        else:  # per KV head: [Hkv, T·G, d] @ [Hkv, d, tile], then the max over every head
            grouped = q.view(tokens, kv_heads, heads // kv_heads, dim)
            per_head = torch.bmm(grouped.transpose(0, 1).reshape(kv_heads, -1, dim), keys.permute(1, 2, 0))
            yield start, per_head.view(kv_heads, tokens, -1, keys.shape[0]).amax(dim=(0, 2)) * scale


def _moments_of_scores(tiles: Iterator[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation [T] (float64) of each token's scores over all tiles, merging the
    tiles' own means and centred sums of squares (Chan et al.), so no tile is kept."""
    count, mean, centred = 0, None, None
    for _, scores in tiles:
        scores = scores.double()
        tile_count, tile_mean = scores.shape[1], scores.mean(dim=1)
        tile_centred = ((scores - tile_mean[:, None]) ** 2).sum(dim=1)
        if mean is None:
            count, mean, centred = tile_count, tile_mean, tile_centred
            continue
        total = count + tile_count
        delta = tile_mean - mean
        mean = mean + delta * (tile_count / total)
        centred = centred + tile_centred + delta**2 * (count * tile_count / total)
        count = total
    return mean, (centred / count).sqrt()
