"""Triton attention over KV rows named by an index list, returning the log-sum-exp too.

One kernel serves both halves of MSA attention (`reference.msa_attention_split`):

- the memory part: every query of a request attends to the selected documents' pooled chunks
  (or full-resolution rows), read in place from the memory's K/V buffers through the list of
  their row indices — no gathered copy per layer;
- the local part: [template ; local context] read in place from SGLang's paged KV pool through
  the request's `req_to_token` slots, causal.

The two (out, lse) pairs are merged by log-sum-exp (`reference.merge_partial_attentions`).
Prefill and decode are the same launch (decode: one query per request). GQA: a program holds a
tile of query tokens × the query heads of one KV head, so each K/V row is read once per tile.

Runs on a GPU; on a CPU only under `TRITON_INTERPRET=1` (tests). Triton is imported lazily.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sglang_msa.kernels import common

LOG2E = 1.4426950408889634


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def indexed_attention_kernel(
        q_ptr, k_ptr, v_ptr, index_ptr, out_ptr, lse_ptr,
        q_start_ptr, q_count_ptr, kv_start_ptr, kv_count_ptr, first_query_pos_ptr,
        scale_log2, split_size, num_q_rows,
        H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        request = tl.program_id(1)
        kv_head = tl.program_id(2) % HKV
        split = tl.program_id(2) // HKV  # this program's share of the KV rows; its partial result
        out_ptr += split.to(tl.int64) * num_q_rows * H * DV  # goes to its own slice of out/lse
        lse_ptr += split.to(tl.int64) * num_q_rows * H
        num_queries = tl.load(q_count_ptr + request)
        first_token = tl.program_id(0) * BLOCK_T
        if first_token < num_queries:
            rows = tl.arange(0, BLOCK_T * G_PAD)
            token = first_token + rows // G_PAD
            head = kv_head * G + rows % G_PAD
            valid_row = (token < num_queries) & (rows % G_PAD < G)
            q_row = tl.load(q_start_ptr + request) + token
            dims = tl.arange(0, BLOCK_D)
            dims_v = tl.arange(0, BLOCK_DV)
            q = tl.load(q_ptr + (q_row[:, None] * H + head[:, None]) * D + dims[None, :],
                        mask=valid_row[:, None] & (dims[None, :] < D), other=0.0)
            kv_start = tl.load(kv_start_ptr + request)
            num_kv = tl.load(kv_count_ptr + request)
            if CAUSAL:  # query i sits at kv index first_query_pos + i and sees kv rows 0..that
                query_pos = tl.load(first_query_pos_ptr + request) + token
                num_kv = tl.minimum(num_kv, tl.load(first_query_pos_ptr + request) + first_token + BLOCK_T)
            split_end = tl.minimum(num_kv, (split + 1) * split_size)
            m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
            acc = tl.zeros([BLOCK_T * G_PAD, BLOCK_DV], tl.float32)
            for n0 in range(split * split_size, split_end, BLOCK_N):
                kv = n0 + tl.arange(0, BLOCK_N)
                valid_kv = kv < split_end
                slot = tl.load(index_ptr + kv_start + kv, mask=valid_kv, other=0).to(tl.int64)
                k = tl.load(k_ptr + (slot[:, None] * HKV + kv_head) * D + dims[None, :],
                            mask=valid_kv[:, None] & (dims[None, :] < D), other=0.0)
                v = tl.load(v_ptr + (slot[:, None] * HKV + kv_head) * DV + dims_v[None, :],
                            mask=valid_kv[:, None] & (dims_v[None, :] < DV), other=0.0)
                if DOT_IEEE:
                    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                visible = valid_kv[None, :]
                if CAUSAL:
                    visible = visible & (kv[None, :] <= query_pos[:, None])
                s = tl.where(visible, s * scale_log2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if DOT_IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            has_keys = l_i > 0.0
            out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
            lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / 1.4426950408889634,
                           float("-inf"))
            tl.store(out_ptr + (q_row[:, None] * H + head[:, None]) * DV + dims_v[None, :], out,
                     mask=valid_row[:, None] & (dims_v[None, :] < DV))
            tl.store(lse_ptr + q_row * H + head, lse, mask=valid_row)

    @triton.jit
    def merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_rows,
                            NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, DV: tl.constexpr,
                            BLOCK_DV: tl.constexpr):
        row = tl.program_id(0)  # one (query token, head)
        splits = tl.arange(0, BLOCK_S)
        dims = tl.arange(0, BLOCK_DV)
        lse = tl.load(part_lse_ptr + splits.to(tl.int64) * num_rows + row, mask=splits < NUM_SPLITS,
                      other=float("-inf"))
        top = tl.max(lse, axis=0)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp(lse - top_safe)
        total = tl.sum(weight, axis=0)
        parts = tl.load(part_out_ptr + (splits.to(tl.int64)[:, None] * num_rows + row) * DV + dims[None, :],
                        mask=(splits[:, None] < NUM_SPLITS) & (dims[None, :] < DV), other=0.0)
        merged = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
        tl.store(out_ptr + row.to(tl.int64) * DV + dims, merged, mask=dims < DV)
        tl.store(lse_ptr + row, tl.where(total > 0.0, top_safe + tl.log(tl.where(total > 0.0, total, 1.0)),
                                         float("-inf")))

    return indexed_attention_kernel, merge_splits_kernel


@dataclass(frozen=True)
class IndexedBatch:
    """Where each request's queries and KV rows are.

    q_start/q_count:   the request's rows in q (and in the outputs)
    kv_start/kv_count: the request's entries in `kv_index`
    first_query_pos:   causal only: the index, within the request's KV entries, of its first query
    """

    q_start: list[int]
    q_count: list[int]
    kv_start: list[int]
    kv_count: list[int]
    first_query_pos: list[int] | None = None

    def plan(self, device: torch.device | str) -> "IndexedPlan":
        """The batch's metadata on the device, built once per batch and used by every layer."""
        def int32(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        return IndexedPlan(
            q_start=int32(self.q_start), q_count=int32(self.q_count), kv_start=int32(self.kv_start),
            kv_count=int32(self.kv_count),
            first_query_pos=int32(self.first_query_pos if self.first_query_pos is not None else [0] * len(self.q_count)),
            num_requests=len(self.q_count), max_q_count=max(self.q_count, default=0),
            max_kv_count=max(self.kv_count, default=0),
            causal_ready=self.first_query_pos is not None,
        )


@dataclass(frozen=True)
class IndexedPlan:
    """`IndexedBatch` as int32 device tensors."""

    q_start: torch.Tensor
    q_count: torch.Tensor
    kv_start: torch.Tensor
    kv_count: torch.Tensor
    first_query_pos: torch.Tensor
    num_requests: int
    max_q_count: int
    max_kv_count: int
    causal_ready: bool


def indexed_attention(
    q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, kv_index: torch.Tensor,
    batch: IndexedBatch | IndexedPlan,
    scale: float, causal: bool = False, block_n: int = 64,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None, num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [N, H, d] over k_rows/v_rows [S, Hkv, d(v)] rows kv_index[...].

    Returns (out [N, H, dv] float32, lse [N, H] float32), as `reference.partial_attention` over
    the gathered rows (a query with no visible row: out 0, lse -inf). `out`/`lse` may be given
    (fixed buffers); their rows for q rows outside every request are undefined.

    Split-KV: when the batch has too few (query tile, request, KV head) programs to fill the GPU
    (small decode batches, long selections), each program takes one of `num_splits` shares of the
    KV rows and a second launch merges the shares by log-sum-exp. None picks it from the GPU's
    multiprocessor count (1 on a CPU).
    """
    import triton

    num_q, num_heads, dim = q.shape
    _, num_kv_heads, dim_v = v_rows.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    device = q.device
    plan = batch.plan(device) if isinstance(batch, IndexedBatch) else batch
    if causal and not plan.causal_ready:
        raise ValueError("causal attention needs each request's first query position")
    if out is None:
        out = torch.empty(num_q, num_heads, dim_v, dtype=torch.float32, device=device)
    if lse is None:
        lse = torch.empty(num_q, num_heads, dtype=torch.float32, device=device)
    if plan.num_requests == 0 or num_q == 0 or plan.max_q_count == 0:
        return out, lse
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_t = max(1, min(64 // group_pad, triton.next_power_of_2(plan.max_q_count)))
    block_t = max(block_t, -(-16 // group_pad))  # tl.dot needs at least 16 rows
    dot_dtype = k_rows.dtype if k_rows.dtype in (torch.bfloat16, torch.float16) else torch.float32
    q_tiles = triton.cdiv(plan.max_q_count, block_t)
    if num_splits is None:
        num_splits = _default_splits(q_tiles * plan.num_requests * num_kv_heads, plan.max_kv_count, block_n, device)
    split_size = triton.cdiv(triton.cdiv(max(plan.max_kv_count, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(plan.max_kv_count, 1), split_size)
    attention, merge = _kernel()
    if num_splits > 1:
        part_out = torch.empty(num_splits, num_q, num_heads, dim_v, dtype=torch.float32, device=device)
        part_lse = torch.empty(num_splits, num_q, num_heads, dtype=torch.float32, device=device)
    else:
        part_out, part_lse = out, lse
    attention[(q_tiles, plan.num_requests, num_kv_heads * num_splits)](
        q.to(dot_dtype).contiguous(), k_rows.contiguous(), v_rows.contiguous(),
        kv_index.to(torch.int32).contiguous(), part_out, part_lse,
        plan.q_start, plan.q_count, plan.kv_start, plan.kv_count, plan.first_query_pos,
        scale * LOG2E, split_size, num_q,
        H=num_heads, HKV=num_kv_heads, G=group, G_PAD=group_pad, D=dim, DV=dim_v,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_DV=max(16, triton.next_power_of_2(dim_v)),
        BLOCK_T=block_t, BLOCK_N=block_n, CAUSAL=causal,
        DOT_IEEE=dot_dtype == torch.float32 or common.interpreted(),
    )
    if num_splits > 1:
        merge[(num_q * num_heads,)](
            part_out, part_lse, out, lse, num_q * num_heads, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), DV=dim_v, BLOCK_DV=triton.next_power_of_2(dim_v),
        )
    return out, lse


def _default_splits(programs: int, max_kv: int, block_n: int, device: torch.device) -> int:
    """Enough KV shares for two programs per multiprocessor, each share at least 4 KV blocks."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-target // max(programs, 1))
    return max(1, min(wanted, max_kv // (4 * block_n)))


def sparse_memory_attention(
    q: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor, IndexedBatch | IndexedPlan],
    context: tuple[torch.Tensor, torch.Tensor, torch.Tensor, IndexedBatch | IndexedPlan], scale: float,
) -> torch.Tensor:
    """MSA attention of a batch: (k_rows, v_rows, index, batch) of the selected memory rows and of
    the [template ; local] context (causal), merged by log-sum-exp. Returns [N, H, dv] float32."""
    from sglang_msa.kernels.reference import merge_partial_attentions

    out_mem, lse_mem = indexed_attention(q, *memory[:3], memory[3], scale)
    out_ctx, lse_ctx = indexed_attention(q, *context[:3], context[3], scale, causal=True)
    return merge_partial_attentions(out_mem, lse_mem, out_ctx, lse_ctx)[0]
