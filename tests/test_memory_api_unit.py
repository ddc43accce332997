"""The memory API's input checks in-process (no server): document sizes refused before or after
tokenizing, generate parameters refused with the field named."""

from __future__ import annotations

import types

import pytest

from sglang_msa.config import MSAOptions
from sglang_msa.memory_manager import grants
from sglang_msa.memory_manager.service import MemoryService
from sglang_msa.server import schemas
from sglang_msa.server.errors import APIError
from sglang_msa.server.memory_api import MemoryAPI
from sglang_msa.server.request_checks import check_input_ids, checked_sampling_params
from tiny_models import build_tokenizer

VOCAB = 512


def memory_api(max_document_tokens: int, context_len: int) -> MemoryAPI:
    tokenizer_manager = types.SimpleNamespace(
        tokenizer=build_tokenizer(VOCAB), context_len=context_len, server_args=types.SimpleNamespace(port=1),
        model_config=types.SimpleNamespace(vocab_size=VOCAB, hf_config=types.SimpleNamespace(model_type="llama")))
    return MemoryAPI(tokenizer_manager, MSAOptions(max_document_tokens=max_document_tokens))


def refusal(call) -> APIError:
    with pytest.raises(APIError) as refused:
        call()
    return refused.value


def documents(*texts: str) -> schemas.AddDocumentsRequest:
    return schemas.AddDocumentsRequest(documents=[{"text": text} for text in texts])


def to_encode(*texts: str) -> list:
    """Documents as `MemoryAPI.tokenize_documents` takes them: (index, document, replaced record)."""
    return [(index, schemas.DocumentIn(text=text), None) for index, text in enumerate(texts)]


def test_documents_longer_than_any_limit_are_413_naming_the_document():
    api = memory_api(max_document_tokens=100, context_len=64)
    body = documents("short text", "x" * (100 * api.max_token_chars + 1))
    untokenized = refusal(lambda: api.check_document_lengths(body))  # cannot fit, whatever the tokenizer does
    assert (untokenized.status, untokenized.param) == (413, "documents[1].text")
    short, over_context = api.tokenize_documents(to_encode("short text", "word " * 15), [0, 1])
    assert isinstance(over_context, APIError), over_context  # refused alone; a job's other documents go on
    assert (over_context.status, over_context.param) == (413, "documents[1].text")
    assert "context length is 64" in over_context.message
    assert len(short) < 64


def test_generate_parameters_are_checked_naming_the_field():
    assert refusal(lambda: check_input_ids([5, VOCAB], VOCAB)).param == "input_ids[1]"
    assert refusal(lambda: check_input_ids([-1], VOCAB)).param == "input_ids[0]"
    check_input_ids([0, VOCAB - 1], VOCAB)
    for params, field in (({"n": 2}, "sampling_params.n"), ({"bogus": 1}, "sampling_params.bogus"),
                          ({"custom_params": 5}, "sampling_params.custom_params"),
                          ({"custom_params": {"msa": {}}}, "sampling_params.custom_params.msa"),
                          ({"regex": "(("}, "sampling_params.regex"), ({"temperature": -1}, "sampling_params")):
        refused = refusal(lambda: checked_sampling_params(params, VOCAB))
        assert (refused.status, refused.param) == (422, field), refused.message
    assert checked_sampling_params({"max_new_tokens": 3, "temperature": 0}, VOCAB) == {"max_new_tokens": 3,
                                                                                      "temperature": 0}


def test_only_a_whole_memory_api_rid_aborts_in_the_reserved_namespace():
    """SGLang aborts every request whose rid starts with the abort's: in the memory API's
    namespace only a whole rid may abort (it matches its own request and no other)."""
    rids = [grants.new_rid(kind) for kind in ("ingest", "chat", "route", "round", "generate")]
    assert all(grants.is_reserved_rid(rid) and MemoryService.may_abort(rid, False) for rid in rids)
    assert not any(a != b and b.startswith(a) for a in rids for b in rids)
    for prefix in ("m", "msa", "msa-", "msa-chat-", rids[1][:-1], "msa-chat-" + "g" * 32):
        assert grants.is_reserved_rid(prefix) and not MemoryService.may_abort(prefix, False), prefix
    assert MemoryService.may_abort("a", False) and MemoryService.may_abort("", True)  # SGLang's own rids, all
