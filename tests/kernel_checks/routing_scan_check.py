"""Run under TRITON_INTERPRET=1 (set by tests/test_kernels.py), or on a GPU at real shapes
(benchmarks/gpu_check.sh): the batched Triton routing scan against the reference on fresh random
inputs. Prints one line per case; exits non-zero on a mismatch."""

from __future__ import annotations

import itertools

import torch
from check_main import run_checks

from sglang_msa.kernels import reference as ref
from sglang_msa.kernels.routing_scan import RouterKeyTable, RoutingRequest, quantize_fp8, route_batch, \
    document_scores_batch

TINY = [  # (routing tokens per request, heads, kv heads, head dim, memories' document lengths, chunk size)
    ([1, 2], 4, 2, 16, [[5, 9, 3], [40]], 4),               # GQA 2, partial chunks, two tenants
    ([3, 1, 2], 6, 2, 24, [[13, 1, 40, 7], [2, 2]], 8),     # odd head dim, GQA 3 (padded group)
    ([2], 4, 4, 8, [[70]], 4),                              # one document, chunks over several tiles
    ([5, 5], 8, 1, 32, [[3] * 30, []], 2),                  # MQA, many small documents, an empty memory
    ([1, 1], 1, 1, 384, [[20, 7, 64], [9]], 8),             # external router: one head of 384 (not a power of 2)
]
REAL = [  # MSA-4B routing shapes: 32 query heads, 8 KV heads, d=128, P=64
    ([24, 70, 1], 32, 8, 128, [[4096] * 40 + [100], [64 * 5] * 300, [777] * 3], 64),
    ([1, 1], 1, 1, 384, [[512] * 2000, [300] * 7], 64),   # external router (MiniLM): one query row, one head
]


ALL_REDUCTIONS = list(itertools.product(("dot", "cosine"), ("mean", "max"), ("max", "mean", "last"), ("max", "mean")))
# on a GPU every combination is a compilation: a few that between them use every option
GPU_REDUCTIONS = [("dot", "mean", "max", "max"), ("cosine", "max", "mean", "mean"), ("dot", "max", "last", "max")]


