"""Memory persistence without a server: document files round-trip bit for bit, writes are
atomic (a failed or interrupted write leaves nothing), the store writes before it publishes,
and a reopened directory restores the same routing views; SQLite metadata survives reopening."""

from __future__ import annotations

import pytest
import torch

from sglang_msa.memory_manager import persistence
from sglang_msa.memory_manager.persistence import ArchiveMismatchError, DocumentArchive
from sglang_msa.kernels.routing_scan import quantize_fp8
from sglang_msa.memory_manager.store import LAYER_TENSOR_NAMES, LayerTensors, MemoryOperationError, MemoryStore, StoredDocument
from sglang_msa.server.metadata import DocumentRecord, MetadataStore

FINGERPRINT = {"model": "tiny", "routed_layers": [1, 2], "chunk_size": 4, "memory_content": "full"}


def random_document(gid: int, num_tokens: int, dtype, full: bool, router, gen) -> StoredDocument:
    """router: True (own router keys), False (router keys are the pooled keys) or "fp8" (float8
    router keys with scales)."""
    chunks = -(-num_tokens // 4)
    layers = {}
    for layer in (1, 2):
        pooled_k = torch.randn(chunks, 2, 8, generator=gen).to(dtype)
        router_k, scales = (torch.randn(chunks, 2, 8, generator=gen).to(dtype) if router else pooled_k), None
        if router == "fp8":
            router_k, scales = quantize_fp8(router_k)
        layers[layer] = LayerTensors(
            pooled_k=pooled_k, pooled_v=torch.randn(chunks, 2, 8, generator=gen).to(dtype), router_k=router_k,
            full_k=torch.randn(num_tokens, 2, 8, generator=gen).to(dtype) if full else None,
            full_v=torch.randn(num_tokens, 2, 8, generator=gen).to(dtype) if full else None,
            router_k_scale=scales,
        )
    return StoredDocument(gid=gid, num_tokens=num_tokens, num_chunks=chunks, layers=layers)


def assert_same_document(a: StoredDocument, b: StoredDocument) -> None:
    assert (a.gid, a.num_tokens, a.num_chunks, sorted(a.layers)) == (b.gid, b.num_tokens, b.num_chunks, sorted(b.layers))
    for layer in a.layers:
        for name in LAYER_TENSOR_NAMES:
            x, y = getattr(a.layers[layer], name), getattr(b.layers[layer], name)
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x.contiguous().view(torch.uint8),
                                                          y.contiguous().view(torch.uint8)), (layer, name)
        shared = a.layers[layer].router_k is a.layers[layer].pooled_k
        assert (b.layers[layer].router_k is b.layers[layer].pooled_k) == shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("full, router", [(True, False), (False, True), (False, False), (False, "fp8")])
def test_documents_round_trip_bit_for_bit(tmp_path, dtype, full, router):
    gen = torch.Generator().manual_seed(0)
    archive = DocumentArchive(tmp_path, FINGERPRINT)
    archive.create_memory("notes", "team-notes", "tenant-1")
    docs = [random_document(gid, n, dtype, full, router, gen) for gid, n in ((0, 9), (3, 4), (7, 1))]
    for doc in docs:
        archive.write_document("notes", doc)
    loaded = DocumentArchive(tmp_path, FINGERPRINT).load()
    assert list(loaded) == ["notes"] and loaded["notes"].owner == "tenant-1"
    assert loaded["notes"].memory_id == "team-notes"
    for doc, back in zip(docs, loaded["notes"][1]):
        assert_same_document(doc, back)


def test_store_writes_before_publishing_and_restores_the_same_views(tmp_path):
    gen = torch.Generator().manual_seed(1)
    store = MemoryStore(1 << 30, 4, DocumentArchive(tmp_path, FINGERPRINT))
    store.create("a", "a-name", "tenant-1")
    store.create("b")
    for gid, n in enumerate((9, 4, 13, 7)):
        store.commit_document("a", random_document(gid, n, torch.bfloat16, True, False, gen))
    store.commit_document("b", random_document(0, 5, torch.bfloat16, True, False, gen))
    store.remove_document("a", 1)
    store.create("gone")
    store.drop("gone")

    restored = MemoryStore(1 << 30, 4, DocumentArchive(tmp_path, FINGERPRINT))
    restored.restore(restored.backing.load())
    assert restored.contents() == store.contents() == {"a": [0, 2, 3], "b": [0]}
    assert (restored.owner("a"), restored.owner("b")) == ("tenant-1", None)
    for memory_id in ("a", "b"):
        assert restored.stats(memory_id) == store.stats(memory_id)
        for layer in (1, 2):
            view, back = store.routing_view(memory_id, layer), restored.routing_view(memory_id, layer)
            assert view.gids == back.gids and torch.equal(view.router_keys, back.router_keys)
            assert torch.equal(view.layout.doc_chunk_start, back.layout.doc_chunk_start)
    assert restored.used_bytes() == store.used_bytes()


