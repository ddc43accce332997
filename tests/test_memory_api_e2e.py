"""The memory API end to end through HTTP on a tiny model: memories, 200+ documents, queries,
deletion, isolation between memories, and validation errors."""

from __future__ import annotations

import json
import random
import statistics
import time

import pytest
import requests

from sglang_msa.server_process import start_server

pytestmark = pytest.mark.server

MSA_CONFIG = {"top_k_docs": 4, "chunk_size": 8, "routed_layers": "all", "host_memory_budget_mb": 64}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("memory-api") / "server.log"
    args = ["--max-total-tokens", "16384", "--log-level", "warning", "--msa-config", json.dumps(MSA_CONFIG)]
    with start_server(tiny_llama, "msa", extra_args=args, log_path=log) as running:
        yield running.base_url


def post(url, payload, expect):
    response = requests.post(url, json=payload, timeout=300)
    assert response.status_code == expect, response.text
    return response.json()


def chat(server, memory_id, question, details=False, expect=200):
    return post(f"{server}/v1/memories/{memory_id}/chat/completions", {
        "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 6,
        "msa": {"routing_details": details},
    }, expect)


def test_memory_lifecycle_with_200_documents(server):
    post(f"{server}/v1/memories", {"memory_id": "library"}, 201)
    post(f"{server}/v1/memories", {"memory_id": "library"}, 409)
    docs = [{"text": f"Shelf {i} holds the book number {i * 7919 % 1000} about topic {i % 13}.",
             "doc_id": f"book-{i}"} for i in range(210)]
    added = post(f"{server}/v1/memories/library/documents", {"documents": docs}, 201)["documents"]
    assert [d["gid"] for d in added] == list(range(210))  # ids in insertion order
    info = requests.get(f"{server}/v1/memories/library", timeout=30).json()
    assert info["documents"] == 210 and info["tokens"] == sum(d["num_tokens"] for d in added)
    assert info["chunks"] == sum((d["num_tokens"] + 7) // 8 for d in added) and info["bytes"]["device"] > 0
    assert requests.get(f"{server}/v1/memories/library/documents/book-5", timeout=30).json()["text"] == docs[5]["text"]

    answer = chat(server, "library", "Which book is on shelf 42?", details=True)
    layers = answer["msa"]["layers"]
    assert set(layers) == {"0", "1"}  # routed_layers=all on a 2-layer model
    assert all(len(layer["doc_gids"]) == 4 for layer in layers.values())
    assert answer["usage"]["completion_tokens"] == 6
    chosen = answer["msa"]["retrieved"][0]["doc_id"]

    # delete the top document: it is never selected again
    requests.delete(f"{server}/v1/memories/library/documents/{chosen}", timeout=30).raise_for_status()
    assert requests.get(f"{server}/v1/memories/library/documents/{chosen}", timeout=30).status_code == 404
    again = chat(server, "library", "Which book is on shelf 42?", details=True)
    assert chosen not in {d["doc_id"] for d in again["msa"]["retrieved"]}
    deleted_gid = next(d["gid"] for d in added if d["doc_id"] == chosen)
    assert all(deleted_gid not in layer["doc_gids"] for layer in again["msa"]["layers"].values())

    requests.delete(f"{server}/v1/memories/library", timeout=30).raise_for_status()
    assert requests.get(f"{server}/v1/memories/library", timeout=30).status_code == 404
    chat(server, "library", "Which book?", expect=404)


def test_memories_are_isolated(server):
    """Memory A holds 20 documents, B 120 with the same facts but different values: a query on
    A never reports a document id that only B has, over many random questions."""
    post(f"{server}/v1/memories", {"memory_id": "tenant-a"}, 201)
    post(f"{server}/v1/memories", {"memory_id": "tenant-b"}, 201)
    facts = [f"The password of door {i} is" for i in range(20)]
    post(f"{server}/v1/memories/tenant-a/documents",
         {"documents": [{"text": f"{fact} alpha{i}."} for i, fact in enumerate(facts)]}, 201)
    post(f"{server}/v1/memories/tenant-b/documents",
         {"documents": [{"text": f"{facts[i % 20]} beta{i}."} for i in range(120)]}, 201)
    rng = random.Random(0)
    for _ in range(25):
        question = f"What is the password of door {rng.randrange(40)}?"
        gids_a = {gid for layer in chat(server, "tenant-a", question, True)["msa"]["layers"].values()
                  for gid in layer["doc_gids"]}
        assert gids_a and max(gids_a) < 20
        doc_ids_b = {d["doc_id"] for d in chat(server, "tenant-b", question)["msa"]["retrieved"]}
        assert doc_ids_b and all(0 <= int(doc_id) < 120 for doc_id in doc_ids_b)


def test_openai_client_and_streaming(server):
    import openai

    post(f"{server}/v1/memories", {"memory_id": "notes"}, 201)
    post(f"{server}/v1/memories/notes/documents", {"documents": [{"text": "The meeting is on Monday."}]}, 201)
    client = openai.OpenAI(base_url=f"{server}/v1/memories/notes", api_key="unused")
    completion = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "When is the meeting?"}], max_tokens=5, temperature=0
    )
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    assert completion.model_extra["msa"]["retrieved"] == [{"doc_id": "0", "gid": 0}]
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "When is the meeting?"}], max_tokens=5,
        temperature=0, stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert streamed == completion.choices[0].message.content


