"""MSA attention of a whole batch through the Triton kernels (`kernels="triton"`): planned once
per batch, run per routed layer.

- `plan_context` (once per batch, in `init_forward_metadata`): which rows of the batch's q are
  memory-query tokens after their template, and each request's KV slots in SGLang's paged pool
  (its `req_to_token` row) as one index list: the [template ; local] part is read in place.
- `BatchMemoryRows` (per layer): where the selected documents' rows of every query request of
  the batch are: read in place from the device slot pool through their slots when every
  selection is there, else gathered back to back. Selections are frozen after prefill, so this
  is built when the batch's selections change (a request joins, leaves or routes) and reused by
  later decode steps.
- `attend_batch` (per layer): two launches of `indexed_attention` (memory rows; causal context)
  and their log-sum-exp merge, written over the dense output of those rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from sglang_msa.attention_backend.plan import PlannedRequest
from sglang_msa.kernels.indexed_attention import IndexedBatch, IndexedPlan, sparse_memory_attention
from sglang_msa.memory_manager.requests import LayerSelection


@dataclass(frozen=True)
class ContextPlan:
    requests: list[PlannedRequest]  # the query requests with local tokens in this pass
    q_rows: torch.Tensor  # [N] rows of the batch's q/out that get memory attention
    kv_index: torch.Tensor  # [sum of seq_len] int32 KV-pool slots, request after request
    indexed: IndexedPlan
    batch: IndexedBatch


def plan_context(queries: list[PlannedRequest], req_to_token: torch.Tensor) -> ContextPlan | None:
    requests, rows, slots = [], [], []
    batch = IndexedBatch(q_start=[], q_count=[], kv_start=[], kv_count=[], first_query_pos=[])
    for request in queries:
        num_local_new = min(request.num_new, request.seq_len - request.state.params.template_tokens)
        if num_local_new <= 0:
            continue  # template tokens only: they never see memory
        first_row = request.token_start + request.num_new - num_local_new
        requests.append(request)
        rows.append(torch.arange(first_row, first_row + num_local_new))
        slots.append(req_to_token[request.row, : request.seq_len])
        batch.q_start.append(sum(batch.q_count))
        batch.q_count.append(num_local_new)
        batch.kv_start.append(sum(batch.kv_count))
        batch.kv_count.append(request.seq_len)
        batch.first_query_pos.append(request.seq_len - num_local_new)
    if not requests:
        return None
    device = req_to_token.device
    return ContextPlan(requests=requests, q_rows=torch.cat(rows).to(device), kv_index=torch.cat(slots).to(torch.int32),
                       indexed=batch.plan(device), batch=batch)


class BatchMemoryRows:
    """Per layer: the batch's selected memory rows back to back, rebuilt only when the selections
    change. The query layout comes from each batch's `ContextPlan` (decode steps differ from the
    prefill that made the selections)."""

    def __init__(self):
        self._by_layer: dict[int, tuple[tuple[LayerSelection, ...], tuple]] = {}

    def get(self, layer_id: int, selections: list[LayerSelection], context: ContextPlan) -> tuple:
        cached = self._by_layer.get(layer_id)
        if cached is None or len(cached[0]) != len(selections) or any(
            a is not b for a, b in zip(cached[0], selections)
        ):
            counts = [s.num_rows for s in selections]
            memory_k, memory_v, index = _rows_of(selections)
            device = memory_k.device
            rows = (
                memory_k, memory_v, index,
                torch.tensor([0, *itertools.accumulate(counts[:-1])], dtype=torch.int32, device=device),
                torch.tensor(counts, dtype=torch.int32, device=device), max(counts),
            )
            cached = (tuple(selections), rows)
            self._by_layer[layer_id] = cached
        memory_k, memory_v, index, kv_start, kv_count, max_kv = cached[1]
        queries = context.indexed
        plan = IndexedPlan(
            q_start=queries.q_start, q_count=queries.q_count, kv_start=kv_start, kv_count=kv_count,
            first_query_pos=queries.first_query_pos, num_requests=queries.num_requests,
            max_q_count=queries.max_q_count, max_kv_count=max_kv, causal_ready=False,
        )
        return memory_k, memory_v, index, plan


def _rows_of(selections: list[LayerSelection]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K rows, V rows, index of each selection's rows in them, back to back): the device pool's
    buffers and the selections' slots when every non-empty selection is in place there, else
    the rows gathered into tensors of their own."""
    placed = [s.in_place for s in selections if s.num_rows]
    if placed and all(p is not None and p.same_buffers(placed[0]) for p in placed):
        index = torch.cat([p.slots for p in placed])
        return placed[0].key_buffer, placed[0].value_buffer, index
    parts = [s.gathered() for s in selections]
    memory_k = torch.cat([k for k, _ in parts])
    return memory_k, torch.cat([v for _, v in parts]), torch.arange(memory_k.shape[0], dtype=torch.int32,
                                                                    device=memory_k.device)


def attend_batch(
    q: torch.Tensor, out: torch.Tensor, layer, context: ContextPlan, selections: list[LayerSelection],
    key_buffer: torch.Tensor, value_buffer: torch.Tensor, memory_rows: BatchMemoryRows,
) -> None:
    """Overwrite `out`'s memory-query rows with MSA attention (q, out: [tokens, H·d])."""
    queries = q[context.q_rows].view(-1, layer.tp_q_head_num, layer.qk_head_dim)
    merged = sparse_memory_attention(
        queries, memory_rows.get(layer.layer_id, selections, context),
        (key_buffer, value_buffer, context.kv_index, context.indexed), scale=layer.scaling,
    )
    out.view(out.shape[0], layer.tp_q_head_num, layer.v_head_dim)[context.q_rows] = merged.to(out.dtype)
