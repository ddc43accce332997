"""Hostile input through HTTP (hypothesis): random JSON bodies, mutated valid bodies and odd
memory / document ids against every memory endpoint. No answer may be a 5xx, every 4xx names
what was wrong, and the server (HTTP process and scheduler) keeps serving afterwards."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_msa.server_process import start_server

pytestmark = pytest.mark.server

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
memory_ids = st.one_of(  # half the requests reach the existing memory "ok"
    st.just("ok"),
    st.text(min_size=1, max_size=300),
    st.sampled_from(["..", "../etc", "a/b", "%2e%2e", "a" * 129, "\u202eevil", "null", " ", "-x", "é"]),
)
VALID = {
    "documents": {"documents": [{"text": "The fuzzing fox is blue.", "doc_id": "fox"}]},
    "chat/completions": {"messages": [{"role": "user", "content": "What colour is the fox?"}], "max_tokens": 2,
                         "msa": {"routing_details": True, "inject_documents": 1}},
    "generate": {"text": "The fox", "sampling_params": {"max_new_tokens": 2}, "msa": {"routing_spans": None}},
}


def mutated(body: dict) -> st.SearchStrategy:
    """A valid body with one field replaced by an arbitrary value (or removed)."""
    keys = list(body)
    return st.tuples(st.sampled_from(keys), json_values | st.just(...)).map(
        lambda change: {k: v for k, v in {**body, change[0]: change[1]}.items() if v is not ...}
    )


requests_to_try = st.one_of(
    st.tuples(st.just("POST"), st.just(""), json_values),
    st.tuples(st.just("POST"), st.sampled_from(list(VALID)), st.sampled_from(list(VALID)).flatmap(
        lambda path: mutated(VALID[path]))),
    st.tuples(st.just("POST"), st.sampled_from(list(VALID)), json_values),
    st.tuples(st.sampled_from(["GET", "DELETE"]), st.sampled_from(["", "documents", "documents/fox"]), st.none()),
)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    options = {"top_k_docs": 2, "chunk_size": 4, "routed_layers": "all", "max_document_tokens": 256}
    args = ["--max-total-tokens", "8192", "--log-level", "error", "--msa-config", json.dumps(options)]
    with start_server(tiny_llama, "msa", extra_args=args, log_path=log) as running:
        requests.post(f"{running.base_url}/v1/memories", json={"memory_id": "ok"}, timeout=30).raise_for_status()
        requests.post(f"{running.base_url}/v1/memories/ok/documents", json=VALID["documents"], timeout=60)
        yield running.base_url


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(memory_id=memory_ids, request=requests_to_try)
def test_no_input_gets_a_5xx_or_takes_the_server_down(server, memory_id, request):
    method, suffix, body = request
    if suffix == "" and method == "POST":
        url = f"{server}/v1/memories"
    else:
        # dots percent-encoded too, so that ".." reaches the memory routes instead of being resolved
        # by the client into another endpoint of SGLang's
        encoded = requests.utils.quote(memory_id, safe="").replace(".", "%2E")
        url = f"{server}/v1/memories/{encoded}" + (f"/{suffix}" if suffix else "")
    response = requests.request(method, url, data=None if body is None else json.dumps(body),
                                headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code < 500, (method, url, body, response.text)
    if response.status_code >= 400:  # ours name the field ("error"); FastAPI's routing misses say "detail"
        answer = response.json()
        assert answer.get("error", {}).get("message") or answer.get("detail"), response.text


def test_the_server_still_answers_after_fuzzing(server):
    # the fuzzer may have deleted "ok" or its document: make sure both exist again
    assert requests.post(f"{server}/v1/memories", json={"memory_id": "ok"}, timeout=30).status_code in (201, 409)
    added = requests.post(f"{server}/v1/memories/ok/documents", json=VALID["documents"], timeout=60)
    assert added.status_code in (201, 409), added.text
    reply = requests.post(f"{server}/v1/memories/ok/chat/completions", json=VALID["chat/completions"], timeout=120)
    assert reply.status_code == 200, reply.text
    assert requests.get(f"{server}/health", timeout=10).status_code == 200
