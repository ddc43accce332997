"""HTTP routes of the memory API, added to SGLang's own FastAPI app (same port).

Control operations go to the scheduler over ZMQ (`memory_manager.client`); documents and
queries are ordinary SGLang generate requests carrying `custom_params["msa"]`, so the scheduler
batches them with everything else.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Path
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from sglang_msa.config import MSAOptions, load_options
from sglang_msa.memory_manager import protocol
from sglang_msa.memory_manager.client import AsyncControlClient
from sglang_msa.memory_manager.store import MemoryOperationError
from sglang_msa.server import schemas
from sglang_msa.server.metadata import DocumentRecord, MetadataStore
from sglang_msa.server.prompting import PromptError, build_chat_prompt, build_prompt

router = APIRouter(prefix="/v1/memories", tags=["memories"])
MemoryIdPath = Path(pattern=schemas.MEMORY_ID_PATTERN)
DocIdPath = Path(pattern=schemas.DOC_ID_PATTERN)
DEFAULT_MAX_NEW_TOKENS = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        return JSONResponse(
            status_code=self.status,
            content={"error": {"message": self.message, "type": "invalid_request_error" if self.status < 500
                               else "server_error", "param": self.param, "code": self.status}},
        )


class MemoryAPI:
    """State of the memory API in the HTTP server process."""

    def __init__(self, tokenizer_manager, options: MSAOptions):
        self.tokenizer_manager = tokenizer_manager
        self.tokenizer = tokenizer_manager.tokenizer
        self.options = options
        self.metadata = MetadataStore()
        self.control = AsyncControlClient(tokenizer_manager.server_args.port)

    async def control_request(self, message) -> dict:
        try:
            return await self.control.request(message)
        except MemoryOperationError as exc:
            raise APIError(exc.status, str(exc)) from exc

    def require_memory(self, memory_id: str) -> None:
        if not self.metadata.memory_exists(memory_id):
            raise APIError(404, f"memory {memory_id!r} does not exist", "memory_id")

    def generate(self, input_ids: list[int], sampling_params: dict, msa: dict, rid: str, stream: bool = False):
        from sglang.srt.managers.io_struct import GenerateReqInput

        params = dict(sampling_params)
        params["custom_params"] = {**(params.get("custom_params") or {}), "msa": msa}
        request = GenerateReqInput(input_ids=input_ids, sampling_params=params, rid=rid, stream=stream)
        return self.tokenizer_manager.generate_request(request, None)

    async def retrieved(self, memory_id: str, rid: str, details: bool) -> dict:
        report = await self.control_request(protocol.TakeReport(rid=rid))
        records = self.metadata.documents_by_gid(memory_id, report["ranked_gids"])
        result = {
            "memory_id": memory_id,
            "retrieved": [
                {"doc_id": records[gid].doc_id, "gid": gid} for gid in report["ranked_gids"] if gid in records
            ],
        }
        if details:
            result["layers"] = report["layers"]
        return result


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


# ---------------------------------------------------------------------------------- memories
@router.post("", status_code=201)
async def create_memory(body: schemas.CreateMemoryRequest):
    """Create an empty memory."""
    api = get_api()
    if not api.metadata.create_memory(body.memory_id):
        raise APIError(409, f"memory {body.memory_id!r} already exists", "memory_id")
    try:
        await api.control_request(protocol.CreateMemory(memory_id=body.memory_id))
    except APIError:
        api.metadata.delete_memory(body.memory_id)
        raise
    return JSONResponse(status_code=201, content={"memory_id": body.memory_id, "created": True})


@router.get("")
async def list_memories():
    return {"memories": get_api().metadata.list_memories()}


@router.get("/{memory_id}")
async def get_memory(memory_id: str = MemoryIdPath):
    """Documents, tokens, chunks and bytes held by a memory."""
    api = get_api()
    api.require_memory(memory_id)
    stats = await api.control_request(protocol.MemoryStats(memory_id=memory_id))
    return {
        "memory_id": memory_id,
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "chunks": stats["chunks"],
        "bytes": {"device": stats["bytes"], "host": 0},
    }


@router.delete("/{memory_id}")
async def delete_memory(memory_id: str = MemoryIdPath):
    api = get_api()
    api.require_memory(memory_id)
    await api.control_request(protocol.DropMemory(memory_id=memory_id))
    api.metadata.delete_memory(memory_id)
    return {"memory_id": memory_id, "deleted": True}


# ---------------------------------------------------------------------------------- documents
@router.post("/{memory_id}/documents", status_code=201)
async def add_documents(body: schemas.AddDocumentsRequest, memory_id: str = MemoryIdPath):
    """Encode documents into the memory (each one a prefill through SGLang), then acknowledge."""
    api = get_api()
    api.require_memory(memory_id)
    options = api.options
    if len(body.documents) > options.max_documents_per_request:
        raise APIError(413, f"{len(body.documents)} documents in one request; the limit is "
                       f"{options.max_documents_per_request}", "documents")
    token_ids = []
    for index, doc in enumerate(body.documents):
        ids = api.tokenizer(doc.text, add_special_tokens=False).input_ids
        if not ids:
            raise APIError(422, "the document has no tokens", f"documents[{index}].text")
        if len(ids) > options.max_document_tokens:
            raise APIError(413, f"the document has {len(ids)} tokens; max_document_tokens is "
                           f"{options.max_document_tokens}", f"documents[{index}].text")
        token_ids.append(ids)
    gids = api.metadata.reserve_gids(memory_id, len(body.documents))
    doc_ids = [doc.doc_id or str(gid) for doc, gid in zip(body.documents, gids)]
    if len(set(doc_ids)) != len(doc_ids):
        raise APIError(409, "duplicate doc_id in the request", "documents")
    taken = api.metadata.existing_doc_ids(memory_id, doc_ids)
    if taken:
        raise APIError(409, f"doc_id {taken[0]!r} already exists in memory {memory_id!r}", "documents")

    async def ingest(gid: int, ids: list[int]) -> dict:
        rid = f"msa-ingest-{uuid.uuid4().hex}"
        msa = {"op": "ingest", "memory_id": memory_id, "gid": gid}
        try:
            await (api.generate(ids, {"max_new_tokens": 1, "temperature": 0}, msa, rid)).__anext__()
        except ValueError as exc:  # the scheduler refused the request
            return {"committed": False, "error": str(exc)}
        return await api.control_request(protocol.TakeReport(rid=rid))

    reports = await asyncio.gather(*(ingest(gid, ids) for gid, ids in zip(gids, token_ids)))
    stored, failures = [], []
    for index, (doc, gid, doc_id, ids, report) in enumerate(zip(body.documents, gids, doc_ids, token_ids, reports)):
        if report.get("committed"):
            if api.metadata.add_document(DocumentRecord(memory_id, gid, doc_id, doc.text, len(ids))):
                stored.append(schemas.DocumentOut(doc_id=doc_id, gid=gid, num_tokens=len(ids)))
                continue
            await api.control_request(protocol.RemoveDocument(memory_id=memory_id, gid=gid))
            report = {"error": f"memory {memory_id!r} was deleted or doc_id {doc_id!r} was taken meanwhile"}
        failures.append({"index": index, "param": f"documents[{index}]", "error": report.get("error")})
    content = schemas.AddDocumentsResponse(memory_id=memory_id, documents=stored).model_dump()
    if failures:
        status = 507 if any("budget" in (f["error"] or "") for f in failures) else 409
        content["error"] = {"message": f"{len(failures)} of {len(body.documents)} documents were not stored",
                            "failures": failures, "code": status}
        return JSONResponse(status_code=status, content=content)
    return JSONResponse(status_code=201, content=content)


@router.get("/{memory_id}/documents/{doc_id}")
async def get_document(memory_id: str = MemoryIdPath, doc_id: str = DocIdPath):
    api = get_api()
    api.require_memory(memory_id)
    record = api.metadata.get_document(memory_id, doc_id)
    if record is None:
        raise APIError(404, f"document {doc_id!r} does not exist in memory {memory_id!r}", "doc_id")
    return {"doc_id": record.doc_id, "gid": record.gid, "text": record.text, "num_tokens": record.num_tokens}


@router.delete("/{memory_id}/documents/{doc_id}")
async def delete_document(memory_id: str = MemoryIdPath, doc_id: str = DocIdPath):
    api = get_api()
    api.require_memory(memory_id)
    record = api.metadata.get_document(memory_id, doc_id)
    if record is None:
        raise APIError(404, f"document {doc_id!r} does not exist in memory {memory_id!r}", "doc_id")
    await api.control_request(protocol.RemoveDocument(memory_id=memory_id, gid=record.gid))
    api.metadata.delete_document(memory_id, doc_id)
    return {"doc_id": doc_id, "deleted": True}


# ---------------------------------------------------------------------------------- queries
def _sampling_params(body: schemas.MemoryChatRequest) -> dict:
    params = {
        "max_new_tokens": body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_NEW_TOKENS,
        "temperature": body.temperature,
        "top_p": body.top_p,
    }
    if body.stop is not None:
        params["stop"] = body.stop
    if body.seed is not None:
        params["sampling_seed"] = body.seed
    return params


def _finish_reason(meta_info: dict) -> str | None:
    reason = meta_info.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    return "length" if kind == "length" else "stop"


@router.post("/{memory_id}/chat/completions")
async def chat_completions(body: schemas.MemoryChatRequest, memory_id: str = MemoryIdPath):
    """OpenAI-compatible chat over a memory (`base_url=<server>/v1/memories/<memory_id>`)."""
    api = get_api()
    api.require_memory(memory_id)
    messages = [message.model_dump(include={"role", "content"}) for message in body.messages]
    prompt = build_chat_prompt(api.tokenizer, messages, body.msa.routing_text)
    rid = f"msa-chat-{uuid.uuid4().hex}"
    msa = {"op": "query", "memory_id": memory_id, "routing_span": list(prompt.routing_span)}
    outputs = api.generate(prompt.input_ids, _sampling_params(body), msa, rid, stream=body.stream)
    created = int(time.time())
    base = {"id": f"chatcmpl-{rid}", "created": created, "model": body.model}

    if not body.stream:
        try:
            out = await outputs.__anext__()
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        meta = out["meta_info"]
        return {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": _finish_reason(meta)}],
            "usage": {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
                      "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"]},
            "msa": await api.retrieved(memory_id, rid, body.msa.routing_details),
        }

    async def events():
        def chunk(delta: dict, finish_reason=None, **extra) -> bytes:
            payload = {**base, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(payload)}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        sent = 0
        finish = None
        try:
            async for out in outputs:
                text = out["text"]
                if len(text) > sent:
                    yield chunk({"content": text[sent:]})
                    sent = len(text)
                finish = _finish_reason(out["meta_info"]) or finish
        except ValueError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'code': 400}})}\n\n".encode()
            yield b"data: [DONE]\n\n"
            return
        yield chunk({}, finish or "stop", msa=await api.retrieved(memory_id, rid, body.msa.routing_details))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/{memory_id}/generate")
async def generate(body: schemas.MemoryGenerateRequest, memory_id: str = MemoryIdPath):
    """SGLang-native generate over a memory; the response adds the retrieved documents."""
    api = get_api()
    api.require_memory(memory_id)
    if (body.text is None) == (body.input_ids is None):
        raise APIError(422, "give exactly one of text and input_ids", "text")
    if body.text is not None:
        prompt = build_prompt(api.tokenizer, body.text, body.msa.routing_text or body.text, "msa.routing_text")
        input_ids, span = prompt.input_ids, prompt.routing_span
    else:
        if body.msa.routing_text is not None:
            raise APIError(422, "routing_text needs a text prompt", "msa.routing_text")
        input_ids, span = body.input_ids, (0, len(body.input_ids))
    rid = f"msa-generate-{uuid.uuid4().hex}"
    msa = {"op": "query", "memory_id": memory_id, "routing_span": list(span)}
    try:
        out = await (api.generate(input_ids, body.sampling_params, msa, rid)).__anext__()
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    return {**out, "msa": await api.retrieved(memory_id, rid, body.msa.routing_details)}
