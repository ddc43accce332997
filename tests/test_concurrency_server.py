"""Concurrent writers, deleters and readers on the same and different memories, through HTTP.

8 writer threads add documents in small batches (and delete some of their own), 32 reader
threads query at the same time. Afterwards every acknowledged document is present exactly once,
no deleted one remains, no query ever saw a document of another memory or one whose deletion
had been acknowledged before the query started, and deleting the memories returns the
scheduler's memory use to its baseline."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import requests

from sglang_msa.server_process import start_server

pytestmark = pytest.mark.server

MEMORIES = [f"shared-{i}" for i in range(4)]
WRITERS, BATCHES, BATCH_SIZE = 8, 4, 3
READERS, QUERIES = 32, 3


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("concurrency") / "server.log"
    options = {"top_k_docs": 3, "chunk_size": 4, "routed_layers": "all"}
    args = ["--max-total-tokens", "16384", "--log-level", "error", "--msa-config", json.dumps(options)]
    with start_server(tiny_llama, "msa", extra_args=args, log_path=log) as running:
        yield running.base_url


def store_stats(url: str) -> dict:
    response = requests.get(f"{url}/v1/memories/-/stats", timeout=30)
    response.raise_for_status()
    return response.json()


def test_concurrent_writes_deletes_and_queries_keep_every_promise(server):
    baseline = store_stats(server)
    for memory_id in MEMORIES:
        requests.post(f"{server}/v1/memories", json={"memory_id": memory_id}, timeout=30).raise_for_status()
    lock = threading.Lock()
    acknowledged: dict[str, set[str]] = {m: set() for m in MEMORIES}
    deleted: dict[str, dict[str, float]] = {m: {} for m in MEMORIES}  # doc id -> when its deletion was acked
    violations: list[str] = []
    queries_done = [0]
    writers_done = threading.Event()

    def writer(index: int):
        rng = random.Random(index)
        for batch in range(BATCHES):
            memory_id = MEMORIES[(index + batch) % len(MEMORIES)]
            docs = [{"doc_id": f"{memory_id}-w{index}-b{batch}-{i}",
                     "text": f"Writer {index} wrote fact {batch}.{i}: value {rng.randint(0, 99999)}."}
                    for i in range(BATCH_SIZE)]
            response = requests.post(f"{server}/v1/memories/{memory_id}/documents", json={"documents": docs},
                                     timeout=300)
            if response.status_code != 201:
                violations.append(f"add refused: {response.status_code} {response.text[:200]}")
                continue
            with lock:
                acknowledged[memory_id].update(d["doc_id"] for d in docs)
            if rng.random() < 0.5:  # delete one of the documents just written
                doc_id = rng.choice(docs)["doc_id"]
                gone = requests.delete(f"{server}/v1/memories/{memory_id}/documents/{doc_id}", timeout=60)
                if gone.status_code != 200:
                    violations.append(f"delete failed: {gone.status_code} {gone.text[:200]}")
                    continue
                with lock:
                    deleted[memory_id][doc_id] = time.monotonic()

    def reader(index: int):
        rng = random.Random(1000 + index)
        for _ in range(QUERIES):
            memory_id = rng.choice(MEMORIES)
            started = time.monotonic()
            with lock:
                gone_before = {d for d, at in deleted[memory_id].items() if at < started}
            reply = requests.post(f"{server}/v1/memories/{memory_id}/chat/completions", json={
                "messages": [{"role": "user", "content": f"Which value did writer {index % WRITERS} write?"}],
                "max_tokens": 2, "temperature": 0}, timeout=300)
            if reply.status_code != 200:
                violations.append(f"query failed: {reply.status_code} {reply.text[:200]}")
                continue
            seen = {d["doc_id"] for d in reply.json()["msa"]["retrieved"]}
            foreign = {d for d in seen if not d.startswith(f"{memory_id}-")}
            if foreign:
                violations.append(f"{memory_id} query saw other memories' documents {foreign}")
            if seen & gone_before:
                violations.append(f"{memory_id} query saw deleted documents {seen & gone_before}")
            with lock:
                queries_done[0] += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    writers_done.set()
    assert not any(thread.is_alive() for thread in threads)
    assert violations == []
    assert queries_done[0] == READERS * QUERIES

    for memory_id in MEMORIES:
        listed = requests.get(f"{server}/v1/memories/{memory_id}/documents", params={"limit": 10_000},
                              timeout=30).json()["documents"]
        doc_ids = [d["doc_id"] for d in listed]
        assert len(doc_ids) == len(set(doc_ids))  # each exactly once
        assert set(doc_ids) == acknowledged[memory_id] - set(deleted[memory_id])
        info = requests.get(f"{server}/v1/memories/{memory_id}", timeout=30).json()
        assert info["documents"] == len(doc_ids)  # the scheduler holds exactly these
    assert store_stats(server)["documents"] == baseline["documents"] + sum(
        len(acknowledged[m] - set(deleted[m])) for m in MEMORIES)

    for memory_id in MEMORIES:
        requests.delete(f"{server}/v1/memories/{memory_id}", timeout=60).raise_for_status()
    after = store_stats(server)
    assert (after["memories"], after["documents"], after["bytes"]) == \
        (baseline["memories"], baseline["documents"], baseline["bytes"])


def test_answers_come_only_from_the_named_memory(server):
    """Two tenants hold conflicting facts; a third memory is a twin of the first. Queries on all
    three run concurrently (mixed batches): the first and its twin answer identically, token for
    token, in every round, and the conflicting tenant's memory changes the answer's scores."""
    facts = {"tenant-a": "7", "tenant-a-twin": "7", "tenant-b": "3"}
    for memory_id, digit in facts.items():
        requests.post(f"{server}/v1/memories", json={"memory_id": memory_id}, timeout=30).raise_for_status()
        docs = [{"doc_id": f"fact-{i}", "text": f"The code of vault {i} is {digit * 4}{i}."} for i in range(6)]
        requests.post(f"{server}/v1/memories/{memory_id}/documents", json={"documents": docs},
                      timeout=300).raise_for_status()
    outputs: dict[str, list[dict]] = {memory_id: [] for memory_id in facts}
    lock = threading.Lock()

    def ask(memory_id: str):
        reply = requests.post(f"{server}/v1/memories/{memory_id}/generate", json={
            "text": "The code of vault 2 is", "return_logprob": True, "top_logprobs_num": 3,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}, timeout=300)
        assert reply.status_code == 200, reply.text
        with lock:
            outputs[memory_id].append(reply.json())

    threads = [threading.Thread(target=ask, args=(memory_id,)) for _ in range(4) for memory_id in facts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    ids = {memory_id: [out["output_ids"] for out in outs] for memory_id, outs in outputs.items()}
    assert all(len(v) == 4 for v in ids.values())
    assert ids["tenant-a"] == ids["tenant-a-twin"] and len({tuple(x) for x in ids["tenant-a"]}) == 1
    first_a = outputs["tenant-a"][0]["meta_info"]["output_top_logprobs"][0]
    first_b = outputs["tenant-b"][0]["meta_info"]["output_top_logprobs"][0]
    assert first_a != first_b  # the memory named is the one that was read
