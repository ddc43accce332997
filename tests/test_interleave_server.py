"""Memory Interleave through the real server on a tiny MSA checkpoint scripted to write
"[1]<|object_ref_end|>", then "<End-of-Retrieve>", then the answer "Z" (router keys aligned with
router queries, so routing follows token overlap): one HTTP call runs both rounds and the answer;
each request's routing equals the spec's forward (float64, independent) on the token ids and
routing tokens that spec §10 prescribes."""

from __future__ import annotations

import json

import pytest
import requests
from transformers import AutoTokenizer

from msa_checkpoints import (
    MSA_MARKERS,
    ReferenceMSAModel,
    align_router_keys,
    build_tiny_msa_checkpoint,
    script_next_tokens,
)
from sglang_msa.models.msa_config import wrap_document
from sglang_msa.server_process import start_server

pytestmark = pytest.mark.server

OBJECT_REF_END, END_OF_RETRIEVE = MSA_MARKERS
DOCUMENTS = ["Grass grows green in spring.", "The sky is blue. Paris is far.",
             "Memory sparse attention routes queries.", "The capital of France is Paris.", "Quiet rivers run deep."]
QUESTION = "What colour is the sky?"
INSTRUCTION = "\nPlease answer the question based on the above historical document information\n\n"
RETRIEVAL = "\nPlease return all documents related to the question"
# greedy decoding follows this chain token by token
SCRIPT = ["<|im_start|>", "[", "1", "]", OBJECT_REF_END, END_OF_RETRIEVE, "Z", "<|im_end|>"]


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    model_dir = build_tiny_msa_checkpoint(tmp_path_factory.mktemp("msa-scripted"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chain = [tokenizer.convert_tokens_to_ids(token) for token in SCRIPT]
    assert all(len(tokenizer(t, add_special_tokens=False).input_ids) == 1 for t in SCRIPT)
    script_next_tokens(model_dir, chain)
    align_router_keys(model_dir)
    log = tmp_path_factory.mktemp("logs") / "msa-scripted.log"
    with start_server(model_dir, "msa", extra_args=["--max-total-tokens", "8192", "--dtype", "float32"],
                      log_path=log) as server:
        url = server.base_url
        requests.post(f"{url}/v1/memories", json={"memory_id": "hops"}, timeout=30).raise_for_status()
        added = requests.post(f"{url}/v1/memories/hops/documents",
                              json={"documents": [{"text": t, "doc_id": f"d{i}"} for i, t in enumerate(DOCUMENTS)]},
                              timeout=120)
        assert added.status_code == 201, added.text
        yield model_dir, tokenizer, url


def expected_requests(tokenizer):
    """The three requests of spec §10 for this script, built from its strings: (ids, routing spans)."""
    def enc(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    template = enc("<|im_start|>user\n")
    routed = enc(INSTRUCTION + QUESTION + RETRIEVAL)
    question_span = (len(template), len(template) + len(routed))
    round_1 = template + routed + enc("\n") + enc("<|im_end|>\n<|im_start|>")
    generated_1 = [tokenizer.convert_tokens_to_ids(t) for t in SCRIPT[1:5]]  # [ 1 ] <|object_ref_end|>
    block = enc(f"[1]. {DOCUMENTS[1]}\n")
    round_2 = round_1 + generated_1 + block + enc(OBJECT_REF_END)
    spans_2 = [question_span, (len(round_1) + 4, len(round_1) + 4 + len(block))]
    answer = round_2 + enc(END_OF_RETRIEVE) + enc(f"<|im_start|>The user's question is: {QUESTION}\n") + \
        enc(OBJECT_REF_END)
    return len(template), [
        (round_1, [(question_span[0], question_span[1] + 1)]),  # round 1 also routes the newline
        (round_2, spans_2),
        (answer, spans_2),  # the answer keeps the routing of the round that ended retrieval
    ]


def reference_selections(model_dir, tokenizer):
    reference = ReferenceMSAModel(model_dir)
    memory = []
    for gid, text in enumerate(DOCUMENTS):
        ids = tokenizer(wrap_document(gid, text), add_special_tokens=False).input_ids
        memory.append({"num_tokens": len(ids), "layers": reference.encode_document(ids)})
    template, requests_ = expected_requests(tokenizer)
    selections = []
    for ids, spans in requests_:
        selections.append(reference.query(ids, memory, template, spans)[1])
        for scores in reference.document_scores.values():  # no tie at the top-k boundary
            ranked = scores.sort(descending=True).values
            assert ranked[1] - ranked[2] > 1e-4
    return selections, requests_


def layers_of(routing: dict) -> dict[int, list[int]]:
    return {int(layer): sel["doc_gids"] for layer, sel in routing["layers"].items()}


def test_interleave_chat_runs_rounds_and_routes_like_the_spec(scripted_server):
    model_dir, tokenizer, url = scripted_server
    reply = requests.post(f"{url}/v1/memories/hops/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 8,
        "msa": {"interleave": True, "routing_details": True},
    }, timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    msa = body["msa"]
    assert body["choices"][0]["message"]["content"] == "Z"
    assert msa["interleave"]["answer"] == "Z" and msa["interleave"]["ended_by"] == "end_of_retrieve"
    rounds = msa["interleave"]["rounds"]
    assert [r["generated"] for r in rounds] == ["[1]", ""]
    assert [r["injected"] for r in rounds] == [[{"doc_id": "d1", "gid": 1}], []]
    assert msa["injected"] == [{"doc_id": "d1", "gid": 1}]

    expected, requests_ = reference_selections(model_dir, tokenizer)
    served = [layers_of(rounds[0]["routing"]), layers_of(rounds[1]["routing"]), layers_of(msa)]
    assert served == expected
    assert expected[1] != expected[0]  # the injected block changed what round 2 selects
    assert body["usage"]["prompt_tokens"] == len(requests_[2][0])
    assert all(len(gids) == 2 for layers in served for gids in layers.values())


def test_interleave_streams_and_runs_from_generate(scripted_server):
    _, _, url = scripted_server
    with requests.post(f"{url}/v1/memories/hops/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 8, "stream": True,
        "msa": {"interleave": True},
    }, stream=True, timeout=120) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Z"
    assert events[-1]["msa"]["interleave"]["answer"] == "Z"
    assert events[-1]["msa"]["injected"] == [{"doc_id": "d1", "gid": 1}]

    generated = requests.post(f"{url}/v1/memories/hops/generate", json={
        "text": QUESTION, "sampling_params": {"max_new_tokens": 8, "temperature": 0},
        "msa": {"interleave": True, "max_rounds": 1},
    }, timeout=120)
    assert generated.status_code == 200, generated.text
    interleave = generated.json()["msa"]["interleave"]
    assert interleave["ended_by"] == "max_rounds" and interleave["rounds"][0]["injected"][0]["gid"] == 1


@pytest.mark.parametrize("msa, param", [
    ({"interleave": True, "inject_documents": 2}, "msa.inject_documents"),
    ({"interleave": True, "routing_text": "sky"}, "msa.routing_text"),
    ({"interleave": True, "max_rounds": 999}, "msa.max_rounds"),
    ({"inject_documents": 2}, "msa.inject_documents"),
])
def test_interleave_refuses_conflicting_options(scripted_server, msa, param):
    _, _, url = scripted_server
    reply = requests.post(f"{url}/v1/memories/hops/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "msa": msa}, timeout=60)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == param
