"""HTTP routes of the memory API, added to SGLang's own FastAPI app (same port).

The operations live in `memory_api.MemoryAPI`; these routes validate input (422 naming the
field), call them, and shape the responses (OpenAI chat completions, streaming included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from sglang_msa import metrics
from sglang_msa.config import load_options
from sglang_msa.memory_manager import grants
from sglang_msa.server import schemas
from sglang_msa.server.auth import authenticate_request, caller_is_admin, caller_tenant
from sglang_msa.server.body_limit import BodyLimitMiddleware
from sglang_msa.server.errors import APIError
from sglang_msa.server.memory_api import (
    MemoryAPI,
    chat_sampling_params,
    completed,
    finish_reason,
    refusal,
    with_answer,
)

async def authenticate(request: Request) -> None:
    """With API keys, the caller's tenant (or the admin) for the rest of this request (401
    without a key)."""
    api = await get_api()
    tenant, admin = authenticate_request(request, api.api_keys, api.tokenizer_manager.server_args.admin_api_key)
    caller_tenant.set(tenant)
    caller_is_admin.set(admin)


router = APIRouter(prefix="/v1/memories", tags=["memories"], dependencies=[Depends(authenticate)])
MemoryIdPath = Path(pattern=schemas.MEMORY_ID_PATTERN)
DocIdPath = Path(pattern=schemas.DOC_ID_PATTERN)
JobIdPath = Path(pattern=schemas.JOB_ID_PATTERN)

_api: MemoryAPI | None = None
_api_lock = asyncio.Lock()


async def get_api() -> MemoryAPI:
    """The server's MemoryAPI, created (and reconciled with the scheduler) on first use."""
    global _api
    if _api is not None:
        return _api
    async with _api_lock:
        if _api is None:
            from sglang.srt.entrypoints.http_server import get_global_state

            state = get_global_state()
            if state is None:
                raise APIError(503, "the server is still starting")
            api = MemoryAPI(state.tokenizer_manager, load_options())
            await api.reconcile()
            api.jobs.resume()
            _api = api
    return _api


ApiDependency = Depends(get_api)


async def api_error_handler(request, exc: APIError) -> JSONResponse:
    metrics.observe_refusal(exc.status, exc.param)
    return exc.response()


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """422 naming the first failing field (`documents[0].text`, `memory_id`, ...)."""
    error = exc.errors()[0]
    location = [part for part in error["loc"] if part not in ("body", "path", "query")]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    metrics.observe_refusal(422, param or None)
    return APIError(422, f"{param or 'body'}: {error['msg']}", param or None).response()


async def start_when_ready() -> None:
    """Create the MemoryAPI as soon as SGLang's state exists, so that unfinished ingestion jobs
    resume without waiting for a request."""
    while True:
        try:
            await get_api()
            return
        except APIError:
            await asyncio.sleep(0.5)


def resume_jobs_at_start(app) -> None:
    """With a memory directory, wrap SGLang's lifespan to start the API (and resume jobs) once
    the server runs."""
    sglang_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_):
        async with sglang_lifespan(app_) as state:
            starting = asyncio.create_task(start_when_ready())
            yield state
            starting.cancel()

    app.router.lifespan_context = lifespan


def install(app) -> None:
    """Add the memory API to SGLang's FastAPI app (once).

    SGLang answers validation errors with 400; the memory routes answer 422 naming the field.
    """
    if any(getattr(route, "path", "").startswith(router.prefix) for route in app.router.routes):
        return
    # the routes themselves, not `include_router`: FastAPI 0.165 wraps an included router in an
    # object without a path template, and SGLang's HTTP metrics then label requests with the raw
    # path, which names tenants' memories on the unauthenticated /metrics
    app.router.routes.extend(router.routes)
    if load_options().memory_dir is not None:
        resume_jobs_at_start(app)
    app.add_middleware(BodyLimitMiddleware, limit_bytes=int(load_options().max_request_body_mb * 2**20))
    app.add_exception_handler(APIError, api_error_handler)
    sglang_handler = app.exception_handlers.get(RequestValidationError)

    async def validation_handler(request, exc: RequestValidationError):
        if request.url.path.startswith(router.prefix) or sglang_handler is None:
            return validation_error_response(exc)
        return await sglang_handler(request, exc)

    app.add_exception_handler(RequestValidationError, validation_handler)


@router.post("", status_code=201)
async def create_memory(body: schemas.CreateMemoryRequest, api: MemoryAPI = ApiDependency):
    """Create an empty memory."""
    return JSONResponse(status_code=201, content=await api.create_memory(body.memory_id, body.placement))


@router.get("")
async def list_memories(api: MemoryAPI = ApiDependency):
    return api.list_memories()


@router.get("/-/stats")
async def store_stats(api: MemoryAPI = ApiDependency):
    """Memories, documents, tokens, chunks and bytes the scheduler holds, and its budget."""
    return await api.store_stats()


