"""A hostile-tenant pass through the real server: three tenants with API keys, an admin key,
a memory directory. Each test reproduces one hole that pass found (docs/reliability.md, "Hostile
tenants") and checks it stays closed: writes aimed at a deleted memory, token ids that crashed
the scheduler, prefix aborts that left ghost documents, open admin endpoints, oversized bodies,
existence oracles, server-wide statistics, and 500s for bad parameters."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from tenant_server import ADMIN, TenantServer

pytestmark = pytest.mark.server

KEYS = {"key-of-tenant-alpha-0001": "alpha", "key-of-tenant-bravo-0002": "bravo",
        "key-of-tenant-charlie-003": "charlie"}
ALPHA, BRAVO, CHARLIE = ({"Authorization": f"Bearer {key}"} for key in KEYS)
BODY_LIMIT_MB = 1
OPTIONS = {"top_k_docs": 2, "chunk_size": 4, "routed_layers": "all", "max_document_tokens": 512,
           "max_request_body_mb": BODY_LIMIT_MB}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    running = TenantServer(tiny_llama, tmp_path_factory.mktemp("hostile"), KEYS, OPTIONS)
    yield running
    running.process.stop()


def call(method, url, headers=None, **payload):
    return requests.request(method, url, headers=headers, timeout=120, **({"json": payload} if payload else {}))


def documents(prefix: str, count: int) -> list[dict]:
    return [{"doc_id": f"{prefix}-{i}", "text": f"{prefix} document {i}: " + "the quick brown fox " * 30}
            for i in range(count)]


def listing(url: str, memory_id: str, headers) -> dict[str, str]:
    """doc_id -> text of every listed document."""
    rows = call("GET", f"{url}/v1/memories/{memory_id}/documents?limit=10000", headers).json()["documents"]
    return {row["doc_id"]: call("GET", f"{url}/v1/memories/{memory_id}/documents/{row['doc_id']}",
                                headers).json()["text"] for row in rows}


def held(url: str, memory_id: str, headers) -> int:
    """Documents the scheduler holds for the memory."""
    return call("GET", f"{url}/v1/memories/{memory_id}", headers).json()["documents"]


def add_in_background(url: str, memory_id: str, headers, docs: list[dict]) -> tuple[threading.Thread, dict]:
    result = {}

    def run():
        response = call("POST", f"{url}/v1/memories/{memory_id}/documents", headers, documents=docs)
        result["status"], result["body"] = response.status_code, response.json()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def wait_until_ingesting(url: str, memory_id: str, headers, timeout_s: float = 60) -> None:
    """Until the scheduler holds (or stages) a first document of the memory."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = call("GET", f"{url}/v1/memories/{memory_id}", headers).json()
        if info.get("documents", 0) or info.get("bytes", {}).get("device", 0):
            return
        time.sleep(0.02)
    raise AssertionError("the ingestion never started")


def acknowledged(result: dict) -> set[str]:
    return {doc["doc_id"] for doc in result["body"].get("documents", [])}


