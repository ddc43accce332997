"""Triton routing scan: the score of every chunk of a memory for one request, in one pass.

S_c = reduce_u reduce_h sim(q_{u,h}, k_{c,g(h)}) exactly as `reference.chunk_scores`
(dot/√d or cosine, head mean|max, query-token max|mean|last, GQA), tiled over chunks so no
[tokens × chunks] matrix is materialised. Runs on a GPU; on a CPU only under
`TRITON_INTERPRET=1` (tests). Triton is imported lazily.

Not yet used by the serving path (which is the pure-torch reference on every device); the
chunk → document reduction and top-k follow in torch (`route_with_scan`).
"""

from __future__ import annotations

import functools

import torch

from sglang_msa.kernels import reference as ref

QUERY_REDUCE_CODES = {"max": 0, "mean": 1, "last": 2}


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_scores_kernel(q_ptr, k_ptr, out_ptr, num_tokens, num_chunks, scale,
                            H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_C: tl.constexpr, HEAD_MAX: tl.constexpr, QUERY_REDUCE: tl.constexpr):
        chunks = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        dims = tl.arange(0, BLOCK_D)
        valid_chunk = chunks < num_chunks
        valid_dim = dims < D
        best = tl.full([BLOCK_C], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_C], tl.float32)
        per_token = tl.zeros([BLOCK_C], tl.float32)
        for t in range(0, num_tokens):
            head_sum = tl.zeros([BLOCK_C], tl.float32)
            head_best = tl.full([BLOCK_C], float("-inf"), tl.float32)
            for h in tl.static_range(H):
                g = h // (H // HKV)
                keys = tl.load(k_ptr + (chunks[:, None] * HKV + g) * D + dims[None, :],
                               mask=valid_chunk[:, None] & valid_dim[None, :], other=0.0).to(tl.float32)
                query = tl.load(q_ptr + (t * H + h) * D + dims, mask=valid_dim, other=0.0).to(tl.float32)
                sim = tl.sum(keys * query[None, :], axis=1) * scale
                head_sum += sim
                head_best = tl.maximum(head_best, sim)
            if HEAD_MAX:
                per_token = head_best
            else:
                per_token = head_sum / H
            best = tl.maximum(best, per_token)
            total += per_token
        if QUERY_REDUCE == 0:
            result = best
        elif QUERY_REDUCE == 1:
            result = total / num_tokens
        else:
            result = per_token
        tl.store(out_ptr + chunks, result, mask=valid_chunk)

    return chunk_scores_kernel


def chunk_scores(
    router_q: torch.Tensor, chunk_keys: torch.Tensor, similarity: ref.Similarity = "dot",
    head_reduce: ref.HeadReduce = "mean", query_reduce: ref.QueryReduce = "max", block_c: int = 64,
) -> torch.Tensor:
    """router_q [T, H, d], chunk_keys [C, Hkv, d] -> [C] float32 (see `reference.chunk_scores`)."""
    import triton

    if router_q.shape[0] == 0:
        raise ValueError("routing needs at least one routing-query token")
    num_tokens, num_heads, dim = router_q.shape
    num_chunks, num_kv_heads, _ = chunk_keys.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    q, k = router_q.float(), chunk_keys
    if similarity == "cosine":
        q = torch.nn.functional.normalize(q, dim=-1)
        k = torch.nn.functional.normalize(k.float(), dim=-1)
        scale = 1.0
    elif similarity == "dot":
        scale = dim**-0.5
    else:
        raise ValueError(f"unknown similarity {similarity!r}")
    out = torch.empty(num_chunks, dtype=torch.float32, device=router_q.device)
    if num_chunks == 0:
        return out
    grid = (triton.cdiv(num_chunks, block_c),)
    _kernel()[grid](
        q.contiguous(), k.contiguous(), out, num_tokens, num_chunks, scale,
        H=num_heads, HKV=num_kv_heads, D=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_C=block_c,
        HEAD_MAX=head_reduce == "max", QUERY_REDUCE=QUERY_REDUCE_CODES[query_reduce],
    )
    return out


def route_with_scan(
    router_q: torch.Tensor, chunk_keys: torch.Tensor, layout: ref.ChunkLayout, top_k: int,
    similarity: ref.Similarity = "dot", head_reduce: ref.HeadReduce = "mean",
    query_reduce: ref.QueryReduce = "max", chunk_reduce: ref.ChunkReduce = "max",
) -> torch.Tensor:
    """`reference.route_documents` with the chunk scores from the Triton scan."""
    if layout.num_docs == 0:
        return torch.zeros(0, dtype=torch.long)
    scores = chunk_scores(router_q, chunk_keys, similarity, head_reduce, query_reduce).cpu()
    return ref.select_top_k(ref.document_scores(scores, layout, chunk_reduce), top_k)
