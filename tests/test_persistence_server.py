"""Persistence through the real server (`--msa-memory-dir`): a restarted server answers exactly
as before, and a server killed hard during a long ingestion comes back with every acknowledged
document, no partial one, and the same routing once the unacknowledged extras are deleted."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import requests

from safetensors.torch import save_file

from sglang_msa.memory_manager.persistence import document_tensors, read_document
from sglang_msa.server.memory_api import METADATA_FILE
from sglang_msa.server.metadata import DocumentRecord, MetadataStore
from sglang_msa.server_process import default_device, start_server

pytestmark = pytest.mark.server

MSA_CONFIG = {"top_k_docs": 2, "chunk_size": 4, "routed_layers": "all"}
QUESTION = "Which shelf holds the book about topic 3?"


def launch(model, memory_dir, log, tp: int = 1):
    args = ["--max-total-tokens", "16384", "--log-level", "warning", "--msa-config", json.dumps(MSA_CONFIG),
            "--msa-memory-dir", str(memory_dir), "--dtype", "float32", "--tp", str(tp)]
    return start_server(model, "msa", extra_args=args, log_path=log, device=default_device(ranks=tp))


def documents(first: int, count: int) -> list[dict]:
    return [{"text": f"Shelf {i} holds the book number {i * 7919 % 1000} about topic {i % 13}.",
             "doc_id": f"book-{i}"} for i in range(first, first + count)]


def ask(url: str) -> tuple[dict, str]:
    reply = requests.post(f"{url}/v1/memories/library/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 6,
        "msa": {"routing_details": True}}, timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return {layer: sel["doc_gids"] for layer, sel in body["msa"]["layers"].items()}, \
        body["choices"][0]["message"]["content"]


def listed(url: str) -> list[str]:
    response = requests.get(f"{url}/v1/memories/library/documents", params={"limit": 10_000}, timeout=30)
    response.raise_for_status()
    return [doc["doc_id"] for doc in response.json()["documents"]]


def memory_tensors(tensors_root: Path, memory_id: str) -> Path:
    """The directory of the memory named `memory_id` (directories are named by incarnation key)."""
    found = [p.parent for p in tensors_root.glob("*/memory.json") if json.loads(p.read_text())["memory_id"] == memory_id]
    assert len(found) == 1, found
    return found[0]


def leave_crash_leftovers(memory_dir: Path) -> None:
    """What a crash at the worst moments leaves: the tensors of a document whose record was
    never written (killed between the two), and a record whose tensors were already removed (a
    deletion under way)."""
    tensors = memory_tensors(memory_dir / "tensors", "library")
    doc = read_document(next(tensors.glob("*.safetensors")))
    flat, metadata = document_tensors(dataclasses.replace(doc, gid=9999))
    save_file(flat, str(tensors / "9999.safetensors"), metadata=metadata)
    metadata_store = MetadataStore(memory_dir / METADATA_FILE)
    assert metadata_store.add_document(DocumentRecord(tensors.name, 8888, "orphan-record", "lost", 3))


def test_restart_and_hard_kill_keep_exactly_the_acknowledged_documents(tiny_llama, tmp_path):
    memory_dir, logs = tmp_path / "memories", tmp_path / "logs"
    logs.mkdir()
    base = documents(0, 24)
    with launch(tiny_llama, memory_dir, logs / "first.log") as server:
        url = server.base_url
        requests.post(f"{url}/v1/memories", json={"memory_id": "library"}, timeout=30).raise_for_status()
        requests.post(f"{url}/v1/memories", json={"memory_id": "gone"}, timeout=30).raise_for_status()
        assert requests.post(f"{url}/v1/memories/library/documents", json={"documents": base},
                             timeout=300).status_code == 201
        requests.delete(f"{url}/v1/memories/library/documents/book-5", timeout=30).raise_for_status()
        requests.delete(f"{url}/v1/memories/gone", timeout=30).raise_for_status()
        routing, answer = ask(url)
        info = requests.get(f"{url}/v1/memories/library", timeout=30).json()
    expected = [d["doc_id"] for d in base if d["doc_id"] != "book-5"]

    # a clean restart: the same memories, documents, bytes, routing and greedy answer
    with launch(tiny_llama, memory_dir, logs / "second.log") as server:
        url = server.base_url
        assert [m["memory_id"] for m in requests.get(f"{url}/v1/memories", timeout=30).json()["memories"]] == ["library"]
        assert listed(url) == expected
        assert requests.get(f"{url}/v1/memories/library", timeout=30).json() == info
        assert ask(url) == (routing, answer)

        # a long ingestion in batches, killed hard while a batch is in flight
        acknowledged: list[str] = []
        two_acks = threading.Event()

        def ingest():
            for first in range(100, 400, 6):
                batch = documents(first, 6)
                try:
                    response = requests.post(f"{url}/v1/memories/library/documents", json={"documents": batch},
                                             timeout=300)
                except requests.RequestException:
                    return
                if response.status_code == 201:
                    acknowledged.extend(d["doc_id"] for d in batch)
                if len(acknowledged) >= 12:
                    two_acks.set()

        writer = threading.Thread(target=ingest)
        writer.start()
        assert two_acks.wait(timeout=300)
        server.kill()
        writer.join(timeout=60)
        assert not writer.is_alive()
    leave_crash_leftovers(memory_dir)

    with launch(tiny_llama, memory_dir, logs / "third.log") as server:
        url = server.base_url
        present = listed(url)
        assert set(expected) | set(acknowledged) <= set(present)  # nothing acknowledged is lost
        assert "book-5" not in present  # nothing deleted comes back
        assert "orphan-record" not in present
        info = requests.get(f"{url}/v1/memories/library", timeout=30).json()
        assert info["documents"] == len(present)  # no half documents: tensors and records agree
        assert not (memory_tensors(memory_dir / "tensors", "library") / "9999.safetensors").exists()
        for doc_id in present:
            if doc_id not in expected:
                requests.delete(f"{url}/v1/memories/library/documents/{doc_id}", timeout=30).raise_for_status()
        assert ask(url) == (routing, answer)


def test_tensor_parallel_ranks_restore_their_shards(tiny_llama, tmp_path, monkeypatch):
    """--tp 2 with a memory directory: each rank writes what it holds (its heads of every
    document's content, the router keys of the documents it routes). Killed hard and restarted
    with --tp 2, the server has the same documents, the same split of router keys and the same
    answers; a document file only one rank has (an interrupted write) is removed; the directory
    refuses another --tp with a message."""
    if default_device(ranks=2) == "cpu":  # one CPU core per rank for SGLang's CPU engine
        monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")
    memory_dir, logs = tmp_path / "memories", tmp_path / "logs"
    logs.mkdir()
    base = documents(0, 16)
    with launch(tiny_llama, memory_dir, logs / "first.log", tp=2) as server:
        url = server.base_url
        requests.post(f"{url}/v1/memories", json={"memory_id": "library"}, timeout=30).raise_for_status()
        assert requests.post(f"{url}/v1/memories/library/documents", json={"documents": base},
                             timeout=300).status_code == 201
        requests.delete(f"{url}/v1/memories/library/documents/book-5", timeout=30).raise_for_status()
        routing, answer = ask(url)
        info = requests.get(f"{url}/v1/memories/library", timeout=30).json()
        server.kill()
    assert min(info["routed_documents_per_rank"]) > 0
    expected = [d["doc_id"] for d in base if d["doc_id"] != "book-5"]
    rank_dirs = [memory_tensors(memory_dir / "ranks" / str(rank) / "tensors", "library") for rank in (0, 1)]
    assert all(len(list(d.glob("*.safetensors"))) == len(expected) for d in rank_dirs)
    interrupted = rank_dirs[1] / "9999.safetensors"  # written by rank 1 only
    doc = read_document(next(rank_dirs[1].glob("*.safetensors")))
    flat, metadata = document_tensors(dataclasses.replace(doc, gid=9999))
    save_file(flat, str(interrupted), metadata=metadata)

    with launch(tiny_llama, memory_dir, logs / "second.log", tp=2) as server:
        url = server.base_url
        assert listed(url) == expected
        assert requests.get(f"{url}/v1/memories/library", timeout=30).json() == info
        assert ask(url) == (routing, answer)
    assert not interrupted.exists()

    with pytest.raises(RuntimeError, match="tensor_parallel_size"):
        launch(tiny_llama, memory_dir, logs / "third.log", tp=1)