# ------------------------------------------------------------------------------- API keys
def test_keys_scope_every_memory_operation(server):
    url = server.url
    memories = f"{url}/v1/memories"
    assert call("GET", memories).status_code == 401
    assert call("GET", memories, {"Authorization": "Bearer not-a-key-at-all-0000"}).status_code == 401
    assert call("POST", memories, memory_id="no-key").status_code == 401  # before validation or creation
    assert call("POST", memories, ADMIN, memory_id="admin-owned").status_code == 403  # the admin is no tenant

    assert call("POST", memories, ALPHA, memory_id="alpha-notes").status_code == 201
    assert call("POST", memories, BRAVO, memory_id="bravo-notes").status_code == 201
    assert call("POST", f"{memories}/alpha-notes/documents", ALPHA,
                documents=[{"text": "Alpha's secret is 4471.", "doc_id": "secret"}]).status_code == 201
    assert call("POST", f"{memories}/bravo-notes/documents", BRAVO,
                documents=[{"text": "Bravo's secret is 9102.", "doc_id": "secret"}]).status_code == 201
    assert "alpha-notes" in [m["memory_id"] for m in call("GET", memories, ALPHA).json()["memories"]]
    assert "alpha-notes" not in [m["memory_id"] for m in call("GET", memories, BRAVO).json()["memories"]]

    chat = {"messages": [{"role": "user", "content": "What is the secret?"}], "max_tokens": 3}
    refused = [
        call("GET", f"{memories}/alpha-notes", BRAVO),
        call("GET", f"{memories}/alpha-notes/documents", BRAVO),
        call("GET", f"{memories}/alpha-notes/documents/secret", BRAVO),
        call("GET", f"{memories}/alpha-notes/documents/secret?tokens=true", BRAVO),
        call("POST", f"{memories}/alpha-notes/documents", BRAVO, documents=[{"text": "planted"}]),
        call("POST", f"{memories}/alpha-notes/chat/completions", BRAVO, **chat),
        call("POST", f"{memories}/alpha-notes/generate", BRAVO, text="secret"),
        call("POST", f"{memories}/alpha-notes/generate", BRAVO, text="secret", return_logprob=True,
             logprob_start_len=0),
        call("DELETE", f"{memories}/alpha-notes/documents/secret", BRAVO),
        call("DELETE", f"{memories}/alpha-notes", BRAVO),
    ]
    assert [r.status_code for r in refused] == [404] * len(refused)
    assert all(r.json()["error"]["param"] == "memory_id" for r in refused)

    own = call("POST", f"{memories}/alpha-notes/chat/completions", ALPHA, **chat)
    assert own.status_code == 200 and [d["doc_id"] for d in own.json()["msa"]["retrieved"]] == ["secret"]
    assert call("GET", f"{memories}/alpha-notes/documents/secret", ALPHA).json()["text"] == "Alpha's secret is 4471."
    own_tokens = call("GET", f"{memories}/alpha-notes/documents/secret?tokens=true", ALPHA).json()
    assert len(own_tokens["token_ids"]) == own_tokens["num_tokens"]
    assert call("GET", f"{memories}/alpha-notes", ALPHA).json()["documents"] == 1  # nothing planted


def memory_key_on_disk(server: TenantServer, memory_id: str, owner: str) -> str:
    """What an attacker with read access to the memory directory could learn: a memory's key."""
    for description in (server.root / "memories" / "tensors").glob("*/memory.json"):
        found = json.loads(description.read_text())
        if (found["memory_id"], found["owner"]) == (memory_id, owner):
            return description.parent.name
    raise AssertionError(f"no memory {memory_id!r} of {owner!r} on disk")


@pytest.mark.parametrize("grant", [None, "0" * 64])
def test_scheduler_refuses_memory_requests_without_the_apis_grant(server, grant):
    url = server.url
    call("POST", f"{url}/v1/memories", ALPHA, memory_id="alpha-grant")
    key = memory_key_on_disk(server, "alpha-grant", "alpha")
    forged = {"grant": grant} if grant else {}
    for msa in ({"op": "query", "memory_id": "alpha-grant"}, {"op": "query", "memory_key": key, **forged}):
        response = requests.post(f"{url}/generate", json={
            "text": "What is the secret?", "sampling_params": {"max_new_tokens": 3, "custom_params": {"msa": msa}}},
            timeout=60)
        assert response.status_code == 400 and "does not exist" in response.text, response.text
    ingest = requests.post(f"{url}/generate", json={
        "text": "planted", "sampling_params": {"max_new_tokens": 1, "custom_params": {"msa": {
            "op": "ingest", "memory_key": key, "gid": 77, "grant": grant or "0" * 64}}}}, timeout=60)
    assert ingest.status_code == 400 and "does not exist" in ingest.text, ingest.text
    assert held(url, "alpha-grant", ALPHA) == 0


