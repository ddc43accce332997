"""The external router served end to end on a tiny Llama: the documents a query selects, their
scores and ranks equal MiniLM's cosine of the question against each document's best chunk (the
chunks' text decoded from the document's token ids), and every response names the router."""

from __future__ import annotations

import json

import pytest
import requests

from sglang_msa.models.text_router import SentenceEncoder
from sglang_msa.server_process import start_server

from room_notes import DOCUMENTS, QUESTION

pytestmark = pytest.mark.server

CHUNK, TOP_K = 8, 3


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("external-router-server")
    config = {"external_router": "minilm", "top_k_docs": TOP_K, "chunk_size": CHUNK, "routed_layers": "all"}
    args = ["--max-total-tokens", "8192", "--log-level", "warning", "--msa-config", json.dumps(config)]
    with start_server(tiny_llama, "msa", extra_args=args, log_path=root / "server.log") as running:
        yield running.base_url


def reference_scores(model_dir) -> list[float]:
    """Every document's score: the cosine of the question's embedding and its best chunk's."""
    from transformers import AutoTokenizer

    tokenizer, encoder = AutoTokenizer.from_pretrained(model_dir), SentenceEncoder()
    query = encoder.embed([QUESTION])[0]
    scores = []
    for text in DOCUMENTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        chunks = [tokenizer.decode(ids[start:start + CHUNK], skip_special_tokens=True)
                  for start in range(0, len(ids), CHUNK)]
        scores.append(float((encoder.embed(chunks) @ query).max()))
    return scores


def test_external_router_selects_what_minilm_ranks_first(server, tiny_llama):
    requests.post(f"{server}/v1/memories", json={"memory_id": "notes"}, timeout=60).raise_for_status()
    added = requests.post(f"{server}/v1/memories/notes/documents",
                          json={"documents": [{"doc_id": f"note-{i}", "text": t} for i, t in enumerate(DOCUMENTS)]},
                          timeout=300)
    added.raise_for_status()
    reply = requests.post(f"{server}/v1/memories/notes/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "temperature": 0,
        "msa": {"routing_details": True, "explain_doc_ids": ["note-2", "note-7"]}}, timeout=300)
    assert reply.status_code == 200, reply.text
    msa = reply.json()["msa"]
    assert msa["router"] == "external:minilm"
    assert msa["retrieved"][0]["doc_id"] == "note-2"  # the violin's note
    every = reference_scores(tiny_llama)
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -every[i])[:TOP_K]
    assert set(msa["layers"]) == {"0", "1"}
    for layer in msa["layers"].values():  # the same text routes every layer alike
        assert layer["doc_gids"] == order
        # router keys are stored in the KV cache's dtype (bfloat16 on the CPU engine)
        assert layer["scores"] == pytest.approx([every[i] for i in order], abs=8e-3)
    for doc_id, index in (("note-2", 2), ("note-7", 7)):
        for report in msa["explain"][doc_id].values():
            assert report["rank"] == 1 + sum(score > every[index] + 8e-3 for score in every)
            assert report["score"] == pytest.approx(every[index], abs=8e-3)


def test_injection_with_the_external_router_puts_the_chosen_text_in_the_prompt(server):
    def ask(msa: dict) -> dict:
        reply = requests.post(f"{server}/v1/memories/notes/chat/completions", json={
            "messages": [{"role": "user", "content": "Which shelf is the compass near?"}], "max_tokens": 2,
            "temperature": 0, "msa": msa}, timeout=300)
        assert reply.status_code == 200, reply.text
        return reply.json()

    injected, plain = ask({"inject_documents": 1}), ask({})
    assert injected["msa"]["router"] == "external:minilm"
    assert [doc["doc_id"] for doc in injected["msa"]["injected"]] == ["note-7"]  # the compass's note
    # the note's text (and its header) went into the prompt
    assert injected["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 15