def test_native_generate_over_memory(server):
    post(f"{server}/v1/memories", {"memory_id": "native"}, 201)
    post(f"{server}/v1/memories/native/documents", {"documents": [{"text": "alpha"}, {"text": "beta"}]}, 201)
    via_route = post(f"{server}/v1/memories/native/generate", {
        "text": "The grass is green.", "sampling_params": {"max_new_tokens": 4, "temperature": 0},
    }, 200)
    assert sorted(d["gid"] for d in via_route["msa"]["retrieved"]) == [0, 1]
    # SGLang's own /generate takes the memory in custom_params, with the same result
    native = post(f"{server}/generate", {
        "text": "The grass is green.",
        "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                            "custom_params": {"msa": {"op": "query", "memory_id": "native"}}},
    }, 200)
    assert native["output_ids"] == via_route["output_ids"]


@pytest.mark.parametrize("path,payload,status,param", [
    ("/v1/memories", {"memory_id": "../etc"}, 422, "memory_id"),
    ("/v1/memories", {"memory_id": "x" * 200}, 422, "memory_id"),
    ("/v1/memories", {}, 422, "memory_id"),
    ("/v1/memories", {"memory_id": "placed", "placement": "moon"}, 422, "placement"),
    ("/v1/memories/validation/documents", {"documents": []}, 422, "documents"),
    ("/v1/memories/validation/documents", {"documents": [{"text": ""}]}, 422, "documents[0].text"),
    ("/v1/memories/validation/documents", {"documents": [{"text": "ok", "doc_id": 5}]}, 422, "documents[0].doc_id"),
    ("/v1/memories/validation/documents", {"documents": [{"text": "word " * 3000}]}, 413, "documents[0].text"),
    ("/v1/memories/validation/chat/completions", {"messages": "hello"}, 422, "messages"),
    ("/v1/memories/validation/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     422, "max_tokens"),
    ("/v1/memories/missing/documents", {"documents": [{"text": "hi"}]}, 404, "memory_id"),
    ("/v1/memories/validation/documents", {"documents": [{"text": "a", "doc_id": "d"}, {"text": "b", "doc_id": "d"}]},
     409, "documents"),
    ("/v1/memories/validation/generate", {"input_ids": [1, 2, 3], "msa": {"routing_spans": [[0, 9]]}},
     422, "msa.routing_spans"),
    ("/v1/memories/validation/generate", {"input_ids": [1, 2, 3], "msa": {"routing_spans": [[2, 3], [0, 1]]}},
     422, "msa.routing_spans"),
    ("/v1/memories/validation/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "msa": {"interleave": True}}, 422, "msa.interleave"),
])
def test_bad_input_gets_a_clear_error(server, path, payload, status, param):
    requests.post(f"{server}/v1/memories", json={"memory_id": "validation"}, timeout=30)
    response = requests.post(f"{server}{path}", json=payload, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert requests.get(f"{server}/health", timeout=10).status_code == 200  # the server lives on


def generate_plain(server, text):
    return post(f"{server}/generate", {"text": text, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                        "ignore_eos": True}}, 200)


def generate_on(server, memory_id, text):
    return post(f"{server}/v1/memories/{memory_id}/generate", {
        "text": text, "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        "msa": {"routing_details": True},
    }, 200)


def test_prefix_cache_is_never_shared_with_memory_requests(server):
    """A prompt's KV computed under a memory selection is never reused, and vice versa."""
    post(f"{server}/v1/memories", {"memory_id": "cache-a"}, 201)
    post(f"{server}/v1/memories", {"memory_id": "cache-b"}, 201)
    post(f"{server}/v1/memories/cache-a/documents", {"documents": [{"text": "The sky is blue."}]}, 201)
    post(f"{server}/v1/memories/cache-b/documents",
         {"documents": [{"text": "0123456789 abcdefghijklmnopqrstuvwxyz " * 3}]}, 201)
    prompt = "Here we go. There and back again. The grass is green."
    dense_first = generate_plain(server, prompt)
    on_a = generate_on(server, "cache-a", prompt)
    on_a_again = generate_on(server, "cache-a", prompt)
    on_b = generate_on(server, "cache-b", prompt)
    dense_again = generate_plain(server, prompt)
    for out in (on_a, on_a_again, on_b):
        assert out["meta_info"]["cached_tokens"] == 0
    assert on_a_again["output_ids"] == on_a["output_ids"]
    assert dense_again["output_ids"] == dense_first["output_ids"]
    assert dense_again["meta_info"]["cached_tokens"] > 0  # dense requests still share the cache


def test_mixed_batches_equal_requests_alone(server):
    """Dense requests and queries on two memories, sent together, batch in the scheduler and
    give exactly what each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    for memory_id, word in (("mix-a", "alpha"), ("mix-b", "beta")):
        post(f"{server}/v1/memories", {"memory_id": memory_id}, 201)
        post(f"{server}/v1/memories/{memory_id}/documents",
             {"documents": [{"text": f"Fact {i}: the {word} code is {i * 37}."} for i in range(12)]}, 201)
    prompts = [f"What is code {i}? The grass is green." for i in range(6)]
    jobs = [(None, p) for p in prompts] + [("mix-a", p) for p in prompts] + [("mix-b", p) for p in prompts]

    def run(job):
        memory_id, prompt = job
        out = generate_plain(server, prompt) if memory_id is None else generate_on(server, memory_id, prompt)
        return out["output_ids"], out.get("msa", {}).get("layers")

    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone


def test_live_ingestion_and_deletion_while_querying(server):
    """Documents are added and deleted while queries run; every acknowledged document is listed
    once and deleted ones are never selected afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    post(f"{server}/v1/memories", {"memory_id": "live"}, 201)
    post(f"{server}/v1/memories/live/documents", {"documents": [{"text": f"seed {i}", "doc_id": f"seed-{i}"}
                                                                for i in range(8)]}, 201)

    def ingest(batch):
        docs = [{"text": f"batch {batch} document {i} says {batch * 10 + i}.", "doc_id": f"b{batch}-{i}"}
                for i in range(10)]
        return post(f"{server}/v1/memories/live/documents", {"documents": docs}, 201)["documents"]

    def query(i):
        return chat(server, "live", f"What does document {i} say?", details=True)["msa"]["retrieved"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        ingests = [pool.submit(ingest, b) for b in range(4)]
        queries = [pool.submit(query, i) for i in range(12)]
        deletes = [pool.submit(requests.delete, f"{server}/v1/memories/live/documents/seed-{i}", timeout=60)
                   for i in range(4)]
        added = [doc for future in ingests for doc in future.result()]
        assert all(future.result() for future in queries)
        assert all(future.result().status_code == 200 for future in deletes)
    assert len({doc["gid"] for doc in added}) == 40
    info = requests.get(f"{server}/v1/memories/live", timeout=30).json()
    assert info["documents"] == 8 + 40 - 4
    for i in range(10):
        retrieved = {d["doc_id"] for d in chat(server, "live", f"seed {i}", details=True)["msa"]["retrieved"]}
        assert not retrieved & {f"seed-{j}" for j in range(4)}


def test_router_driven_injection(server):
    """The top-routed documents' original text goes before the question; a second round routes
    on what was injected and adds documents not injected yet."""
    post(f"{server}/v1/memories", {"memory_id": "inject"}, 201)
    docs = [{"text": f"Note {i}: the locker {i} code is {i * 111}.", "doc_id": f"note-{i}"} for i in range(6)]
    post(f"{server}/v1/memories/inject/documents", {"documents": docs}, 201)
    question = "What is the code of locker 3?"
    plain = post(f"{server}/v1/memories/inject/chat/completions", {
        "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 6,
        "msa": {"explain_doc_ids": [d["doc_id"] for d in docs]},
    }, 200)
    one = post(f"{server}/v1/memories/inject/chat/completions", {
        "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 6,
        "msa": {"inject_documents": 2},
    }, 200)
    assert len(one["msa"]["injection_rounds"]) == 1 and len(one["msa"]["injected"]) == 2
    injected_ids = [d["doc_id"] for d in one["msa"]["injected"]]
    # the injected documents are the ones the routing ranked highest: every document's scores
    # standardized over the memory in each routed layer, summed over the layers
    explain = plain["msa"]["explain"]
    layers = sorted(explain["note-0"])
    zsum = {doc_id: 0.0 for doc_id in explain}
    for layer in layers:
        scores = {doc_id: explain[doc_id][layer]["score"] for doc_id in explain}
        mean = statistics.fmean(scores.values())
        spread = statistics.stdev(scores.values())
        for doc_id, score in scores.items():
            zsum[doc_id] += (score - mean) / spread
    assert injected_ids == sorted(zsum, key=lambda doc_id: -zsum[doc_id])[:2]
    texts = {d["doc_id"]: d["text"] for d in docs}
    extra_tokens = one["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
    assert extra_tokens >= sum(len(texts[i]) // 8 for i in injected_ids)  # the text is really in the prompt
    two = post(f"{server}/v1/memories/inject/chat/completions", {
        "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 6,
        "msa": {"inject_documents": 2, "inject_rounds": 2},
    }, 200)
    rounds = two["msa"]["injection_rounds"]
    assert len(rounds) == 2 and [d["doc_id"] for d in rounds[0]] == injected_ids
    assert not {d["doc_id"] for d in rounds[1]} & set(injected_ids) and len(rounds[1]) == 2


def test_host_placement_answers_exactly_like_device_placement(server):
    """The same documents in a memory whose content lives on the device and in one whose content
    lives in host memory: the same documents retrieved with the same scores in every layer, the
    same answers; only the router keys of the host memory count on the device."""
    docs = [{"text": f"Locker {i} contains a {['red', 'green', 'blue'][i % 3]} bag with {i * 37 % 100} coins."}
            for i in range(40)]
    for memory_id, placement in (("on-device", "device"), ("on-host", "host")):
        created = post(f"{server}/v1/memories", {"memory_id": memory_id, "placement": placement}, 201)
        assert created["placement"] == placement
        post(f"{server}/v1/memories/{memory_id}/documents", {"documents": docs}, 201)
    device, host = (requests.get(f"{server}/v1/memories/{m}", timeout=30).json() for m in ("on-device", "on-host"))
    assert (device["placement"], host["placement"]) == ("device", "host")
    assert device["bytes"]["host"] == 0 and host["bytes"]["host"] > 0
    assert device["bytes"]["device"] == host["bytes"]["device"] + host["bytes"]["host"]
    assert host["bytes"]["device"] < host["bytes"]["host"]  # router keys only
    for question in ("What is in locker 7?", "How many coins are in locker 12?", "Which locker has a blue bag?"):
        on_device, on_host = (chat(server, m, question, details=True) for m in ("on-device", "on-host"))
        assert on_device["msa"]["layers"] == on_host["msa"]["layers"]
        assert on_device["choices"][0]["message"]["content"] == on_host["choices"][0]["message"]["content"]
    stats = requests.get(f"{server}/v1/memories/-/stats", timeout=30).json()
    assert stats["host_bytes"] >= host["bytes"]["host"] and stats["host_budget_bytes"] == 64 * 2**20
    assert stats["chunk_slots"]["host"]["free"] < stats["chunk_slots"]["host"]["total"]


def facts_memory(server, memory_id):
    post(f"{server}/v1/memories", {"memory_id": memory_id}, 201)
    post(f"{server}/v1/memories/{memory_id}/documents", {"documents": [{"text": f"Fact {i} is {i * i}."}
                                                                        for i in range(10)]}, 201)


def server_stat(server, name):
    return requests.get(f"{server}/v1/memories/-/stats", timeout=30).json()[name]


def test_a_stream_whose_client_goes_away_is_aborted_and_frees_its_state(server):
    """A streaming chat whose client disconnects after the first tokens: SGLang aborts the
    request and the scheduler forgets its MSA state (its selections) at once, instead of
    decoding to max_tokens and keeping the state until it expires; the server answers on."""
    facts_memory(server, "walkaway")

    def in_flight():
        return server_stat(server, "requests_in_flight")

    before = in_flight()
    for _ in range(3):
        response = requests.post(f"{server}/v1/memories/walkaway/chat/completions", json={
            "messages": [{"role": "user", "content": "What is fact 3?"}], "max_tokens": 400, "temperature": 0,
            "stream": True, "msa": {}}, stream=True, timeout=60)
        assert response.status_code == 200
        chunks = (line for line in response.iter_lines() if line)
        assert next(chunks).startswith(b"data: ")  # the role chunk
        assert b'"content"' in next(chunks)  # the request is decoding
        response.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 60
    while in_flight() != before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert in_flight() == before
    full = chat(server, "walkaway", "What is fact 3?")
    assert full["choices"][0]["message"]["content"] is not None


def test_a_plain_generate_request_releases_its_selections_when_it_finishes(server):
    """Requests sent straight to SGLang's /generate with custom_params["msa"] (what the frontend
    DSL sends) have no reader for their report: when they finish, their selections' rows go
    (they were kept until the registry's 1-hour expiry), while a report the memory API asks for
    after the answer is still there."""
    facts_memory(server, "plain")
    before = server_stat(server, "request_selection_bytes")
    for _ in range(3):
        response = requests.post(f"{server}/generate", json={"text": "What is fact 3?", "sampling_params": {
            "max_new_tokens": 4, "temperature": 0, "custom_params": {"msa": {"op": "query", "memory_id": "plain"}}}},
            timeout=300)
        assert response.status_code == 200, response.text
    assert server_stat(server, "request_selection_bytes") == before
    answer = post(f"{server}/v1/memories/plain/generate", {"text": "What is fact 3?",
                                                          "sampling_params": {"max_new_tokens": 4}}, 200)
    assert answer["msa"]["retrieved"] and server_stat(server, "request_selection_bytes") == before
