"""Per-batch MSA plan, built once in `init_forward_metadata`: which requests of the batch are
memory queries or document ingestions, where their tokens are, and their MSA positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_msa.memory_manager.requests import IngestState, QueryState, RequestRegistry


@dataclass(frozen=True)
class PlannedRequest:
    index: int  # position in the batch
    row: int  # req_to_token row
    token_start: int  # first row of this request in the batch's q/k/v
    num_new: int  # tokens computed in this pass
    prefix_len: int  # tokens already in the KV pool before this pass
    seq_len: int  # tokens in the KV pool after this pass
    state: QueryState | IngestState


@dataclass(frozen=True)
class BatchPlan:
    queries: list[PlannedRequest]
    ingestions: list[PlannedRequest]


def msa_positions(token_index: torch.Tensor, template_tokens: int, position_offset: int) -> torch.Tensor:
    """Template tokens keep 0..T-1; local token u (index T+u) sits at position_offset + u."""
    shifted = token_index - template_tokens + position_offset
    return torch.where(token_index < template_tokens, token_index, shifted)


def plan_batch(forward_batch, registry: RequestRegistry) -> BatchPlan | None:
    """Look the batch's requests up in the registry; shift query positions in place.

    Returns None when no request of the batch takes part in MSA (the backend is then exactly
    dense attention).
    """
    rids = forward_batch.rids or []
    states = [registry.get(rid) for rid in rids]
    if not any(states):
        return None
    mode = forward_batch.forward_mode
    seq_lens = forward_batch.seq_lens.tolist()
    rows = forward_batch.req_pool_indices.tolist()
    if mode.is_decode():
        num_new = [1] * len(rids)
    else:
        num_new = forward_batch.extend_seq_lens.tolist()
    queries, ingestions = [], []
    token_start = 0
    for index, state in enumerate(states):
        planned = PlannedRequest(
            index=index, row=rows[index], token_start=token_start, num_new=num_new[index],
            prefix_len=seq_lens[index] - num_new[index], seq_len=seq_lens[index], state=state,
        )
        if isinstance(state, QueryState):
            queries.append(planned)
            positions = forward_batch.positions[token_start : token_start + num_new[index]]
            token_index = torch.arange(planned.prefix_len, planned.seq_len, device=positions.device)
            positions.copy_(msa_positions(token_index, state.params.template_tokens, state.position_offset))
        elif isinstance(state, IngestState):
            ingestions.append(planned)
        token_start += num_new[index]
    return BatchPlan(queries=queries, ingestions=ingestions)