@router.get("/-/limits")
async def limits(api: MemoryAPI = ApiDependency):
    """What a submission may hold (clients split and batch their documents by these)."""
    options = api.options
    return {"max_document_tokens": options.max_document_tokens,
            "max_documents_per_request": options.max_documents_per_request,
            "max_request_body_bytes": int(options.max_request_body_mb * 2**20)}


@router.get("/{memory_id}")
async def get_memory(memory_id: str = MemoryIdPath, api: MemoryAPI = ApiDependency):
    """Documents, tokens, chunks and bytes held by a memory."""
    return await api.memory_info(memory_id)


@router.delete("/{memory_id}")
async def delete_memory(memory_id: str = MemoryIdPath, api: MemoryAPI = ApiDependency):
    return await api.delete_memory(memory_id)


@router.post("/{memory_id}/documents", status_code=201)
async def add_documents(body: schemas.AddDocumentsRequest, memory_id: str = MemoryIdPath,
                        wait: bool = Query(True), api: MemoryAPI = ApiDependency):
    """Encode documents into the memory (each one a prefill through SGLang), then acknowledge;
    `?wait=false`: 202 with an ingestion job at once (`GET .../jobs/{job_id}` for progress)."""
    if not wait:
        return JSONResponse(status_code=202, content=api.jobs.submit(memory_id, body))
    status, content = await api.add_documents(memory_id, body)
    return JSONResponse(status_code=status, content=content)


@router.get("/{memory_id}/jobs")
async def list_jobs(memory_id: str = MemoryIdPath, api: MemoryAPI = ApiDependency):
    return api.jobs.list_jobs(memory_id)


@router.get("/{memory_id}/jobs/{job_id}")
async def get_job(memory_id: str = MemoryIdPath, job_id: str = JobIdPath, api: MemoryAPI = ApiDependency):
    """Documents and tokens done / total, rate, ETA and per-document failures of a job."""
    return api.jobs.status(memory_id, job_id)


@router.delete("/{memory_id}/jobs/{job_id}")
async def cancel_job(memory_id: str = MemoryIdPath, job_id: str = JobIdPath, api: MemoryAPI = ApiDependency):
    """Cancel the job after the batch under way; documents stored so far stay."""
    return api.jobs.cancel(memory_id, job_id)


@router.get("/{memory_id}/documents")
async def list_documents(memory_id: str = MemoryIdPath, limit: int = Query(100, ge=1, le=10_000),
                         offset: int = Query(0, ge=0, le=2**63 - 1), hashes: bool = Query(False),
                         api: MemoryAPI = ApiDependency):
    """The memory's acknowledged documents (ids and sizes) in insertion order; `?hashes=true`
    adds each text's SHA-256 (`text_sha256`), for clients resuming a load."""
    return api.list_documents(memory_id, limit, offset, hashes)


@router.get("/{memory_id}/documents/{doc_id}")
async def get_document(memory_id: str = MemoryIdPath, doc_id: str = DocIdPath, tokens: bool = Query(False),
                       api: MemoryAPI = ApiDependency):
    """The document's text and sizes; `?tokens=true` adds the token ids it was encoded with."""
    return api.get_document(memory_id, doc_id, tokens)


@router.delete("/{memory_id}/documents/{doc_id}")
async def delete_document(memory_id: str = MemoryIdPath, doc_id: str = DocIdPath, api: MemoryAPI = ApiDependency):
    return await api.delete_document(memory_id, doc_id)


@router.post("/{memory_id}/chat/completions")
async def chat_completions(body: schemas.MemoryChatRequest, memory_id: str = MemoryIdPath, api: MemoryAPI = ApiDependency):
    """OpenAI-compatible chat over a memory (`base_url=<server>/v1/memories/<memory_id>`)."""
    created = int(time.time())
    if not body.stream:
        return await api.chat(memory_id, body, created)
    record = api.require_memory(memory_id)
    explain = api.explain_gids(record, body.msa)
    prompt, injection = await api.chat_prompt(record, body)
    rid = grants.new_rid("chat")
    outputs = api.generate(
        prompt.input_ids, chat_sampling_params(body), api.query_params(record, prompt, rid, explain), rid,
        stream=True,
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
                completed(out)
                if len(out["text"]) > len(text):
                    yield event({"content": out["text"][len(text):]})
                    text = out["text"]
                finish = finish_reason(out["meta_info"]) or finish
        except ValueError as exc:
            yield f"data: {json.dumps(refusal(exc, record).body())}\n\n".encode()
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n".encode()
        else:
            retrieved = await api.retrieved(record, rid, body.msa.routing_details)
            yield event({}, finish or "stop", msa={**retrieved, **with_answer(injection, text)})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/{memory_id}/generate")
async def generate(body: schemas.MemoryGenerateRequest, memory_id: str = MemoryIdPath, api: MemoryAPI = ApiDependency):
    """SGLang-native generate over a memory; the response adds the retrieved documents."""
    return await api.generate_over_memory(memory_id, body)
