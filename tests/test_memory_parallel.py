"""Memory Parallel over gloo: two CPU processes each hold half of a memory (sharded by document,
fewest chunks first), route their own requests with the exact global top-k, and fetch the
selected content from its owner. Per rank, the result equals routing the whole memory in one
process (the single-device path): same documents, same scores, same K/V rows."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from sglang_msa.config import MSAOptions
from sglang_msa.memory_manager.parallel import assign_shards, fetch_selected, route_sharded
from sglang_msa.memory_manager.store import LayerTensors, MemoryStore, StoredDocument
from sglang_msa.server_process import free_port

H, HKV, D, CHUNK, LAYER = 4, 2, 8, 4, 0
LENGTHS = [9, 4, 13, 7, 5, 1, 16, 3, 11, 6, 8, 2]  # 12 documents, partial chunks


def memory_documents(seed: int, full: bool) -> list[StoredDocument]:
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for gid, n in enumerate(LENGTHS):
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        pooled_k = torch.stack([k[i:i + CHUNK].mean(0) for i in range(0, n, CHUNK)])
        pooled_v = torch.stack([v[i:i + CHUNK].mean(0) for i in range(0, n, CHUNK)])
        router_k = torch.randn(pooled_k.shape, generator=gen)
        layers = {LAYER: LayerTensors(pooled_k, pooled_v, router_k, k if full else None, v if full else None)}
        docs.append(StoredDocument(gid=gid * 10, num_tokens=n, num_chunks=pooled_k.shape[0], layers=layers))
    return docs


def store_of(docs: list[StoredDocument]) -> MemoryStore:
    store = MemoryStore(1 << 30, CHUNK)
    store.create("m")
    for doc in docs:
        store.commit_document("m", doc)
    return store


def rows_of(doc: StoredDocument, content: str) -> int:
    return doc.num_tokens if content == "full" else doc.num_chunks


def rank_queries(rank: int, size: int) -> torch.Tensor:
    return torch.randn(3 + rank, H, D, generator=torch.Generator().manual_seed(100 + rank))


def worker(rank: int, world: int, port: int, content: str, top_k: int, results: dict):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        docs = memory_documents(7, content == "full")
        owners = assign_shards([doc.num_chunks for doc in docs], world)
        mine = [doc for doc, owner in zip(docs, owners) if owner == rank]
        store = store_of(mine)
        options = MSAOptions(top_k_docs=top_k, chunk_size=CHUNK, memory_content=content)
        selection = route_sharded(rank_queries(rank, world), store.routing_view("m", LAYER),
                                  {doc.gid: rows_of(doc, content) for doc in mine}, options)
        memory_k, memory_v = fetch_selected(selection, store, "m", LAYER, content, torch.empty(0, HKV, D))
        results[rank] = (selection.gids, selection.scores, memory_k, memory_v, owners)
    finally:
        dist.destroy_process_group()


def single_device(rank: int, content: str, top_k: int):
    """The single-device path: the whole memory in one store, routed by the serving code."""
    from sglang_msa.attention_backend import memory_ops

    store = store_of(memory_documents(7, content == "full"))
    options = MSAOptions(top_k_docs=top_k, chunk_size=CHUNK, memory_content=content, similarity="dot")
    return memory_ops.route(store, "m", LAYER, rank_queries(rank, 2), options, torch.empty(0, HKV, D))


def run_world(content: str, top_k: int) -> dict:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(2, free_port(), content, top_k, results), nprocs=2, join=True)
    return dict(results)


def test_assign_shards_balances_chunks_in_order():
    assert assign_shards([5, 1, 1, 1, 3, 1], 2) == [0, 1, 1, 1, 1, 0]
    assert assign_shards([], 2) == [] and assign_shards([2, 2], 1) == [0, 0]


def test_two_ranks_equal_one_device():
    for content, top_k in (("pooled", 3), ("full", 4), ("pooled", 20)):  # 20 > documents: all of them
        results = run_world(content, top_k)
        owners = results[0][4]
        assert set(owners) == {0, 1}  # both ranks hold part of the memory
        for rank in (0, 1):
            gids, scores, memory_k, memory_v, _ = results[rank]
            expected = single_device(rank, content, top_k)
            assert gids == expected.gids, (content, rank)
            torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected.scores), rtol=0, atol=1e-5)
            assert {owners[g // 10] for g in gids} == {0, 1}  # the selection spans both shards
            torch.testing.assert_close(memory_k, expected.memory_k, rtol=0, atol=0)
            torch.testing.assert_close(memory_v, expected.memory_v, rtol=0, atol=0)