# ---------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("recreator", ["other tenant", "same tenant"])
def test_a_write_aimed_at_a_deleted_memory_never_reaches_its_successor(server, recreator):
    """A adds many documents to `race`, deletes `race` mid-way, and `race` is created again (by
    B, or by A itself): the new memory starts empty whatever A's add does, A's acknowledged
    documents are only those the response lists, and a restart agrees."""
    url, name = server.url, f"race-{recreator.split()[0]}"
    successor = BRAVO if recreator == "other tenant" else ALPHA
    assert call("POST", f"{url}/v1/memories", ALPHA, memory_id=name).status_code == 201
    thread, result = add_in_background(url, name, ALPHA, documents("alpha", 60))
    wait_until_ingesting(url, name, ALPHA)
    assert call("DELETE", f"{url}/v1/memories/{name}", ALPHA).status_code == 200
    assert call("POST", f"{url}/v1/memories", successor, memory_id=name).status_code == 201
    thread.join()
    assert result["status"] in (201, 404, 409, 503), result
    assert listing(url, name, successor) == {}, "documents written to the deleted memory leaked into its successor"
    assert held(url, name, successor) == 0, "the scheduler holds documents nobody acknowledged"
    assert call("POST", f"{url}/v1/memories/{name}/documents", successor,
                documents=documents("fresh", 2)).status_code == 201
    server.restart()
    url = server.url
    assert set(listing(url, name, successor)) == {"fresh-0", "fresh-1"}
    assert held(url, name, successor) == 2


# ---------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("path,body,param", [
    ("/v1/memories/{own}/generate", {"input_ids": [-1, 5, 6]}, "input_ids[0]"),
    ("/v1/memories/{own}/generate", {"input_ids": [5, 1_000_000]}, "input_ids[1]"),
    ("/generate", {"input_ids": [100000, 5], "sampling_params": {"max_new_tokens": 1}}, "input_ids"),
    ("/generate", {"input_ids": [5, -3], "sampling_params": {"max_new_tokens": 1}}, "input_ids"),
])
def test_token_ids_outside_the_vocabulary_are_refused_and_the_server_lives(server, path, body, param):
    url = server.url
    call("POST", f"{url}/v1/memories", ALPHA, memory_id="own")
    response = call("POST", url + path.format(own="own"), ALPHA if path.startswith("/v1") else None, **body)
    assert 400 <= response.status_code < 500, response.text
    assert param in response.text and "vocabulary" in response.text, response.text
    assert server.alive()


