"""HTTP routes of the memory API, added to SGLang's own FastAPI app (same port).

The operations live in `memory_api.MemoryAPI`; these routes validate input (422 naming the
field), call them, and shape the responses (OpenAI chat completions, streaming included).
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Path
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from sglang_msa.config import load_options
from sglang_msa.server import schemas
from sglang_msa.server.memory_api import APIError, MemoryAPI, chat_sampling_params, finish_reason, with_answer
from sglang_msa.server.prompting import PromptError

router = APIRouter(prefix="/v1/memories", tags=["memories"])
MemoryIdPath = Path(pattern=schemas.MEMORY_ID_PATTERN)
DocIdPath = Path(pattern=schemas.DOC_ID_PATTERN)

_api: MemoryAPI | None = None


def get_api() -> MemoryAPI:
    global _api
    if _api is None:
        from sglang.srt.entrypoints.http_server import get_global_state

        state = get_global_state()
        if state is None:
            raise APIError(503, "the server is still starting")
        _api = MemoryAPI(state.tokenizer_manager, load_options())
    return _api


async def api_error_handler(request, exc: APIError) -> JSONResponse:
    return exc.response()


async def prompt_error_handler(request, exc: PromptError) -> JSONResponse:
    return APIError(422, str(exc), exc.param).response()


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """422 naming the first failing field (`documents[0].text`, `memory_id`, ...)."""
    error = exc.errors()[0]
    location = [part for part in error["loc"] if part not in ("body", "path", "query")]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    return APIError(422, f"{param or 'body'}: {error['msg']}", param or None).response()


def install(app) -> None:
    """Add the memory API to SGLang's FastAPI app (once).

    SGLang answers validation errors with 400; the memory routes answer 422 naming the field.
    """
    if any(getattr(route, "path", "").startswith(router.prefix) for route in app.router.routes):
        return
    app.include_router(router)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(PromptError, prompt_error_handler)
    sglang_handler = app.exception_handlers.get(RequestValidationError)

    async def validation_handler(request, exc: RequestValidationError):
        if request.url.path.startswith(router.prefix) or sglang_handler is None:
            return validation_error_response(exc)
        return await sglang_handler(request, exc)

    app.add_exception_handler(RequestValidationError, validation_handler)


@router.post("", status_code=201)
async def create_memory(body: schemas.CreateMemoryRequest):
    """Create an empty memory."""
    return JSONResponse(status_code=201, content=await get_api().create_memory(body.memory_id))


@router.get("")
async def list_memories():
    return get_api().list_memories()


@router.get("/{memory_id}")
async def get_memory(memory_id: str = MemoryIdPath):
    """Documents, tokens, chunks and bytes held by a memory."""
    return await get_api().memory_info(memory_id)


@router.delete("/{memory_id}")
async def delete_memory(memory_id: str = MemoryIdPath):
    return await get_api().delete_memory(memory_id)


@router.post("/{memory_id}/documents", status_code=201)
async def add_documents(body: schemas.AddDocumentsRequest, memory_id: str = MemoryIdPath):
    """Encode documents into the memory (each one a prefill through SGLang), then acknowledge."""
    status, content = await get_api().add_documents(memory_id, body)
    return JSONResponse(status_code=status, content=content)


@router.get("/{memory_id}/documents/{doc_id}")
async def get_document(memory_id: str = MemoryIdPath, doc_id: str = DocIdPath):
    return get_api().get_document(memory_id, doc_id)


@router.delete("/{memory_id}/documents/{doc_id}")
async def delete_document(memory_id: str = MemoryIdPath, doc_id: str = DocIdPath):
    return await get_api().delete_document(memory_id, doc_id)


@router.post("/{memory_id}/chat/completions")
async def chat_completions(body: schemas.MemoryChatRequest, memory_id: str = MemoryIdPath):
    """OpenAI-compatible chat over a memory (`base_url=<server>/v1/memories/<memory_id>`)."""
    api = get_api()
    created = int(time.time())
    if not body.stream:
        return await api.chat(memory_id, body, created)
    prompt, injection = await api.chat_prompt(memory_id, body)
    rid = f"msa-chat-{uuid.uuid4().hex}"
    outputs = api.generate(
        prompt.input_ids, chat_sampling_params(body), api.query_params(memory_id, prompt), rid, stream=True
    )
    base = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created, "model": body.model}

    def event(delta: dict, finish=None, **extra) -> bytes:
        payload = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(payload)}\n\n".encode()

    async def events():
        yield event({"role": "assistant", "content": ""})
        text, finish = "", None
        try:
            async for out in outputs:
                if len(out["text"]) > len(text):
                    yield event({"content": out["text"][len(text):]})
                    text = out["text"]
                finish = finish_reason(out["meta_info"]) or finish
        except ValueError as exc:
            yield f"data: {json.dumps(APIError(400, str(exc)).body())}\n\n".encode()
        else:
            retrieved = await api.retrieved(memory_id, rid, body.msa.routing_details)
            yield event({}, finish or "stop", msa={**retrieved, **with_answer(injection, text)})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/{memory_id}/generate")
async def generate(body: schemas.MemoryGenerateRequest, memory_id: str = MemoryIdPath):
    """SGLang-native generate over a memory; the response adds the retrieved documents."""
    return await get_api().generate_over_memory(memory_id, body)