def rounded_reference(q, keys, similarity, head_reduce, query_reduce, rounding):
    """The reference as the kernel rounds its query to `rounding` (the keys' 16-bit dtype; float16
    for float8 keys): for cosine the unit query (the keys' norms are divided out after the
    product), for a head mean the sum of each GQA group's queries (the mean over H heads is the
    mean over the Hkv summed heads × Hkv / H)."""
    heads, kv_heads, dim = q.shape[1], keys.shape[1], q.shape[2]
    base, undo_scale = q.float(), 1.0
    if similarity == "cosine":  # scored as "dot" below, which divides by sqrt(d)
        base, undo_scale = torch.nn.functional.normalize(base, dim=-1), dim**0.5
        keys = torch.nn.functional.normalize(keys, dim=-1)
    if head_reduce == "mean":
        summed = base.view(q.shape[0], kv_heads, heads // kv_heads, dim).sum(dim=2)
        return ref.chunk_scores(summed.to(rounding).double() * undo_scale, keys, "dot", "mean",
                                query_reduce) * kv_heads / heads
    return ref.chunk_scores(base.to(rounding).double() * undo_scale, keys, "dot", head_reduce, query_reduce)


def in_pool(stored: torch.Tensor, scales: torch.Tensor | None, gen: torch.Generator):
    """The keys scattered over a larger slot pool (other rows NaN: a wrong read shows) and their slots."""
    rows = stored.shape[0]
    slots = torch.randperm(2 * rows + 3, generator=gen)[:rows] + 1
    pool = torch.full((2 * rows + 4, *stored.shape[1:]), float("nan")).to(stored.dtype)
    pool[slots] = stored
    pool_scales = None
    if scales is not None:
        pool_scales = torch.full((pool.shape[0], *scales.shape[1:]), float("nan"))
        pool_scales[slots] = scales
    return pool, pool_scales, slots


def check(shapes, dtypes, reductions, device, block_c, gen, in_place: bool = False) -> int:
    """`in_place`: every memory's keys are read through slots of one shared pool."""
    failures = 0
    for (tokens, heads, kv_heads, dim, memories, chunk), dtype, (similarity, head_reduce, query_reduce, chunk_reduce) \
            in itertools.product(shapes, dtypes, reductions):
        tables, layouts, float_keys, all_keys, all_scales = [], [], [], [], []
        for doc_lens in memories:
            layout = ref.chunk_layout(doc_lens, chunk)
            keys = torch.randn(layout.num_chunks, kv_heads, dim, generator=gen)
            if dtype == "fp8":
                stored, scales = quantize_fp8(keys)
                float_keys.append(stored.float() * scales.unsqueeze(-1))
            else:
                stored, scales = keys.to(dtype), None
                float_keys.append(stored.float())
            all_keys.append(stored)
            all_scales.append(scales)
            tables.append(RouterKeyTable.from_layout(stored.to(device), layout,
                                                     None if scales is None else scales.to(device)))
            layouts.append(layout)
        if in_place:
            pool, pool_scales, slots = in_pool(torch.cat(all_keys),
                                               None if dtype != "fp8" else torch.cat(all_scales), gen)
            pool, pool_scales = pool.to(device), None if pool_scales is None else pool_scales.to(device)
            starts = [0, *itertools.accumulate(layout.num_chunks for layout in layouts)]
            tables = [RouterKeyTable.from_layout(pool, layout, pool_scales, slots[starts[i]:starts[i + 1]])
                      for i, layout in enumerate(layouts)]
        table, ranges = RouterKeyTable.concat(tables)
        queries = [torch.randn(t, heads, dim, generator=gen) for t in tokens]
        requests = [RoutingRequest(router_q=q.to(device), chunk_start=ranges[i % len(memories)][0],
                                   chunk_end=ranges[i % len(memories)][1], num_docs=layouts[i % len(memories)].num_docs)
                    for i, q in enumerate(queries)]
        got_scores = document_scores_batch(requests, table, similarity, head_reduce, query_reduce, chunk_reduce,
                                           block_c=block_c)
        got_top = route_batch(requests, table, 3, similarity, head_reduce, query_reduce, chunk_reduce)
        worst, ok = 0.0, True
        for i, q in enumerate(queries):
            memory = i % len(memories)
            layout = layouts[memory]
            if layout.num_docs == 0:
                ok &= got_scores[i].numel() == 0 and got_top[i].numel() == 0
                continue
            keys = float_keys[memory].double()
            if dtype == torch.float32:
                per_chunk = ref.chunk_scores(q.double(), keys, similarity, head_reduce, query_reduce)
            else:
                rounding = torch.float16 if dtype == "fp8" else dtype
                per_chunk = rounded_reference(q, keys, similarity, head_reduce, query_reduce, rounding)
            want = ref.document_scores(per_chunk, layout, chunk_reduce)
            got = got_scores[i].cpu().double()
            # relative to the Cauchy-Schwarz bound on any score (cancellation can make the scores
            # themselves far smaller than the products that sum to them)
            if similarity == "cosine":
                bound = 1.0
            else:
                bound = (q.double().norm(dim=-1).max() * keys.norm(dim=-1).max()).item() / dim**0.5
            error = ((got - want).abs().max() / bound).item()
            worst = max(worst, error)
            tolerance = 1e-5  # float32 accumulation: the reference models every rounding of the inputs
            ok &= bool(torch.isfinite(got).all()) and error < tolerance
            # The selection: as many documents as the reference, each scoring (by the reference)
            # at least the reference's k-th best, up to the tolerance (ties may resolve either way).
            want_top = ref.select_top_k(want, 3)
            ok &= len(got_top[i]) == len(want_top) and bool(
                (want[got_top[i]] >= want[want_top[-1]] - tolerance * bound).all())
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} T={tokens} H={heads}/{kv_heads} d={dim} docs={[len(m) for m in memories]} "
              f"{str(dtype).replace('torch.', '')} {similarity}/{head_reduce}/{query_reduce}/{chunk_reduce} "
              f"{'slots ' if in_place else ''}rel_err={worst:.1e}")
    return failures


def checks(gpu: bool, gen: torch.Generator) -> int:
    dtypes = [torch.float32, torch.bfloat16, "fp8"]
    if gpu:
        return (check(TINY, dtypes, GPU_REDUCTIONS, "cuda", 16, gen) + check(REAL, dtypes[1:], GPU_REDUCTIONS, "cuda", 64, gen)
                + check(TINY, dtypes, GPU_REDUCTIONS, "cuda", 16, gen, in_place=True)
                + check(REAL, dtypes[1:], GPU_REDUCTIONS[:1], "cuda", 64, gen, in_place=True))
    return check(TINY, dtypes, ALL_REDUCTIONS, "cpu", 16, gen) + check(TINY, dtypes, ALL_REDUCTIONS[::4], "cpu", 16, gen,
                                                                     in_place=True)


if __name__ == "__main__":
    run_checks(checks)
