"""Memory Parallel over gloo, the code path `--tp N` serves with: two CPU processes, each with
its KV heads of every document's content and the router keys of the documents it routes (the
rank with the fewest router-key chunks so far). Per rank, the selection equals routing the whole
memory in one process (the single-device path): same documents, same scores, and the content
rows are that rank's heads of the single-device rows. A document one rank cannot hold is refused
on both; a rank whose shard is empty still takes part."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from sglang_msa.attention_backend import memory_ops
from sglang_msa.config import MSAOptions
from sglang_msa.memory_manager.sharding import MemoryShard
from sglang_msa.memory_manager.store import MemoryOperationError, MemoryStore, StoredDocument
from sglang_msa.server_process import free_port

H, HKV, D, CHUNK, LAYERS = 4, 2, 8, 4, (0, 3)
LENGTHS = [9, 4, 13, 7, 5, 1, 16, 3, 11, 6, 8, 2]  # 12 documents, partial chunks
BIG = 1 << 30


def token_tensors(seed: int, n_docs: int) -> list[dict[int, tuple[torch.Tensor, ...]]]:
    """Per document and routed layer: token K, V and router keys [n, HKV, D] (all heads)."""
    gen = torch.Generator().manual_seed(seed)
    return [{layer: tuple(torch.randn(n, HKV, D, generator=gen) for _ in range(3)) for layer in LAYERS}
            for n in LENGTHS[:n_docs]]


def heads_of(rank: int, world: int, rows: torch.Tensor) -> torch.Tensor:
    per_rank = rows.shape[1] // world
    return rows[:, rank * per_rank : (rank + 1) * per_rank]


def commit_all(store: MemoryStore, docs, case: dict, rank: int, world: int, shard) -> list[str]:
    """Pool and commit every document from this rank's heads; the refusals' messages. Training-free
    cases route on the pooled keys, the others on (pooled) router keys."""
    options = MSAOptions(**case["options"])
    refusals = []
    for gid, layers in enumerate(docs):
        pooled = {layer: memory_ops.pool_document(
            heads_of(rank, world, k), heads_of(rank, world, v), CHUNK, keep_full=options.memory_content == "full",
            router_keys=None if case.get("training_free") else heads_of(rank, world, r),
            router_key_format=options.router_key_format, shard=shard,
        ) for layer, (k, v, r) in layers.items()}
        n = next(iter(layers.values()))[0].shape[0]
        doc = StoredDocument(gid=gid * 10, num_tokens=n, num_chunks=-(-n // CHUNK), layers=pooled)
        try:
            store.commit_document("m", doc)
        except MemoryOperationError as exc:
            refusals.append(str(exc))
    return refusals


def queries(seed: int) -> torch.Tensor:
    return torch.randn(5, H, D, generator=torch.Generator().manual_seed(seed))


def route_all(store, options, rank, world, shard) -> dict:
    like = torch.empty(0, HKV // world, D)
    route = memory_ops.route if shard is None else lambda *a: memory_ops.route_sharded(*a, shard=shard)
    out = {}
    for layer in LAYERS:
        selection = route(store, "m", layer, heads_of(rank, world, queries(100 + layer)), options, like, "torch")
        out[layer] = (selection.gids, selection.scores, *selection.gathered())
    return out


class RecordingBacking:
    """A memory directory in a dict: gid -> router rank of the files this rank holds; writing
    `fail_gid` fails (a full disk)."""

    def __init__(self, fail_gid: int | None = None):
        self.fail_gid, self.files = fail_gid, {}

    def create_memory(self, memory_key, memory_id, owner, placement):
        pass

    def drop_memory(self, memory_id):
        self.files.clear()

    def write_document(self, memory_id, doc):
        if doc.gid == self.fail_gid:
            raise OSError("No space left on device")
        self.files[doc.gid] = doc.router_rank

    def remove_document(self, memory_id, gid):
        self.files.pop(gid, None)


def worker(rank: int, world: int, port: int, cases: list[dict], results: dict):
    """Every case in turn on one process group (a fresh store per case): one world for the module."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        for index, case in enumerate(cases):
            shard = MemoryShard(rank=rank, size=world, device_group=group, cpu_group=group)
            options = MSAOptions(**case["options"])
            backing = RecordingBacking(fail_gid=case.get("fail_write", {}).get(rank))
            store = MemoryStore(case["budgets"][rank], CHUNK, backing,
                                router_key_format=options.router_key_format, shard=shard)
            store.create("m")
            refusals = commit_all(store, token_tensors(7, case["docs"]), case, rank, world, shard)
            stats = store.stats("m")
            routed = route_all(store, options, rank, world, shard)
            results[index, rank] = (routed, refusals, stats, backing.files)
    finally:
        dist.destroy_process_group()


