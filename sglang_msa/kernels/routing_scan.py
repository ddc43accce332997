"""Triton routing scan: document scores of every memory document for a batch of requests, in one launch.

For request r and every chunk c of its memory range, the kernel computes
S_c = reduce_u reduce_h sim(q_{u,h}, k_{c,g(h)}) exactly as `reference.chunk_scores` (dot/√d or
cosine, head mean|max, query-token max|mean|last, GQA) and folds it straight into the score of the
chunk's document (atomic max, or the weighted sum that makes a mean): neither a [tokens × chunks]
score matrix nor the chunk scores reach HBM. For a head mean (the default), the queries of each
GQA group are summed first (exact algebra: the mean of dot products with one key is the dot product
with the summed query), so the kernel does one product per (token, KV head). Each chunk tile reads its router keys once per
routing-token tile; with up to 64 routing tokens × the GQA group in one tile (the usual case) the
scan reads the keys once. Router keys may be float32, bfloat16, float16 or float8 (e4m3/e5m2,
with a per-(chunk, KV head) float32 scale; multiplied as float16).

The top-k over document scores (D floats, ≪1% of the key bytes) is a stable sort in torch
(`best_documents`), which keeps the reference's tie rule (lower document index first).

Runs on a GPU; on a CPU only under `TRITON_INTERPRET=1` (tests). Triton is imported lazily.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sglang_msa.kernels import common, reference as ref

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def routing_scan_kernel(
        q_ptr, k_ptr, k_scale_ptr, chunk_slot_ptr, chunk_doc_ptr, chunk_weight_ptr, out_ptr,
        q_start_ptr, q_count_ptr, chunk_start_ptr, chunk_end_ptr, out_offset_ptr,
        sm_scale,
        H: tl.constexpr, HEAD_COUNT: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        COSINE: tl.constexpr, HEAD_MAX: tl.constexpr, QUERY_MEAN: tl.constexpr, CHUNK_MEAN: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_SLOTS: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        request = tl.program_id(1)
        chunk_end = tl.load(chunk_end_ptr + request)
        first_chunk = tl.load(chunk_start_ptr + request) + tl.program_id(0) * BLOCK_C
        if first_chunk < chunk_end:
            chunks = first_chunk + tl.arange(0, BLOCK_C)
            valid_chunk = chunks < chunk_end
            if HAS_SLOTS:  # keys read in place from a slot pool: chunk c's row is slot[c]
                key_rows = tl.load(chunk_slot_ptr + chunks, mask=valid_chunk, other=0).to(tl.int64)
            else:
                key_rows = chunks.to(tl.int64)
            dims = tl.arange(0, BLOCK_D)
            valid_dim = dims < D
            rows = tl.arange(0, BLOCK_T * G_PAD)
            row_token = rows // G_PAD
            row_head = rows % G_PAD
            group_mask = (tl.arange(0, G_PAD) < G)[None, :, None]
            q_start = tl.load(q_start_ptr + request)
            num_tokens = tl.load(q_count_ptr + request)
            if QUERY_MEAN:
                result = tl.zeros([BLOCK_C], tl.float32)
            else:
                result = tl.full([BLOCK_C], float("-inf"), tl.float32)
            for t0 in range(0, num_tokens, BLOCK_T):
                token = t0 + row_token
                valid_row = (token < num_tokens) & (row_head < G)
                if HEAD_MAX:
                    head_acc = tl.full([BLOCK_T, BLOCK_C], float("-inf"), tl.float32)
                else:
                    head_acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
                for g in range(HKV):  # a loop, not unrolled: shared memory stays one head's worth
                    keys = tl.load(k_ptr + (key_rows[:, None] * HKV + g) * D + dims[None, :],
                                   mask=valid_chunk[:, None] & valid_dim[None, :], other=0.0)
                    queries = tl.load(q_ptr + ((q_start + token[:, None]) * H + g * G + row_head[:, None]) * D
                                      + dims[None, :], mask=valid_row[:, None] & valid_dim[None, :], other=0.0)
                    keys_dot = keys.to(tl.float16) if HAS_SCALE else keys  # e4m3/e5m2 -> f16 is one instruction
                    if DOT_IEEE:  # float32 keys, or the interpreter (its 16-bit tl.dot is wrong)
                        sim = tl.dot(queries.to(tl.float32), tl.trans(keys_dot.to(tl.float32)),
                                     input_precision="ieee")
                    else:
                        sim = tl.dot(queries, tl.trans(keys_dot))
                    if COSINE:  # the per-row fp8 scale cancels in a cosine
                        key_f32 = keys.to(tl.float32)
                        norm = tl.sqrt(tl.sum(key_f32 * key_f32, axis=1))
                        sim = sim / tl.maximum(norm, 1e-12)[None, :]
                    elif HAS_SCALE:
                        sim = sim * tl.load(k_scale_ptr + key_rows * HKV + g, mask=valid_chunk, other=0.0)[None, :]
                    if G_PAD == 1:  # one row per token (MHA, or the group-summed queries of a head mean)
                        if HEAD_MAX:
                            head_acc = tl.maximum(head_acc, sim * sm_scale)
                        else:
                            head_acc += sim * sm_scale
                    else:
                        per_head = tl.reshape(sim * sm_scale, [BLOCK_T, G_PAD, BLOCK_C])
                        if HEAD_MAX:
                            head_acc = tl.maximum(head_acc, tl.max(tl.where(group_mask, per_head, float("-inf")),
                                                                   axis=1))
                        else:
                            head_acc += tl.sum(tl.where(group_mask, per_head, 0.0), axis=1)
                per_token = head_acc if HEAD_MAX else head_acc / HEAD_COUNT
                valid_token = (t0 + tl.arange(0, BLOCK_T)) < num_tokens
                if QUERY_MEAN:
                    result += tl.sum(tl.where(valid_token[:, None], per_token, 0.0), axis=0)
                else:
                    result = tl.maximum(result, tl.max(tl.where(valid_token[:, None], per_token, float("-inf")), axis=0))
            if QUERY_MEAN:
                result = result / num_tokens
            doc = tl.load(out_offset_ptr + request) + tl.load(chunk_doc_ptr + chunks, mask=valid_chunk, other=0)
            if CHUNK_MEAN:
                weight = tl.load(chunk_weight_ptr + chunks, mask=valid_chunk, other=0.0)
                tl.atomic_add(out_ptr + doc, result * weight, mask=valid_chunk)
            else:
                tl.atomic_max(out_ptr + doc, result, mask=valid_chunk)

    return routing_scan_kernel


@dataclass(frozen=True)
class RouterKeyTable:
    """Pooled router keys of one or more memories with their chunk → document map: chunk c's
    key is row c of `keys`, or row `chunk_slot[c]` when the keys are read in place from a slot
    pool (`memory_manager.slot_pool`).

    keys:         [C, Hkv, d] (float32 / bfloat16 / float16 / float8), or a pool's [slots, Hkv, d]
    scales:       float8 keys only: float32 dequantisation scales, one per key row and KV head
    chunk_doc:    [C] int32 document index of each chunk, counted from its memory's first document
    chunk_weight: [C] float32 1 / (chunks of the chunk's document), for chunk_reduce="mean"
    chunk_slot:   [C] int32 row of each chunk's key in `keys`, or None (row c)
    """

    keys: torch.Tensor
    scales: torch.Tensor | None
    chunk_doc: torch.Tensor
    chunk_weight: torch.Tensor
    chunk_slot: torch.Tensor | None = None

    @property
    def num_chunks(self) -> int:
        return self.chunk_doc.shape[0]

    @classmethod
    def from_layout(cls, keys: torch.Tensor, layout: ref.ChunkLayout, scales: torch.Tensor | None = None,
                    chunk_slot: torch.Tensor | None = None):
        if keys.dtype in FP8_DTYPES and scales is None:
            raise ValueError("float8 router keys need their per-(chunk, KV head) scales")
        counts = (layout.doc_chunk_start[1:] - layout.doc_chunk_start[:-1]).double()
        weight = (1.0 / counts)[layout.chunk_doc].float() if layout.num_chunks else torch.zeros(0)
        return cls(keys=keys, scales=scales, chunk_doc=layout.chunk_doc.to(torch.int32, copy=True).to(keys.device),
                   chunk_weight=weight.to(keys.device),
                   chunk_slot=None if chunk_slot is None else chunk_slot.to(device=keys.device, dtype=torch.int32))

    @classmethod
    def concat(cls, tables: list["RouterKeyTable"]) -> tuple["RouterKeyTable", list[tuple[int, int]]]:
        """Several memories' tables back to back, and each one's chunk range in the result.
        Tables that read one slot pool stay in place (their slots are concatenated)."""
        ranges, start = [], 0
        for table in tables:
            ranges.append((start, start + table.num_chunks))
            start += table.num_chunks
        doc_maps = {"chunk_doc": torch.cat([t.chunk_doc for t in tables]),
                    "chunk_weight": torch.cat([t.chunk_weight for t in tables])}
        if all(t.chunk_slot is not None for t in tables):
            if any(t.keys is not tables[0].keys for t in tables):
                raise ValueError("tables read through slots must share one key pool")
            return cls(keys=tables[0].keys, scales=tables[0].scales, **doc_maps,
                       chunk_slot=torch.cat([t.chunk_slot for t in tables])), ranges
        if any(t.chunk_slot is not None for t in tables):
            raise ValueError("cannot concatenate tables read through slots with contiguous ones")
        scales = [t.scales for t in tables]
        return cls(keys=torch.cat([t.keys for t in tables]), scales=None if scales[0] is None else torch.cat(scales),
                   **doc_maps), ranges


@dataclass(frozen=True)
class RoutingRequest:
    """One request of a batched scan: its routing queries and its memory's place in the table."""

    router_q: torch.Tensor  # [T, H, d]
    chunk_start: int  # first chunk of the memory in the table
    chunk_end: int
    num_docs: int


def _dot_dtype(key_dtype: torch.dtype) -> torch.dtype:
    """What the kernel multiplies in: 16-bit keys with 16-bit queries, float8 keys upcast to float16."""
    if key_dtype in FP8_DTYPES:
        return torch.float16
    return key_dtype


def quantize_fp8(keys: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, Hkv, d] -> (float8 keys, [C, Hkv] float32 scales) with one scale per row (absmax)."""
    limit = torch.finfo(dtype).max
    absmax = keys.float().abs().amax(dim=-1).clamp_min(1e-12)
    scales = absmax / limit
    return (keys.float() / scales.unsqueeze(-1)).to(dtype), scales


@dataclass(frozen=True)
class RoutingPlan:
    """A batch's routing metadata on the device, built once per batch and used by every layer
    (the requests' memories have the same chunk layout in every routed layer)."""

    q_start: torch.Tensor  # [R] int32 first routing token of each request in the concatenated queries
    q_count: torch.Tensor
    chunk_start: torch.Tensor
    chunk_end: torch.Tensor
    out_offset: torch.Tensor  # [R] int32 first document score of each request in the output
    doc_offsets: list[int]  # [R + 1]
    token_slices: list[tuple[int, int]]  # each request's rows of its router queries that are used
    max_tokens: int
    longest_range: int
    similarity: ref.Similarity
    head_reduce: ref.HeadReduce
    query_reduce: ref.QueryReduce
    chunk_reduce: ref.ChunkReduce

    @classmethod
    def build(
        cls, requests: list[RoutingRequest], device: torch.device | str, similarity: ref.Similarity = "dot",
        head_reduce: ref.HeadReduce = "mean", query_reduce: ref.QueryReduce = "max",
        chunk_reduce: ref.ChunkReduce = "max",
    ) -> "RoutingPlan":
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"unknown similarity {similarity!r}")
        if query_reduce not in ("max", "mean", "last"):
            raise ValueError(f"query_reduce {query_reduce!r}: the Triton routing scan reduces tokens by max, mean "
                             "or last only (standardized reductions run on kernels 'torch')")
        q_start, q_count, token_slices, offsets = [], [], [], [0]
        for request in requests:
            num_tokens = request.router_q.shape[0]
            if num_tokens == 0:
                raise ValueError("routing needs at least one routing-query token")
            used = (num_tokens - 1, num_tokens) if query_reduce == "last" else (0, num_tokens)
            q_start.append(sum(q_count))
            q_count.append(used[1] - used[0])
            token_slices.append(used)
            offsets.append(offsets[-1] + request.num_docs)

        def int32(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(
            q_start=int32(q_start), q_count=int32(q_count), chunk_start=int32([r.chunk_start for r in requests]),
            chunk_end=int32([r.chunk_end for r in requests]), out_offset=int32(offsets[:-1]), doc_offsets=offsets,
            token_slices=token_slices, max_tokens=max(q_count, default=0),
            longest_range=max((r.chunk_end - r.chunk_start for r in requests), default=0),
            similarity=similarity, head_reduce=head_reduce, query_reduce=query_reduce, chunk_reduce=chunk_reduce,
        )


def scan_layer(
    plan: RoutingPlan, router_q: list[torch.Tensor], table: RouterKeyTable, block_c: int | None = None,
) -> torch.Tensor:
    """One routed layer: every request's document scores, back to back ([sum of num_docs] float32,
    request r at plan.doc_offsets[r]:plan.doc_offsets[r+1]), in one kernel launch.

    router_q: each request's [T, H, d] routing queries in this layer. block_c: chunks per program;
    None = 128 for float8 keys, 64 otherwise (the fastest in benchmarks/kernels.py's sweep on an H100)."""
    import triton

    keys = table.keys
    _, num_kv_heads, dim = keys.shape
    if block_c is None:
        block_c = 128 if keys.dtype in FP8_DTYPES else 64
    fill = 0.0 if plan.chunk_reduce == "mean" else float("-inf")
    out = torch.full((max(plan.doc_offsets[-1], 1),), fill, dtype=torch.float32, device=keys.device)
    if not router_q or plan.longest_range == 0:
        return out[: plan.doc_offsets[-1]]
    num_heads = router_q[0].shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    q_all = torch.cat([q[start:end] for q, (start, end) in zip(router_q, plan.token_slices)])
    if plan.similarity == "cosine":
        q_all = torch.nn.functional.normalize(q_all.float(), dim=-1)
    group = num_heads // num_kv_heads
    if plan.head_reduce == "mean":
        # sum_h <q_h, k_g(h)> = sum_g <sum_{h in g} q_h, k_g>: one query row per KV head, G× fewer
        # products and no per-head reduction in the kernel
        q_all = q_all.float().view(q_all.shape[0], num_kv_heads, group, dim).sum(dim=2)
        group = 1
    group_pad = triton.next_power_of_2(group)
    # up to 128 (token, head) rows per tile: the usual routing query (≤ 32 tokens × a GQA group
    # of 4) reads each key tile once
    block_t = max(1, min(128, triton.next_power_of_2(plan.max_tokens) * group_pad) // group_pad)
    block_t = max(block_t, -(-16 // group_pad))  # tl.dot needs at least 16 rows
    _kernel()[(triton.cdiv(plan.longest_range, block_c), len(router_q))](
        q_all.to(_dot_dtype(keys.dtype)).contiguous(), keys.contiguous(),
        table.scales if table.scales is not None else out,
        table.chunk_slot if table.chunk_slot is not None else table.chunk_doc, table.chunk_doc, table.chunk_weight, out,
        plan.q_start, plan.q_count, plan.chunk_start, plan.chunk_end, plan.out_offset,
        1.0 if plan.similarity == "cosine" else dim**-0.5,
        H=num_kv_heads * group, HEAD_COUNT=num_heads, HKV=num_kv_heads, G=group, G_PAD=group_pad, D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_T=block_t, BLOCK_C=block_c,
        COSINE=plan.similarity == "cosine", HEAD_MAX=plan.head_reduce == "max", QUERY_MEAN=plan.query_reduce == "mean",
        CHUNK_MEAN=plan.chunk_reduce == "mean", HAS_SCALE=table.scales is not None,
        HAS_SLOTS=table.chunk_slot is not None, DOT_IEEE=keys.dtype == torch.float32 or common.interpreted(),
        num_warps=8 if block_t * group_pad >= 128 else 4, num_stages=2,
    )
    return out[: plan.doc_offsets[-1]]


def document_scores_batch(
    requests: list[RoutingRequest], table: RouterKeyTable, similarity: ref.Similarity = "dot",
    head_reduce: ref.HeadReduce = "mean", query_reduce: ref.QueryReduce = "max",
    chunk_reduce: ref.ChunkReduce = "max", block_c: int | None = None,
) -> list[torch.Tensor]:
    """Every request's [num_docs] float32 document scores (`reference.document_scores` of
    `reference.chunk_scores`) in one layer: a plan and one scan."""
    plan = RoutingPlan.build(requests, table.keys.device, similarity, head_reduce, query_reduce, chunk_reduce)
    scores = scan_layer(plan, [r.router_q for r in requests], table, block_c)
    return split_scores(plan, scores)


def split_scores(plan: RoutingPlan, scores: torch.Tensor) -> list[torch.Tensor]:
    offsets = plan.doc_offsets
    return [scores[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def best_documents(doc_scores: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """`reference.select_top_k` of one request's scores (best first, ties to the lower index,
    -inf never selected) with their scores: ranked on the scores' device (on a CPU core, 50K
    documents take ~3 ms per layer to sort), the best k copied to the host at once."""
    scores, order = torch.sort(doc_scores, descending=True, stable=True)
    best = torch.stack([scores[:k].double(), order[:k].double()]).cpu()
    kept = best[0] > float("-inf")
    return best[1][kept].long().tolist(), best[0][kept].tolist()


def top_k_per_request(doc_scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Each request's `best_documents` indices (int64, on the host)."""
    return [torch.tensor(best_documents(scores, k)[0], dtype=torch.int64) for scores in doc_scores]


def route_batch(
    requests: list[RoutingRequest], table: RouterKeyTable, top_k: int, similarity: ref.Similarity = "dot",
    head_reduce: ref.HeadReduce = "mean", query_reduce: ref.QueryReduce = "max",
    chunk_reduce: ref.ChunkReduce = "max",
) -> list[torch.Tensor]:
    """Each request's selected document indices (within its memory), best first."""
    scores = document_scores_batch(requests, table, similarity, head_reduce, query_reduce, chunk_reduce)
    return top_k_per_request(scores, top_k)
