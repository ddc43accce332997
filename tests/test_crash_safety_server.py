"""Crash safety: a server on a memory directory is killed with SIGKILL at random points while
clients add and delete documents, several runs in a row. After each restart the state equals
the acknowledged operations: every acknowledged addition is there unless its deletion was
acknowledged, no acknowledged deletion comes back, nothing appears that was never sent, and the
scheduler holds exactly the listed documents."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import requests

from sglang_msa.server_process import start_server

pytestmark = pytest.mark.server

RUNS = 3
MSA_CONFIG = {"top_k_docs": 2, "chunk_size": 4, "routed_layers": "all"}


def launch(model, memory_dir, log):
    args = ["--max-total-tokens", "16384", "--log-level", "error", "--msa-config", json.dumps(MSA_CONFIG),
            "--msa-memory-dir", str(memory_dir)]
    return start_server(model, "msa", extra_args=args, log_path=log)


def listed(url: str) -> set[str]:
    response = requests.get(f"{url}/v1/memories/crash/documents", params={"limit": 10_000}, timeout=30)
    response.raise_for_status()
    return {doc["doc_id"] for doc in response.json()["documents"]}


def test_state_equals_the_acknowledged_operations_after_each_kill(tiny_llama, tmp_path):
    memory_dir = tmp_path / "memories"
    rng = random.Random(2026)
    sent: set[str] = set()  # every document ever sent
    acked_adds: set[str] = set()
    acked_deletes: set[str] = set()
    tried_deletes: set[str] = set()  # a deletion cut off by the kill may or may not have happened
    present: set[str] = set()
    operations = 0
    lock = threading.Lock()  # the client threads share the sets above
    for run in range(RUNS + 1):
        with launch(tiny_llama, memory_dir, tmp_path / f"run-{run}.log") as server:
            url = server.base_url
            if run == 0:
                requests.post(f"{url}/v1/memories", json={"memory_id": "crash"}, timeout=30).raise_for_status()
            else:  # the check after a kill
                present = listed(url)
                assert (acked_adds - tried_deletes) <= present, "an acknowledged document was lost"
                assert not (present & acked_deletes), "an acknowledged deletion came back"
                assert present <= sent, "a document that was never sent appeared"
                info = requests.get(f"{url}/v1/memories/crash", timeout=30).json()
                assert info["documents"] == len(present), "tensors and records disagree"
            if run == RUNS:
                break

            stop = threading.Event()

            def client(worker: int):
                nonlocal operations
                local = random.Random(run * 100 + worker)
                batch = 0
                while not stop.is_set():
                    try:
                        with lock:
                            doc_id = local.choice(sorted(present)) if present and local.random() < 0.35 else None
                            if doc_id is not None:
                                tried_deletes.add(doc_id)
                        if doc_id is not None:  # delete something that exists
                            response = requests.delete(f"{url}/v1/memories/crash/documents/{doc_id}", timeout=60)
                            if response.status_code == 200:
                                with lock:
                                    acked_deletes.add(doc_id)
                                    present.discard(doc_id)
                        else:
                            docs = [{"doc_id": f"r{run}-w{worker}-b{batch}-{i}",
                                     "text": f"Run {run} worker {worker} batch {batch} item {i}."} for i in range(3)]
                            batch += 1
                            with lock:
                                sent.update(d["doc_id"] for d in docs)
                            response = requests.post(f"{url}/v1/memories/crash/documents",
                                                     json={"documents": docs}, timeout=60)
                            if response.status_code == 201:
                                with lock:
                                    acked_adds.update(d["doc_id"] for d in docs)
                                    present.update(d["doc_id"] for d in docs)
                        with lock:
                            operations += 1
                    except requests.RequestException:
                        return  # the server is gone

            workers = [threading.Thread(target=client, args=(w,)) for w in range(3)]
            for worker in workers:
                worker.start()
            time.sleep(rng.uniform(1.5, 4.0))  # a random point in the stream of operations
            server.kill()
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
    print(f"crash safety: {RUNS} kills, {operations} operations, {len(acked_adds)} acknowledged additions, "
          f"{len(acked_deletes)} acknowledged deletions, 0 violations")
    assert acked_adds and acked_deletes  # the runs did exercise both kinds of operation
