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
    archive.create_memory("notes", "tenant-1")
    docs = [random_document(gid, n, dtype, full, router, gen) for gid, n in ((0, 9), (3, 4), (7, 1))]
    for doc in docs:
        archive.write_document("notes", doc)
    loaded = DocumentArchive(tmp_path, FINGERPRINT).load()
    assert list(loaded) == ["notes"] and loaded["notes"][0] == "tenant-1"
    for doc, back in zip(docs, loaded["notes"][1]):
        assert_same_document(doc, back)


def test_store_writes_before_publishing_and_restores_the_same_views(tmp_path):
    gen = torch.Generator().manual_seed(1)
    store = MemoryStore(1 << 30, 4, DocumentArchive(tmp_path, FINGERPRINT))
    store.create("a", "tenant-1")
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


def test_a_failed_write_publishes_nothing(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    store = MemoryStore(1 << 30, 4, DocumentArchive(tmp_path, FINGERPRINT))
    store.create("a")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persistence, "save_file", disk_full)
    with pytest.raises(OSError):
        store.commit_document("a", random_document(0, 9, torch.float32, False, True, gen))
    assert store.contents() == {"a": []} and store.used_bytes() == 0
    assert [p.name for p in (tmp_path / "tensors" / "a").iterdir()] == ["memory.json"]  # no document, no temp file


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
    archive.create_memory("a", None)
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
    assert metadata.create_memory("a")
    gids = metadata.reserve_gids("a", 3)
    for gid in gids:
        assert metadata.add_document(DocumentRecord("a", gid, f"d{gid}", f"text {gid}", 5))
    metadata.delete_document("a", "d1")
    reopened = MetadataStore(path)
    assert reopened.contents() == {"a": {0, 2}}
    assert reopened.next_gid("a") == 3  # ids are never reused, even after a restart
    assert reopened.get_document("a", "d2").text == "text 2"
    reopened.forget_documents("a", [0, 2])
    assert MetadataStore(path).contents() == {"a": set()}


def test_placements_persist_and_a_directory_larger_than_the_budget_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(4)
    store = MemoryStore(1 << 24, 4, DocumentArchive(tmp_path, FINGERPRINT), host_budget_bytes=1 << 22)
    store.create("near", placement="device")
    store.create("far", "tenant-2", placement="host")
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
