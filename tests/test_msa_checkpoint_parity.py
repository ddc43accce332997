"""A tiny MSA-format checkpoint served through HTTP equals the spec's forward, computed
independently (tests/msa_checkpoints.py, float64): per routed layer the selected documents,
the log-probabilities of every prompt position and of the next token, and the greedy tokens.
The reference encodes each document from the token ids the API reports it was stored with."""

from __future__ import annotations

import math

import pytest
import requests
import torch
from transformers import AutoTokenizer

from msa_checkpoints import ReferenceMSAModel, build_tiny_msa_checkpoint
from sglang_msa.models.msa_config import wrap_document
from sglang_msa.server.prompting import build_msa_chat_prompt
from sglang_msa.server_process import default_device, start_server

pytestmark = pytest.mark.server

DOCUMENTS = [  # 7 documents > top_k 2; lengths spanning several 4-token chunks, partial last chunks
    "The grass is green.",
    "One of the special magic numbers for quiet-river is: 7321904.",
    "The sky is blue. The sun is yellow. Here we go.",
    "Memory sparse attention routes each query to the most relevant documents.",
    "The capital of France is Paris.",
    "There and back again.",
    "0123456789 abcdefghijklmnopqrstuvwxyz",
]
QUESTIONS = ["What is the special magic number for quiet-river?", "Which city is the capital of France?",
             "What colour is the sky?"]
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module", params=[("INFONCE_DECOUPLE", 1), ("INFONCE", 1), ("INFONCE_DECOUPLE", 2)],
                ids=["dot", "cosine", "dot-tp2"])
def served_checkpoint(request, tmp_path_factory):
    """The tiny checkpoint served with --tp 1, and with --tp 2 (Memory Parallel: two CPU ranks,
    router projections and router keys split between them) against the same reference."""
    aux_loss_method, tp = request.param
    model_dir = build_tiny_msa_checkpoint(tmp_path_factory.mktemp(f"msa-{aux_loss_method}"), aux_loss_method)
    log = tmp_path_factory.mktemp("logs") / f"msa-{aux_loss_method}-tp{tp}.log"
    args = ["--max-total-tokens", "8192", "--dtype", "float32", "--tp", str(tp)]
    device = default_device(ranks=tp)
    with pytest.MonkeyPatch.context() as env:
        if device == "cpu" and tp > 1:  # one CPU core per rank for SGLang's CPU engine
            env.setenv("SGLANG_CPU_OMP_THREADS_BIND", "|".join(str(rank) for rank in range(tp)))
        server = start_server(model_dir, "msa", extra_args=args, log_path=log, device=device)
    with server:
        url = server.base_url
        requests.post(f"{url}/v1/memories", json={"memory_id": "parity"}, timeout=30).raise_for_status()
        added = requests.post(f"{url}/v1/memories/parity/documents",
                              json={"documents": [{"text": t} for t in DOCUMENTS]}, timeout=120)
        assert added.status_code == 201, added.text
        yield model_dir, url


def test_server_equals_reference_forward(served_checkpoint):
    model_dir, url = served_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = ReferenceMSAModel(model_dir)
    assert reference.options.similarity == ("cosine" if reference.config["msa_config"]["aux_loss_method"] == "INFONCE"
                                            else "dot")
    memory = []
    for gid, text in enumerate(DOCUMENTS):  # the ids each document was stored with, from the API
        stored = requests.get(f"{url}/v1/memories/parity/documents/{gid}", params={"tokens": "true"}, timeout=30)
        ids = stored.json()["token_ids"]
        assert ids == tokenizer(wrap_document(gid, text), add_special_tokens=False).input_ids
        assert stored.json()["num_tokens"] == len(ids)
        memory.append({"num_tokens": len(ids), "layers": reference.encode_document(ids)})
    assert sum(doc["num_tokens"] > 4 for doc in memory) == len(DOCUMENTS)  # every document spans chunks

    for question in QUESTIONS:
        prompt = build_msa_chat_prompt(tokenizer, [{"role": "user", "content": question}], None)
        assert prompt.template_tokens == len(tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids)
        response = requests.post(f"{url}/v1/memories/parity/generate", json={
            "input_ids": prompt.input_ids,
            "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "ignore_eos": True},
            "return_logprob": True, "top_logprobs_num": 5, "logprob_start_len": 0,
            "msa": {"routing_spans": [list(span) for span in prompt.routing_spans], "template_tokens": prompt.template_tokens,
                    "routing_details": True},
        }, timeout=120)
        assert response.status_code == 200, response.text
        served = response.json()

        logits, selections = reference.query(prompt.input_ids, memory, prompt.template_tokens, prompt.routing_spans)
        served_layers = {int(layer): sel["doc_gids"] for layer, sel in served["msa"]["layers"].items()}
        assert served_layers == selections, question
        assert all(len(gids) == 2 for gids in served_layers.values())

        prompt_logprobs = torch.log_softmax(logits[:-1], -1)  # position i predicts token i + 1
        served_prompt = served["meta_info"]["input_token_logprobs"]
        assert [token_id for _, token_id, _ in served_prompt] == prompt.input_ids and served_prompt[0][0] is None
        for i, (served_logprob, token_id, _) in enumerate(served_prompt[1:]):
            assert math.isclose(served_logprob, float(prompt_logprobs[i, token_id]), abs_tol=1e-4), (question, i)

        logprobs = torch.log_softmax(logits[-1], -1)
        first_top = served["meta_info"]["output_top_logprobs"][0]
        for served_logprob, token_id, _ in first_top:
            assert math.isclose(served_logprob, float(logprobs[token_id]), abs_tol=1e-4), question
        assert [token_id for _, token_id, _ in first_top] == logprobs.topk(5).indices.tolist()
        assert served["output_ids"] == reference.greedy(
            prompt.input_ids, memory, prompt.template_tokens, prompt.routing_spans, MAX_NEW_TOKENS
        ), question


def test_chat_endpoint_uses_the_msa_prompt(served_checkpoint):
    model_dir, url = served_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = ReferenceMSAModel(model_dir)
    memory = []
    for gid, text in enumerate(DOCUMENTS):
        ids = tokenizer(wrap_document(gid, text), add_special_tokens=False).input_ids
        memory.append({"num_tokens": len(ids), "layers": reference.encode_document(ids)})
    question = QUESTIONS[0]
    reply = requests.post(f"{url}/v1/memories/parity/chat/completions", json={
        "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 4,
        "msa": {"routing_details": True},
    }, timeout=120).json()
    prompt = build_msa_chat_prompt(tokenizer, [{"role": "user", "content": question}], None)
    _, selections = reference.query(prompt.input_ids, memory, prompt.template_tokens, prompt.routing_spans)
    assert {int(k): v["doc_gids"] for k, v in reply["msa"]["layers"].items()} == selections
    assert reply["usage"]["prompt_tokens"] == len(prompt.input_ids)
