"""Memories for `sglang.Engine` users, in-process (the same operations as the HTTP API).

    engine = sglang.Engine(model_path=..., attention_backend="msa")
    memories = EngineMemories(engine)
    memories.create("notes")
    memories.add_documents("notes", ["The meeting is on Monday."])
    reply = memories.chat("notes", [{"role": "user", "content": "When is the meeting?"}], max_tokens=32)
    reply["choices"][0]["message"]["content"], reply["msa"]["retrieved"]

Plugin options come from the environment variable SGLANG_MSA_CONFIG (set before the Engine
starts). Errors raise `APIError` with the HTTP status the server would answer.
"""

from __future__ import annotations

import time

from sglang_msa.config import load_options
from sglang_msa.server import schemas
from sglang_msa.server.errors import APIError
from sglang_msa.server.memory_api import MemoryAPI


class EngineMemories:
    def __init__(self, engine):
        self._api = MemoryAPI(engine.tokenizer_manager, load_options())
        self._loop = engine.loop
        self._run(self._api.reconcile())

    def _run(self, coroutine):
        return self._loop.run_until_complete(coroutine)

    def create(self, memory_id: str, placement: str = "auto") -> dict:
        body = schemas.CreateMemoryRequest(memory_id=memory_id, placement=placement)
        return self._run(self._api.create_memory(body.memory_id, body.placement))

    def list(self) -> dict:
        return self._api.list_memories()

    def info(self, memory_id: str) -> dict:
        return self._run(self._api.memory_info(memory_id))

    def delete(self, memory_id: str) -> dict:
        return self._run(self._api.delete_memory(memory_id))

    def add_documents(self, memory_id: str, documents: list[str | dict]) -> dict:
        body = schemas.AddDocumentsRequest(documents=[{"text": d} if isinstance(d, str) else d for d in documents])
        status, content = self._run(self._api.add_documents(memory_id, body))
        if status != 201:
            raise APIError(status, content["error"]["message"], "documents")
        return content

    def list_documents(self, memory_id: str, limit: int = 100, offset: int = 0) -> dict:
        return self._api.list_documents(memory_id, limit, offset)

    def get_document(self, memory_id: str, doc_id: str, tokens: bool = False) -> dict:
        return self._api.get_document(memory_id, doc_id, tokens)

    def delete_document(self, memory_id: str, doc_id: str) -> dict:
        return self._run(self._api.delete_document(memory_id, doc_id))

    def chat(self, memory_id: str, messages: list[dict], **request) -> dict:
        """An OpenAI-style chat completion over the memory; `request` takes the same fields."""
        body = schemas.MemoryChatRequest(messages=messages, **request)
        return self._run(self._api.chat(memory_id, body, int(time.time())))

    def generate(self, memory_id: str, text: str | None = None, input_ids: list[int] | None = None,
                 sampling_params: dict | None = None, return_logprob: bool = False, logprob_start_len: int = -1,
                 top_logprobs_num: int = 0, **msa) -> dict:
        """SGLang-native generate over the memory (log-probs as SGLang's /generate); `msa` takes the
        memory options (routing_spans, template_tokens, inject_documents, interleave, ...)."""
        body = schemas.MemoryGenerateRequest(
            text=text, input_ids=input_ids, sampling_params=sampling_params or {}, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num, msa=msa)
        return self._run(self._api.generate_over_memory(memory_id, body))
