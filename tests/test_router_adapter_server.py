"""A router adapter served end to end: the server's routing with an adapter on a tiny Llama equals
a float reference computed from the HF model's layer inputs (documents pooled without their
sink token, the adapter's projections, dot / head mean / query mean / chunk max)."""

from __future__ import annotations

import json
import math

import pytest
import requests
import torch

from sglang_msa.models.router_adapter import LayerRouter, RouterAdapter
from sglang_msa.server.prompting import build_chat_prompt
from sglang_msa.server_process import start_server

from room_notes import DOCUMENTS, QUESTION

pytestmark = pytest.mark.server

CHUNK, TOP_K, HEADS, HEAD_DIM = 8, 3, 2, 16


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    config = json.loads((tiny_llama / "config.json").read_text())
    generator = torch.Generator().manual_seed(7)
    hidden = config["hidden_size"]
    routers = {1: LayerRouter(torch.randn(HEADS * HEAD_DIM, hidden, generator=generator) / math.sqrt(hidden),
                              torch.randn(HEADS * HEAD_DIM, hidden, generator=generator) / math.sqrt(hidden),
                              torch.randn(hidden, generator=generator) * 0.1)}
    made = RouterAdapter(routers, HEADS, HEADS, HEAD_DIM, hidden, config["num_hidden_layers"],
                         {"similarity": "dot", "head_reduce": "mean", "query_reduce": "mean", "chunk_reduce": "max"})
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    made.save(path)
    return made, path


@pytest.fixture(scope="module")
def server(tiny_llama, adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-server")
    config = {"router_adapter": str(adapter[1]), "top_k_docs": TOP_K, "chunk_size": CHUNK,
              "memory_dir": str(root / "memories")}
    args = ["--max-total-tokens", "8192", "--log-level", "warning", "--msa-config", json.dumps(config)]
    with start_server(tiny_llama, "msa", extra_args=args, log_path=root / "server.log") as running:
        yield running.base_url


def reference_routing(model_dir, adapter: RouterAdapter) -> tuple[list[int], list[float], list[float]]:
    """The top-k gids and their scores, and every document's score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def layer_input(ids, offset=0):
        with torch.no_grad():
            positions = offset + torch.arange(len(ids))[None]
            states = model.model(input_ids=torch.tensor([ids]), position_ids=positions,
                                 output_hidden_states=True).hidden_states[1]
            return model.model.layers[1].input_layernorm(states)[0]

    doc_scores = []
    prompt = build_chat_prompt(tokenizer, [{"role": "user", "content": QUESTION}], None)
    doc_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in DOCUMENTS]
    start, end = prompt.routing_spans[0]
    q = adapter.project(1, layer_input(prompt.input_ids, max(map(len, doc_ids)))[start:end], "q")
    for ids in doc_ids:
        k = adapter.project(1, layer_input(ids), "k")
        chunks = [k[max(first, 1):first + CHUNK].mean(0) for first in range(0, len(ids), CHUNK)]
        scores = [float((q * chunk).sum(-1).mean(-1).mean() / math.sqrt(HEAD_DIM)) for chunk in chunks]
        doc_scores.append(max(scores))
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -doc_scores[i])[:TOP_K]
    return order, [doc_scores[i] for i in order], doc_scores


def test_routing_with_an_adapter_equals_the_float_reference(server, adapter, tiny_llama):
    requests.post(f"{server}/v1/memories", json={"memory_id": "notes"}, timeout=60).raise_for_status()
    added = requests.post(f"{server}/v1/memories/notes/documents",
                          json={"documents": [{"text": t} for t in DOCUMENTS]}, timeout=300)
    added.raise_for_status()
    explained = [added.json()["documents"][i]["doc_id"] for i in (2, 9)]
    reply = requests.post(f"{server}/v1/memories/notes/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "temperature": 0,
        "msa": {"routing_details": True, "explain_doc_ids": explained}}, timeout=300)
    assert reply.status_code == 200, reply.text
    layers = reply.json()["msa"]["layers"]
    assert set(layers) == {"1"}  # the adapter's layers are the routed layers
    gids, scores, every = reference_routing(tiny_llama, adapter[0])
    assert layers["1"]["doc_gids"] == gids
    for doc_id, index in zip(explained, (2, 9)):  # rank among all documents, by the reference's scores
        report = reply.json()["msa"]["explain"][doc_id]["1"]
        assert report["rank"] == 1 + sum(score > every[index] for score in every)
        assert report["num_documents"] == len(DOCUMENTS)
        assert report["score"] == pytest.approx(every[index], rel=8e-3)
    unknown = requests.post(f"{server}/v1/memories/notes/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1,
        "msa": {"explain_doc_ids": ["no-such-doc"]}}, timeout=60)
    assert unknown.status_code == 422 and "explain_doc_ids" in unknown.text
    # router keys are stored in the KV cache's dtype (bfloat16 on the CPU engine): 2^-8 relative
    assert layers["1"]["scores"] == pytest.approx(scores, rel=8e-3)