def single_device(case: dict) -> dict:
    options = MSAOptions(**case["options"])
    store = MemoryStore(BIG, CHUNK, router_key_format=options.router_key_format)
    store.create("m")
    commit_all(store, token_tensors(7, case["docs"]), case, 0, 1, None)
    return route_all(store, options, 0, 1, None)


def run_worlds(cases: list[dict]) -> list[dict]:
    """Each case's results per rank; the two ranks are spawned once for all the cases (every
    spawned process imports torch and the plugin: most of this module's time)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, free_port(), cases, results), nprocs=2, join=True)
        return [{rank: results[index, rank] for rank in (0, 1)} for index in range(len(cases))]


def check_parity(case: dict, results: dict) -> None:
    expected = single_device(case)
    for rank in (0, 1):
        routed = results[rank][0]
        for layer in LAYERS:
            gids, scores, memory_k, memory_v = routed[layer]
            want_gids, want_scores, want_k, want_v = expected[layer]
            assert gids == want_gids, (case, rank, layer)
            torch.testing.assert_close(torch.tensor(scores), torch.tensor(want_scores), rtol=0, atol=1e-5)
            torch.testing.assert_close(memory_k, heads_of(rank, 2, want_k), rtol=0, atol=0)
            torch.testing.assert_close(memory_v, heads_of(rank, 2, want_v), rtol=0, atol=0)


def pooled(**options) -> dict:
    return {"top_k_docs": 3, "chunk_size": CHUNK, "memory_content": "pooled", **options}


CASES = [
    {"options": pooled(), "docs": 12},  # MSA router keys
    {"options": pooled(top_k_docs=4, memory_content="full"), "docs": 12},
    {"options": pooled(top_k_docs=20), "docs": 12},  # k > documents: all of them
    {"options": pooled(router_key_format="fp8"), "docs": 12},
    {"options": pooled(), "docs": 12, "training_free": True},  # routed on the pooled keys
    {"options": pooled(), "docs": 1},  # one document: rank 1 routes none
]
PARITY_CASES = [{**case, "budgets": [BIG, BIG]} for case in CASES]
# rank 1's budget holds 10 chunks (256 B each: 2 layers of a 2-head router key and 1-head K̄, V̄):
# the first 4 documents; every later one is refused by both ranks
HOLD_CASE = {"options": pooled(), "docs": 12, "budgets": [BIG, 2560]}
WRITE_CASE = {"options": pooled(), "docs": 12, "budgets": [BIG, BIG], "fail_write": {1: 30}}


@pytest.fixture(scope="module")
def worlds() -> list[dict]:
    """The results of PARITY_CASES, then HOLD_CASE, then WRITE_CASE."""
    return run_worlds([*PARITY_CASES, HOLD_CASE, WRITE_CASE])


def test_two_ranks_equal_one_device(worlds):
    for case, results in zip(PARITY_CASES, worlds):
        per_rank = [results[rank][2]["routed_documents"] for rank in (0, 1)]
        assert sum(per_rank) == case["docs"]  # every document routed by exactly one rank
        if case["docs"] > 1:
            assert min(per_rank) >= case["docs"] // 3, per_rank  # fewest chunks first: balanced
            chosen = {gid for layer in LAYERS for gid in results[0][0][layer][0]}
            assert len(chosen) > 1
        check_parity(case, results)


def test_a_document_one_rank_cannot_hold_is_refused_on_both(worlds):
    case, results = HOLD_CASE, worlds[len(PARITY_CASES)]
    refusals = [results[rank][1] for rank in (0, 1)]
    assert len(refusals[0]) == len(refusals[1]) == 8
    assert "another tensor-parallel rank" in refusals[0][0] and "memory budget exhausted" in refusals[1][0]
    assert results[0][2]["documents"] == results[1][2]["documents"] == case["docs"] - len(refusals[0])
    assert sum(results[rank][2]["routed_documents"] for rank in (0, 1)) == results[0][2]["documents"]


def test_a_document_one_rank_cannot_write_is_refused_on_both(worlds):
    results = worlds[len(PARITY_CASES) + 1]
    for rank in (0, 1):
        _, refusals, stats, files = results[rank]
        assert len(refusals) == 1 and "could not be written" in refusals[0]
        assert stats["documents"] == 11 and 30 not in files  # rank 0 removed the file it had written
        assert sorted(files) == [gid * 10 for gid in range(12) if gid != 3]
    assert results[0][3] == results[1][3]  # the same router rank recorded for every document on both
    assert "No space left on device" in results[1][1][0]