# ---------------------------------------------------------------------------------------- 3
def disconnecting_generate(url: str, rid: str) -> None:
    """A raw /generate with `rid` whose client goes away after half a second (SGLang aborts it)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"text": "hello", "rid": rid, "stream": True,
                       "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)


@pytest.mark.parametrize("attack", ["prefix rid", "admin abort_all"])
def test_aborted_ingestion_commits_nothing_and_others_cannot_abort_memory_requests(server, attack):
    url, name = server.url, f"abort-{attack.split()[0]}"
    assert call("POST", f"{url}/v1/memories", ALPHA, memory_id=name).status_code == 201
    thread, result = add_in_background(url, name, ALPHA, documents("doc", 60))
    wait_until_ingesting(url, name, ALPHA)
    if attack == "prefix rid":
        for rid in ("msa-", "m", "msa-ingest-"):
            disconnecting_generate(url, rid)
    else:
        assert call("POST", f"{url}/abort_request", ADMIN, abort_all=True).status_code == 200
    thread.join()
    acked = acknowledged(result)
    if attack == "prefix rid":
        assert result["status"] == 201 and len(acked) == 60, "another caller aborted a memory request"
    else:
        assert result["status"] in (201, 503), result
        if result["status"] == 503:
            assert "abort" in json.dumps(result["body"]["error"]), result
    assert set(listing(url, name, ALPHA)) == acked
    assert held(url, name, ALPHA) == len(acked), "an aborted ingestion left a ghost document"
    chat = call("POST", f"{url}/v1/memories/{name}/chat/completions", ALPHA, max_tokens=2,
                messages=[{"role": "user", "content": "the quick brown fox"}], msa={"routing_details": True})
    routed = {gid for layer in chat.json()["msa"]["layers"].values() for gid in layer["doc_gids"]}
    listed_gids = {row["gid"] for row in call("GET", f"{url}/v1/memories/{name}/documents?limit=10000",
                                              ALPHA).json()["documents"]}
    assert routed <= listed_gids, "routing picked a document that was never acknowledged"


def test_reserved_request_ids_are_refused_on_sglangs_own_endpoint(server):
    response = requests.post(f"{server.url}/generate", json={
        "text": "hello", "rid": "msa-chat-0", "sampling_params": {"max_new_tokens": 1}}, timeout=60)
    assert response.status_code == 400 and "rid" in response.text, response.text


# ---------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize("headers", [None, ALPHA], ids=["no key", "tenant key"])
@pytest.mark.parametrize("path,body", [
    ("/abort_request", {"abort_all": True}),
    ("/pause_generation", {}),
    ("/update_weights_from_disk", {"model_path": "/nonexistent"}),
    ("/flush_cache", None),
])
def test_admin_endpoints_need_the_admin_key(server, headers, path, body):
    response = requests.post(server.url + path, headers=headers, json=body, timeout=60)
    assert response.status_code in (401, 403), (path, response.status_code, response.text)


def test_api_keys_without_an_admin_key_refuse_to_start(tiny_llama, tmp_path):
    (tmp_path / "keys.json").write_text(json.dumps({"keys": KEYS}))
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tiny_llama), "--device", "cpu",
               "--attention-backend", "msa", "--msa-config", json.dumps({"api_keys_file": str(tmp_path / "keys.json")})]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "--admin-api-key" in done.stdout + done.stderr


# ---------------------------------------------------------------------------------------- 5
def test_oversized_bodies_and_documents_are_refused_before_parsing(server):
    url = server.url
    call("POST", f"{url}/v1/memories", ALPHA, memory_id="big")
    body = json.dumps({"documents": [{"text": "x" * (BODY_LIMIT_MB * 2**20 + 10)}]})
    response = requests.post(f"{url}/v1/memories/big/documents", data=body, headers={
        **ALPHA, "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and "max_request_body_mb" in response.text, response.text

    def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"documents": [{"text": "'
        for _ in range(2 * BODY_LIMIT_MB * 16):
            yield b"y" * 2**15
        yield b'"}]}'

    response = requests.post(f"{url}/v1/memories/big/documents", data=chunks(), headers={
        **ALPHA, "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413, response.text
    too_many_tokens = {"documents": [{"text": "word " * 100_000}]}  # ~0.5 MB: under the body limit
    response = call("POST", f"{url}/v1/memories/big/documents", ALPHA, **too_many_tokens)
    assert response.status_code == 413 and response.json()["error"]["param"] == "documents[0].text"
    assert held(url, "big", ALPHA) == 0


# ---------------------------------------------------------------------------------------- 6
def test_memory_ids_are_per_tenant_and_others_memories_look_absent(server):
    url = server.url
    for tenant, secret in ((ALPHA, "4471"), (BRAVO, "9102")):
        assert call("POST", f"{url}/v1/memories", tenant, memory_id="notes").status_code == 201
        assert call("POST", f"{url}/v1/memories/notes/documents", tenant,
                    documents=[{"doc_id": "secret", "text": f"The secret is {secret}."}]).status_code == 201
    assert call("GET", f"{url}/v1/memories/notes/documents/secret", ALPHA).json()["text"] == "The secret is 4471."
    assert call("GET", f"{url}/v1/memories/notes/documents/secret", BRAVO).json()["text"] == "The secret is 9102."
    assert call("POST", f"{url}/v1/memories", ALPHA, memory_id="alpha-only").status_code == 201
    for missing in ("alpha-only", "never-created"):
        response = call("GET", f"{url}/v1/memories/{missing}", CHARLIE)
        assert response.status_code == 404
        assert response.json()["error"]["message"] == f"memory {missing!r} does not exist"
    responses = {}
    for missing in ("alpha-only", "never-created"):
        for path in ("/generate", "/v1/completions"):
            msa = {"msa": {"op": "query", "memory_id": missing}}
            body = ({"text": "hi", "sampling_params": {"max_new_tokens": 1, "custom_params": msa}}
                    if path == "/generate" else {"model": "default", "prompt": "hi", "max_tokens": 1,
                                                 "custom_params": msa})
            response = requests.post(url + path, json=body, timeout=60)
            responses[(missing, path)] = (response.status_code, response.text.replace(missing, "X"))
    assert responses[("alpha-only", "/generate")] == responses[("never-created", "/generate")]
    assert responses[("alpha-only", "/v1/completions")] == responses[("never-created", "/v1/completions")]
    assert responses[("alpha-only", "/generate")][0] >= 400


# ---------------------------------------------------------------------------------------- 7
def test_tenants_see_their_own_usage_and_the_admin_the_servers(server):
    url = server.url
    call("POST", f"{url}/v1/memories", CHARLIE, memory_id="charlie-stats")
    before = call("GET", f"{url}/v1/memories/-/stats", CHARLIE).json()
    assert call("POST", f"{url}/v1/memories", BRAVO, memory_id="bravo-stats").status_code == 201
    assert call("POST", f"{url}/v1/memories/bravo-stats/documents", BRAVO,
                documents=documents("bravo", 3)).status_code == 201
    after = call("GET", f"{url}/v1/memories/-/stats", CHARLIE).json()
    assert after == before, "a tenant's statistics moved when another tenant added documents"
    assert "chunk_slots" not in after and "budget_bytes" not in after
    server_wide = call("GET", f"{url}/v1/memories/-/stats", ADMIN)
    assert server_wide.status_code == 200 and "chunk_slots" in server_wide.json()
    assert server_wide.json()["documents"] >= 3


# ---------------------------------------------------------------------------------------- 8
@pytest.mark.parametrize("query,param", [("offset=9223372036854775808", "offset"), ("offset=" + "1" * 31, "offset"),
                                         ("limit=-1", "limit")])
def test_listing_parameters_out_of_range_are_4xx(server, query, param):
    call("POST", f"{server.url}/v1/memories", ALPHA, memory_id="own")
    response = call("GET", f"{server.url}/v1/memories/own/documents?{query}", ALPHA)
    assert response.status_code == 422 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("body,param", [
    ({"input_ids": [2**70]}, "input_ids[0]"),
    ({"text": "hi", "sampling_params": {"n": 2}}, "sampling_params.n"),
    ({"text": "hi", "sampling_params": {"bogus": 1}}, "sampling_params.bogus"),
    ({"text": "hi", "sampling_params": {"custom_params": 5}}, "sampling_params.custom_params"),
    ({"text": "hi", "sampling_params": {"regex": "(("}}, "sampling_params.regex"),
])
def test_bad_generate_parameters_are_4xx_naming_the_field(server, body, param):
    call("POST", f"{server.url}/v1/memories", ALPHA, memory_id="own")
    response = call("POST", f"{server.url}/v1/memories/own/generate", ALPHA, **body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert server.alive()


def test_huge_token_id_on_sglangs_endpoint_is_4xx(server):
    response = requests.post(f"{server.url}/generate", json={"input_ids": [2**70],
                                                             "sampling_params": {"max_new_tokens": 1}}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert server.alive()