def store_on_a_full_disk(tmp_path, monkeypatch) -> MemoryStore:
    """A store with memory "a", whose document files can no longer be written."""
    store = MemoryStore(1 << 30, 4, DocumentArchive(tmp_path, FINGERPRINT))
    store.create("a")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persistence, "save_file", disk_full)
    return store


def test_a_failed_write_publishes_nothing(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    store = store_on_a_full_disk(tmp_path, monkeypatch)
    with pytest.raises(OSError):
        store.commit_document("a", random_document(0, 9, torch.float32, False, True, gen))
    assert store.contents() == {"a": []} and store.used_bytes() == 0
    assert [p.name for p in (tmp_path / "tensors" / "a").iterdir()] == ["memory.json"]  # no document, no temp file


def test_a_full_disk_refuses_the_ingestion_instead_of_failing_the_forward_pass(tmp_path, monkeypatch):
    from sglang_msa.attention_backend import memory_ops
    from sglang_msa.memory_manager.requests import IngestParams, IngestState

    gen = torch.Generator().manual_seed(2)
    store = store_on_a_full_disk(tmp_path, monkeypatch)
    doc = random_document(0, 9, torch.float32, False, True, gen)
    state = IngestState(IngestParams(op="ingest", memory_key="a", gid=0, grant="-"), num_tokens=9,
                        pooled=dict(doc.layers))
    memory_ops.stage_ingestion(store, state)  # raised OSError into the scheduler's forward pass before
    assert not state.stored and state.error_status == 507 and "No space left" in state.error
    assert store.contents() == {"a": []} and store.used_bytes() == 0


def test_budget_and_deleted_memories_are_checked_before_writing(tmp_path):
    gen = torch.Generator().manual_seed(3)
    doc = random_document(0, 9, torch.float32, True, False, gen)
    store = MemoryStore(doc.nbytes() - 1, 4, DocumentArchive(tmp_path, FINGERPRINT))
    store.create("a")
    with pytest.raises(MemoryOperationError) as refused:
        store.commit_document("a", doc)
    assert refused.value.status == 507
    with pytest.raises(MemoryOperationError) as missing:
        store.commit_document("never-created", doc)
    assert missing.value.status == 404
    assert not list((tmp_path / "tensors").rglob("*.safetensors"))


def test_interrupted_writes_and_drops_leave_no_trace(tmp_path):
    gen = torch.Generator().manual_seed(4)
    archive = DocumentArchive(tmp_path, FINGERPRINT)
    archive.create_memory("a", "a", None)
    archive.write_document("a", random_document(0, 9, torch.float32, False, False, gen))
    # a crash between writing the temporary file and renaming it; a crash inside a drop
    (tmp_path / "tensors" / "a" / ".5.safetensors.123.tmp").write_bytes(b"partial")
    (tmp_path / "tensors" / ".dropped-123").mkdir()
    (tmp_path / "tensors" / ".dropped-123" / "0.safetensors").write_bytes(b"x")
    (tmp_path / "tensors" / ".creating-456").mkdir()  # a crash inside a create
    loaded = DocumentArchive(tmp_path, FINGERPRINT).load()
    assert [doc.gid for doc in loaded["a"][1]] == [0]
    assert sorted(p.name for p in (tmp_path / "tensors").rglob("*")) == ["0.safetensors", "a", "memory.json"]


def test_a_directory_of_another_model_is_refused(tmp_path):
    DocumentArchive(tmp_path, FINGERPRINT)
    with pytest.raises(ArchiveMismatchError, match="chunk_size"):
        DocumentArchive(tmp_path, {**FINGERPRINT, "chunk_size": 64})


def test_metadata_survives_reopening(tmp_path):
    path = tmp_path / "metadata.sqlite3"
    metadata = MetadataStore(path)
    key = metadata.create_memory("tenant-1", "a").memory_key
    gids = metadata.reserve_gids(key, 3)
    for gid in gids:
        assert metadata.add_document(DocumentRecord(key, gid, f"d{gid}", f"text {gid}", 5))
    metadata.delete_document(key, "d1")
    reopened = MetadataStore(path)
    assert reopened.contents() == {key: {0, 2}}
    assert reopened.find_memory("tenant-1", "a").memory_key == key
    assert reopened.next_gid(key) == 3  # ids are never reused, even after a restart
    assert reopened.get_document(key, "d2").text == "text 2"
    reopened.forget_documents(key, [0, 2])
    assert MetadataStore(path).contents() == {key: set()}


def test_names_are_per_tenant_and_each_creation_is_a_new_incarnation(tmp_path):
    metadata = MetadataStore(tmp_path / "metadata.sqlite3")
    alpha, bravo = metadata.create_memory("alpha", "notes"), metadata.create_memory("bravo", "notes")
    assert alpha.memory_key != bravo.memory_key and metadata.create_memory("alpha", "notes") is None
    gid = metadata.reserve_gids(alpha.memory_key, 1)[0]
    assert metadata.delete_memory(alpha.memory_key)
    again = metadata.create_memory("alpha", "notes")
    assert again.memory_key not in (alpha.memory_key, bravo.memory_key)
    # a write aimed at the deleted incarnation is refused and leaves nothing
    assert not metadata.add_document(DocumentRecord(alpha.memory_key, gid, "late", "late text", 3))
    assert metadata.list_documents(again.memory_key, 10, 0) == [] and metadata.contents()[again.memory_key] == set()
    assert [m["memory_id"] for m in metadata.list_memories("alpha")] == ["notes"]


def test_a_metadata_file_of_the_first_schema_is_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "metadata.sqlite3"
    legacy = sqlite3.connect(path)
    legacy.executescript("""
        CREATE TABLE memories (memory_id TEXT PRIMARY KEY, owner TEXT, created_at REAL NOT NULL,
                               next_gid INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE documents (memory_id TEXT NOT NULL REFERENCES memories(memory_id) ON DELETE CASCADE,
                                gid INTEGER NOT NULL, doc_id TEXT NOT NULL, text TEXT NOT NULL,
                                num_tokens INTEGER NOT NULL, created_at REAL NOT NULL,
                                PRIMARY KEY (memory_id, gid), UNIQUE (memory_id, doc_id));
        INSERT INTO memories VALUES ('notes', NULL, 0, 2), ('team', 'alpha', 0, 1);
        INSERT INTO documents VALUES ('notes', 0, 'a', 'text a', 2, 0), ('notes', 1, 'b', 'text b', 2, 0),
                                     ('team', 0, 'c', 'text c', 2, 0);
    """)
    legacy.commit()
    legacy.close()
    metadata = MetadataStore(path)
    # the old ids were the scheduler's (and the memory directory's) keys: they stay the keys
    assert metadata.find_memory("", "notes").memory_key == "notes"
    assert metadata.find_memory("alpha", "team").memory_key == "team"
    assert metadata.contents() == {"notes": {0, 1}, "team": {0}} and metadata.next_gid("notes") == 2
    assert metadata.get_document("notes", "b").text == "text b"


def test_placements_persist_and_a_directory_larger_than_the_budget_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(4)
    store = MemoryStore(1 << 24, 4, DocumentArchive(tmp_path, FINGERPRINT), host_budget_bytes=1 << 22)
    store.create("near", placement="device")
    store.create("far", owner="tenant-2", placement="host")
    for gid in range(6):
        store.commit_document("near", random_document(gid, 16, torch.float32, True, False, gen))
        store.commit_document("far", random_document(gid, 16, torch.float32, True, False, gen))
    loaded = DocumentArchive(tmp_path, FINGERPRINT).load()
    assert (loaded["near"].placement, loaded["far"].placement, loaded["far"].owner) == ("device", "host", "tenant-2")
    restored = MemoryStore(1 << 24, 4, DocumentArchive(tmp_path, FINGERPRINT), host_budget_bytes=1 << 22)
    restored.restore(loaded)
    assert restored.stats("far")["host_bytes"] == store.stats("far")["host_bytes"] > 0
    assert restored.stats("near") == store.stats("near")
    # a server restarted with budgets too small for what the directory holds stops with the numbers
    small = MemoryStore(1 << 24, 4, DocumentArchive(tmp_path, FINGERPRINT))  # no host tier
    with pytest.raises(MemoryOperationError, match="holds more than this server's budgets") as refused:
        small.restore(loaded)
    assert refused.value.status == 507
