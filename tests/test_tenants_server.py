"""API keys per tenant through the real server: 401 without a key, 403 on another tenant's
memory, listing scoped to the caller, and the scheduler refusing memory requests that bypass
the memory API (SGLang's own /generate cannot reach a memory without the API's grant)."""

from __future__ import annotations

import json

import pytest
import requests

from sglang_msa.server_process import start_server

pytestmark = pytest.mark.server

KEYS = {"key-of-tenant-alpha-0001": "alpha", "key-of-tenant-bravo-0002": "bravo"}
ALPHA, BRAVO = ({"Authorization": f"Bearer {key}"} for key in KEYS)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    (root / "keys.json").write_text(json.dumps({"keys": KEYS}))
    options = {"top_k_docs": 2, "chunk_size": 4, "routed_layers": "all", "api_keys_file": str(root / "keys.json")}
    args = ["--max-total-tokens", "8192", "--log-level", "warning", "--msa-config", json.dumps(options)]
    with start_server(tiny_llama, "msa", extra_args=args, log_path=root / "server.log") as running:
        yield running.base_url


def call(method, url, headers=None, **payload):
    return requests.request(method, url, headers=headers, timeout=120, **({"json": payload} if payload else {}))


def test_keys_scope_every_memory_operation(server):
    memories = f"{server}/v1/memories"
    assert call("GET", memories).status_code == 401
    assert call("GET", memories, {"Authorization": "Bearer not-a-key-at-all-0000"}).status_code == 401
    assert call("POST", memories, memory_id="no-key").status_code == 401  # before validation or creation

    assert call("POST", memories, ALPHA, memory_id="alpha-notes").status_code == 201
    assert call("POST", memories, BRAVO, memory_id="bravo-notes").status_code == 201
    assert call("POST", f"{memories}/alpha-notes/documents", ALPHA,
                documents=[{"text": "Alpha's secret is 4471.", "doc_id": "secret"}]).status_code == 201
    assert call("POST", f"{memories}/bravo-notes/documents", BRAVO,
                documents=[{"text": "Bravo's secret is 9102.", "doc_id": "secret"}]).status_code == 201

    assert [m["memory_id"] for m in call("GET", memories, ALPHA).json()["memories"]] == ["alpha-notes"]
    assert [m["memory_id"] for m in call("GET", memories, BRAVO).json()["memories"]] == ["bravo-notes"]

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
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert all(r.json()["error"]["param"] == "memory_id" for r in refused)
    assert call("POST", memories, BRAVO, memory_id="alpha-notes").status_code == 409

    own = call("POST", f"{memories}/alpha-notes/chat/completions", ALPHA, **chat)
    assert own.status_code == 200 and [d["doc_id"] for d in own.json()["msa"]["retrieved"]] == ["secret"]
    assert call("GET", f"{memories}/alpha-notes/documents/secret", ALPHA).json()["text"] == "Alpha's secret is 4471."
    own_tokens = call("GET", f"{memories}/alpha-notes/documents/secret?tokens=true", ALPHA).json()
    assert len(own_tokens["token_ids"]) == own_tokens["num_tokens"]
    assert call("GET", f"{memories}/alpha-notes", ALPHA).json()["documents"] == 1  # nothing planted


@pytest.mark.parametrize("grant", [None, "0" * 64])
def test_scheduler_refuses_memory_requests_without_the_apis_grant(server, grant):
    assert call("POST", f"{server}/v1/memories", ALPHA, memory_id="alpha-grant").status_code in (201, 409)
    msa = {"op": "query", "memory_id": "alpha-grant", **({"grant": grant} if grant else {})}
    response = requests.post(f"{server}/generate", json={
        "text": "What is the secret?",
        "sampling_params": {"max_new_tokens": 3, "custom_params": {"msa": msa}}}, timeout=60)
    assert response.status_code >= 400, response.text
    assert "no grant for memory 'alpha-grant'" in response.text
    ingest = requests.post(f"{server}/generate", json={
        "text": "planted", "sampling_params": {"max_new_tokens": 1, "custom_params": {"msa": {
            "op": "ingest", "memory_id": "alpha-grant", "gid": 77, **({"grant": grant} if grant else {})}}}},
        timeout=60)
    assert ingest.status_code >= 400 and "no grant" in ingest.text
    assert requests.get(f"{server}/health", timeout=10).status_code == 200
