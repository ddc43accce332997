"""Run under TRITON_INTERPRET=1 (set by tests/test_kernels.py), or on a GPU at real shapes
(benchmarks/gpu_check.sh): the indexed attention kernel (memory part, causal context part, and
their merge) against the reference on fresh random inputs, outputs poisoned with NaN first."""

from __future__ import annotations

import itertools

import torch
from check_main import run_checks

from sglang_msa.kernels import reference as ref
from sglang_msa.kernels.indexed_attention import IndexedBatch, indexed_attention, sparse_memory_attention

TINY = [  # (heads, kv heads, head dim, value dim, [(queries, memory rows, context rows)] per request)
    (4, 2, 16, 16, [(1, 5, 9), (3, 0, 3), (2, 70, 40)]),     # decode, empty memory, prefill; GQA 2
    (6, 2, 24, 8, [(5, 1, 5), (1, 33, 100)]),               # GQA 3 (padded group), odd dims
    (8, 1, 32, 32, [(17, 130, 17)]),                        # MQA, a full prefill, several KV blocks
    (2, 2, 8, 8, [(1, 0, 1)]),                              # a first token with nothing but itself
]
REAL = [  # MSA-4B: 32 query heads, 8 KV heads, d=128; decode batch and a prefill
    (32, 8, 128, 128, [(1, 16 * 40, 900)] * 16 + [(1, 64, 30)] * 4),
    (32, 8, 128, 128, [(300, 16 * 40, 303), (57, 900, 2000)]),
]


def batch_of(requests, rows_of, gen, pool_rows, causal):
    index, batch = [], IndexedBatch([], [], [], [], [] if causal else None)
    q_start = 0
    for num_q, memory_rows, context_rows in requests:
        count = context_rows if causal else memory_rows
        batch.q_start.append(q_start)
        batch.q_count.append(num_q)
        batch.kv_start.append(sum(len(i) for i in index))
        batch.kv_count.append(count)
        if causal:
            batch.first_query_pos.append(context_rows - num_q)
        index.append(torch.randperm(pool_rows, generator=gen)[:count])
        q_start += num_q
    return torch.cat(index), batch


def check(shapes, dtype, device, gen, tolerance) -> int:
    failures = 0
    for (heads, kv_heads, dim, dim_v, requests), splits in itertools.product(shapes, (None, 3)):
        pool_rows = 4 * max(max(m, c) for _, m, c in requests) + 7
        mem_k, ctx_k = (torch.randn(pool_rows, kv_heads, dim, generator=gen) for _ in range(2))
        mem_v, ctx_v = (torch.randn(pool_rows, kv_heads, dim_v, generator=gen) for _ in range(2))
        total_q = sum(r[0] for r in requests)
        q = torch.randn(total_q, heads, dim, generator=gen)
        mem_index, mem_batch = batch_of(requests, None, gen, pool_rows, causal=False)
        ctx_index, ctx_batch = batch_of(requests, None, gen, pool_rows, causal=True)
        to = dict(device=device)
        args = dict(scale=dim**-0.5)
        poisoned = dict(out=torch.full((total_q, heads, dim_v), float("nan"), **to),
                        lse=torch.full((total_q, heads), float("nan"), **to))
        memory = (mem_k.to(device, dtype), mem_v.to(device, dtype), mem_index.to(device), mem_batch)
        context = (ctx_k.to(device, dtype), ctx_v.to(device, dtype), ctx_index.to(device), ctx_batch)
        out_m, lse_m = indexed_attention(q.to(device, dtype), *memory, **args, **poisoned, num_splits=splits)
        if splits is None:
            merged = sparse_memory_attention(q.to(device, dtype), memory, context, **args)
        else:  # the KV rows in `splits` shares, merged by a second launch
            merged = ref.merge_partial_attentions(
                out_m, lse_m, *indexed_attention(q.to(device, dtype), *context, **args, causal=True, num_splits=splits)
            )[0]
        worst_m = worst_all = 0.0
        ok = True
        for r, (num_q, memory_rows, context_rows) in enumerate(requests):
            rows = slice(mem_batch.q_start[r], mem_batch.q_start[r] + num_q)
            qr = q[rows].to(dtype).double()

            def take(x, index, batch):
                return x[index[batch.kv_start[r] : batch.kv_start[r] + batch.kv_count[r]]].to(dtype).double()

            mk, mv = take(mem_k, mem_index, mem_batch), take(mem_v, mem_index, mem_batch)
            ck, cv = take(ctx_k, ctx_index, ctx_batch), take(ctx_v, ctx_index, ctx_batch)
            want_m, want_lse = ref.partial_attention(qr, mk, mv, torch.ones(num_q, memory_rows, dtype=torch.bool),
                                                     **args)
            want_all = ref.msa_attention(ref.AttentionInputs(q=qr, prefix_k=ck[:0], prefix_v=cv[:0], memory_k=mk,
                                                             memory_v=mv, local_k=ck, local_v=cv, **args))
            got_m, got_lse, got_all = out_m[rows].cpu().double(), lse_m[rows].cpu().double(), merged[rows].cpu().double()
            norm = want_all.abs().max().clamp_min(1e-6)
            worst_m = max(worst_m, (got_m - want_m).abs().max().item() / max(want_m.abs().max().item(), 1e-6))
            worst_all = max(worst_all, ((got_all - want_all).abs().max() / norm).item())
            finite = torch.isfinite(want_lse)
            ok &= not got_m.isnan().any() and not got_all.isnan().any() and not got_lse.isnan().any()
            ok &= bool((torch.isfinite(got_lse) == finite).all())
            ok &= bool(((got_lse - want_lse)[finite].abs() <= tolerance * 10).all())
        ok &= worst_m < tolerance and worst_all < tolerance
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} H={heads}/{kv_heads} d={dim}/{dim_v} {str(dtype).replace('torch.', '')} "
              f"splits={splits or 'auto'} "
              f"requests={requests if len(requests) < 4 else f'{len(requests)} requests'} "
              f"memory_rel_err={worst_m:.1e} merged_rel_err={worst_all:.1e}")
    return failures


def checks(gpu: bool, gen: torch.Generator) -> int:
    device = "cuda" if gpu else "cpu"
    failures = check(TINY, torch.float32, device, gen, 1e-5) + check(TINY, torch.bfloat16, device, gen, 2e-2)
    if gpu:
        failures += check(REAL, torch.bfloat16, device, gen, 2e-2)
    return failures


if __name__ == "__main__":
    run_checks(checks)
