"""Memory Parallel (spec §9): a memory sharded by document over the ranks of a process group,
routed with an exact global top-k, its selected content read where it lives.

Per routed layer, every rank calls, in the same order (lock-step, like the reference engine):

1. `route_sharded`: all-gather the ranks' routing queries; each rank scores every rank's query
   against its own shard and keeps a local top-k of (score, gid, rows); the candidates are
   all-gathered and each requester takes the top-k of the world × k candidates. This is exact:
   every document lives wholly in one shard.
2. `fetch_selected`: each owner sends the requester the rows (pooled chunks, or full-resolution
   tokens) of the selected documents it holds, point to point; the requester assembles them in
   the selection's order.

The same code runs over gloo between CPU processes (CI) and NCCL between GPUs. Serving does not
call it yet: the scheduler's store is single-rank (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sglang_msa.config import MSAOptions
from sglang_msa.kernels import reference as ref, routing_torch
from sglang_msa.memory_manager.store import MemoryStore, RoutingView


def assign_shards(chunk_counts: list[int], world_size: int) -> list[int]:
    """Rank of each document, in order: the rank holding the fewest chunks so far (lowest on ties)."""
    load = [0] * world_size
    owners = []
    for chunks in chunk_counts:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners.append(rank)
        load[rank] += chunks
    return owners


@dataclass(frozen=True)
class ShardedSelection:
    """A requester's global top-k: best first, with where each document lives."""

    gids: list[int]
    scores: list[float]
    owners: list[int]
    rows: list[int]  # rows each document contributes to attention (chunks, or tokens in full mode)


def _all_gather_padded(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs between ranks."""
    world = dist.get_world_size(group)
    length = torch.tensor([tensor.shape[0]], dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = max(1, int(max(lengths).item()))  # never an empty collective
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [part[: int(n.item())] for part, n in zip(gathered, lengths)]


def route_sharded(router_q: torch.Tensor, shard: RoutingView, rows_per_doc: dict[int, int], options: MSAOptions,
                  group=None) -> ShardedSelection:
    """This rank's request routed over the whole sharded memory (router_q: [T, H, d]).

    `shard` is this rank's part of the memory in this layer; `rows_per_doc[gid]` the rows each of
    its documents would contribute to attention.
    """
    world, k = dist.get_world_size(group), options.top_k_docs
    similarity = "dot" if options.similarity == "auto" else options.similarity
    queries = _all_gather_padded(router_q.float(), group)
    candidates = torch.full((world, k, 3), float("-inf"), dtype=torch.float64)  # (score, gid, rows) per requester
    for requester, q in enumerate(queries):
        if not shard.gids or q.shape[0] == 0:
            continue
        per_chunk = routing_torch.chunk_scores(q, shard.layout.num_chunks, shard.read_keys, similarity,
                                               options.head_reduce, options.query_reduce)
        doc_scores = ref.document_scores(per_chunk, shard.layout, options.chunk_reduce)
        for slot, index in enumerate(ref.select_top_k(doc_scores, k).tolist()):
            gid = shard.gids[index]
            candidates[requester, slot] = torch.tensor([float(doc_scores[index]), gid, rows_per_doc[gid]],
                                                       dtype=torch.float64)
    gathered = [torch.empty_like(candidates) for _ in range(world)]
    dist.all_gather(gathered, candidates, group=group)
    me = dist.get_rank(group)
    pool = [(float(c[0]), int(c[1]), owner, int(c[2]))
            for owner, part in enumerate(gathered) for c in part[me] if c[0] != float("-inf")]
    best = sorted(pool, key=lambda c: (-c[0], c[1]))[:k]  # ties to the lower gid, as the reference
    return ShardedSelection(gids=[c[1] for c in best], scores=[c[0] for c in best], owners=[c[2] for c in best],
                            rows=[c[3] for c in best])


def fetch_selected(selection: ShardedSelection, store: MemoryStore, memory_id: str, layer: int, content: str,
                   like: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected documents' K and V rows [M, Hkv, d], best first, gathered from their owners.

    Each rank reads its own documents from its `store` shard (its slot pools, either tier).
    `like` ([*, Hkv, d]) gives the dtype and trailing shape of rows. Every rank serves the others'
    requests, so every rank calls this in the same step.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)

    def rows_of(gids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = store.content(store.documents(memory_id, gids), layer, content, like.device)
        return keys.to(like.dtype), values.to(like.dtype)

    wanted_here = torch.tensor([gid if owner != me else -1 for gid, owner in zip(selection.gids, selection.owners)],
                               dtype=torch.long)
    requests = _all_gather_padded(wanted_here, group)  # what every requester needs, -1 for its own documents
    local = set(store.contents().get(memory_id, []))
    operations, sends, receives = [], [], {}
    for requester, gids in enumerate(requests):
        if requester == me:
            continue
        mine = [gid for gid in gids.tolist() if gid in local]
        if mine:
            payload = torch.stack(rows_of(mine)).contiguous()
            sends.append(payload)
            operations.append(dist.P2POp(dist.isend, payload, requester, group))
    for owner in range(world):
        rows = sum(r for o, r in zip(selection.owners, selection.rows) if o == owner)
        if owner != me and rows:
            receives[owner] = like.new_empty((2, rows, *like.shape[1:]))
            operations.append(dist.P2POp(dist.irecv, receives[owner], owner, group))
    if operations:
        for request in dist.batch_isend_irecv(operations):
            request.wait()
    offsets = dict.fromkeys(receives, 0)
    parts_k, parts_v = [], []
    for gid, owner, rows in zip(selection.gids, selection.owners, selection.rows):
        if owner == me:
            k, v = rows_of([gid])
        else:  # owners send in the requester's order
            start = offsets[owner]
            k, v = receives[owner][0, start : start + rows], receives[owner][1, start : start + rows]
            offsets[owner] = start + rows
        parts_k.append(k)
        parts_v.append(v)
    if not parts_k:
        empty = like.new_zeros((0, *like.shape[1:]))
        return empty, empty
    return torch.cat(parts_k), torch.cat(parts_v)
