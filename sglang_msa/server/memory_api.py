"""The memory API's operations, shared by the HTTP routes and the Python API for Engine users.

Control operations go to the scheduler over ZMQ (`memory_manager.client`); documents and
queries are ordinary SGLang generate requests carrying `custom_params["msa"]`, so the scheduler
batches them with everything else.

A caller names a memory within its tenant's namespace; the API resolves the name to the
memory's current incarnation (`metadata.MemoryRecord`) once per operation and from then on
speaks to the scheduler about that incarnation's key alone, each request with a grant bound to
its rid. Whatever is not the caller's answers exactly like what does not exist (404).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sglang_msa import metrics
from sglang_msa.config import MSAOptions
from sglang_msa.memory_manager import grants, protocol
from sglang_msa.memory_manager.client import AsyncControlClient
from sglang_msa.memory_manager.requests import QueryParams
from sglang_msa.memory_manager.store import MemoryOperationError
from sglang_msa.server import schemas
from sglang_msa.server.auth import caller_is_admin, caller_tenant, load_api_keys
from sglang_msa.server.errors import APIError
from sglang_msa.server.jobs import IngestionJobs
from sglang_msa.server.interleave import (
    ROUND_SAMPLING_PARAMS,
    InterleaveLimits,
    InterleavePrompts,
    RoundOutput,
    extract_answer,
    run_interleave,
)
from sglang_msa.server.metadata import NO_TENANT, DocumentRecord, MemoryRecord, MetadataStore
from sglang_msa.models.msa_config import MSA_MODEL_TYPE
from sglang_msa.server.request_checks import check_input_ids, checked_sampling_params
from sglang_msa.server.prompting import (
    MemoryPrompt,
    build_chat_prompt,
    build_msa_chat_prompt,
    build_prompt,
    document_token_ids,
    injected_question,
    last_user_turn,
)

DEFAULT_MAX_NEW_TOKENS = 256
METADATA_FILE = "metadata.sqlite3"  # beside the scheduler's tensors/ in the memory directory
logger = logging.getLogger(__name__)


def chat_sampling_params(body: schemas.MemoryChatRequest) -> dict:
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


def finish_reason(meta_info: dict) -> str | None:
    reason = meta_info.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    return "length" if kind == "length" else "stop"


def completed(out: dict) -> dict:
    """A generate output, or 503 when SGLang aborted the request (its client went away, or the
    admin aborted it): an aborted output has no usage to report."""
    reason = out["meta_info"].get("finish_reason")
    if isinstance(reason, dict) and reason.get("type") == "abort":
        raise APIError(503, f"the request was aborted: {reason.get('message') or 'no reason given'}")
    return out


def refusal(exc: ValueError, record: MemoryRecord) -> APIError:
    """The scheduler's refusal of a memory request, as the caller should read it: 404 when its
    memory was deleted meanwhile, 400 otherwise, naming the memory by its id, not its key."""
    message = str(exc).replace(record.memory_key, record.memory_id)
    if "does not exist" in message:
        return APIError(404, f"memory {record.memory_id!r} does not exist (deleted meanwhile)", "memory_id")
    return APIError(400, message)


def metadata_path(options: MSAOptions) -> str | Path:
    if options.memory_dir is None:
        return ":memory:"
    Path(options.memory_dir).mkdir(parents=True, exist_ok=True)
    return Path(options.memory_dir) / METADATA_FILE


STATS_TOTALS = ("documents", "tokens", "chunks", "bytes", "device_bytes", "host_bytes")


def per_tenant(per_memory: dict[str, dict], records: dict[str, MemoryRecord]) -> dict[str, dict]:
    """Memories and the totals of their statistics, per owning tenant."""
    tenants: dict[str, dict] = {}
    for memory_key, stats in per_memory.items():
        if memory_key in records:
            held = tenants.setdefault(records[memory_key].owner, dict.fromkeys(("memories", *STATS_TOTALS), 0))
            held["memories"] += 1
            for key in STATS_TOTALS:
                held[key] += stats[key]
    return tenants


def conflict_message(doc_id: str, memory_id: str) -> str:
    return (f"doc_id {doc_id!r} already exists in memory {memory_id!r} with another text; "
            "send replace: true to replace it")


def raise_first_error(token_ids: list) -> None:
    for ids in token_ids:
        if isinstance(ids, APIError):
            raise ids


async def refused_report(error: APIError) -> dict:
    """The ingestion report of a document refused before it reached SGLang."""
    return {"stored": False, "status": error.status, "error": error.message}


@dataclass(frozen=True)
class StoreResult:
    """What became of one submitted document: `stored`, `replaced`, `existing` (its doc_id was
    stored with the same text) or `failed` (HTTP status and message)."""

    state: str
    doc_id: str | None = None
    gid: int | None = None
    num_tokens: int = 0
    status: int | None = None
    error: str | None = None

    @classmethod
    def of(cls, record: DocumentRecord, state: str) -> "StoreResult":
        return cls(state, record.doc_id, record.gid, record.num_tokens)

    @classmethod
    def failure(cls, status: int, error: str | None) -> "StoreResult":
        return cls("failed", status=status, error=error)

    def out(self) -> schemas.DocumentOut:
        return schemas.DocumentOut(doc_id=self.doc_id, gid=self.gid, num_tokens=self.num_tokens,
                                   existing=self.state == "existing", replaced=self.state == "replaced")


def with_answer(injection: dict, text: str) -> dict:
    """The injection report; after Memory Interleave it adds the answer the model wrote after
    "The answer to the question is:" (spec §10)."""
    if "interleave" not in injection:
        return injection
    return {**injection, "interleave": {**injection["interleave"], "answer": extract_answer(text)}}


class MemoryAPI:
    """Memory operations over a running SGLang TokenizerManager (server or Engine process)."""

    def __init__(self, tokenizer_manager, options: MSAOptions):
        self.tokenizer_manager = tokenizer_manager
        self.tokenizer = tokenizer_manager.tokenizer
        self.vocab_size = tokenizer_manager.model_config.vocab_size
        self.options = options
        self.metadata = MetadataStore(metadata_path(options))
        self.control = AsyncControlClient(tokenizer_manager.server_args.port)
        hf_config = tokenizer_manager.model_config.hf_config
        self.is_msa_checkpoint = getattr(hf_config, "model_type", None) == MSA_MODEL_TYPE
        self.interleave_prompts = InterleavePrompts(self.tokenizer) if self.is_msa_checkpoint else None
        self.api_keys = load_api_keys(options.api_keys_file) if options.api_keys_file else None
        self.jobs = IngestionJobs(self)
        # a token covers at most this many characters: longer documents are refused untokenized
        self.max_token_chars = max(len(token) for token in self.tokenizer.get_vocab())

    @property
    def keys_enabled(self) -> bool:
        return self.api_keys is not None

    async def reconcile(self) -> None:
        """Make the metadata and the scheduler's memories agree (start-up, before any request).

        With a memory directory, a crash can leave tensors of a document whose acknowledgement
        never happened (written, not yet recorded) or a record whose deletion was under way
        (forgotten, tensors not yet removed). A document counts when both halves exist; the rest
        is removed, so nothing unacknowledged appears and nothing deleted comes back.
        """
        held = (await self.control_request(protocol.ListContents()))["memories"]
        recorded, records = self.metadata.contents(), self.metadata.memories()
        dropped = removed = forgotten = 0
        for memory_key in held.keys() - recorded.keys():
            await self.control_request(protocol.DropMemory(memory_key=memory_key))
            dropped += 1
        for memory_key, gids in recorded.items():
            if memory_key not in held:
                record = records[memory_key]
                await self.control_request(protocol.CreateMemory(
                    memory_key=memory_key, memory_id=record.memory_id, owner=record.owner or None))
            tensors = set(held.get(memory_key, []))
            for gid in sorted(tensors - gids):
                await self.control_request(protocol.RemoveDocument(memory_key=memory_key, gid=gid))
                removed += 1
            if gids - tensors:
                self.metadata.forget_documents(memory_key, sorted(gids - tensors))
                forgotten += len(gids - tensors)
        if dropped or removed or forgotten:
            logger.warning("sglang-msa: reconciled memories after a restart: %d unrecorded memories dropped, "
                           "%d unacknowledged documents removed, %d records without tensors forgotten",
                           dropped, removed, forgotten)

    async def control_request(self, message) -> dict:
        try:
            return await self.control.request(message)
        except MemoryOperationError as exc:
            raise APIError(exc.status, str(exc)) from exc

    def namespace(self) -> str:
        """The caller's namespace of memory ids: its tenant ("" without API keys)."""
        if not self.keys_enabled:
            return NO_TENANT
        tenant = caller_tenant.get()
        if tenant is None:
            raise APIError(403, "the admin key reads server statistics only; memories belong to tenants' keys",
                           "authorization")
        return tenant

    def require_memory(self, memory_id: str) -> MemoryRecord:
        """The caller's memory named `memory_id`; 404 otherwise, whether it is another tenant's
        or nobody's."""
        record = self.metadata.find_memory(self.namespace(), memory_id)
        if record is None:
            raise APIError(404, f"memory {memory_id!r} does not exist", "memory_id")
        return record

    def memory_params(self, record: MemoryRecord, rid: str) -> dict:
        """What a request names the memory by in `custom_params["msa"]`: the incarnation and the
        grant for this request (checked by the scheduler)."""
        return {"memory_key": record.memory_key, "grant": grants.grant(record.owner or None, record.memory_key, rid)}

    def generate(self, input_ids: list[int], sampling_params: dict, msa: dict, rid: str, stream: bool = False,
                 **request_fields):
        """SGLang's async generator of outputs for one request carrying custom_params["msa"]."""
        from sglang.srt.managers.io_struct import GenerateReqInput

        params = dict(sampling_params)
        params["custom_params"] = {**(params.get("custom_params") or {}), "msa": msa}
        request = GenerateReqInput(input_ids=input_ids, sampling_params=params, rid=rid, stream=stream,
                                   **request_fields)
        return self.tokenizer_manager.generate_request(request, None)

    def explain_gids(self, record: MemoryRecord, options: schemas.MemoryOptions) -> list[int]:
        """The gids of `options.explain_doc_ids` in this memory (422 naming the first unknown)."""
        if options.explain_doc_ids and (self.tokenizer_manager.server_args.tp_size or 1) > 1:
            raise APIError(422, "explain_doc_ids needs a single-rank server: under Memory Parallel each rank scores "
                           "only its shard of the documents", "msa.explain_doc_ids")
        found = self.metadata.documents_by_doc_id(record.memory_key, options.explain_doc_ids)
        for doc_id in options.explain_doc_ids:
            if doc_id not in found:
                raise APIError(422, f"document {doc_id!r} is not in memory {record.memory_id!r}",
                               "msa.explain_doc_ids")
        return [found[doc_id].gid for doc_id in options.explain_doc_ids]

    async def retrieved(self, record: MemoryRecord, rid: str, details: bool) -> dict:
        """The finished query's documents: ranked union over layers, per layer on request, and
        the explained documents' ranks per layer."""
        report = await self.control_request(protocol.TakeReport(rid=rid))
        records = self.metadata.documents_by_gid(record.memory_key, report["retrieved_gids"])
        result = {
            "memory_id": record.memory_id,
            # who chose the documents: MSA routing, or an external router (never presented as MSA routing)
            "router": f"external:{self.options.external_router}" if self.options.external_router else "msa",
            "retrieved": [
                {"doc_id": records[gid].doc_id, "gid": gid} for gid in report["retrieved_gids"] if gid in records
            ],
        }
        if details:
            result["layers"] = report["layers"]
        if report.get("explain"):
            explained = self.metadata.documents_by_gid(record.memory_key, [int(g) for g in report["explain"]])
            result["explain"] = {explained[int(gid)].doc_id: layers for gid, layers in report["explain"].items()
                                 if int(gid) in explained}
        metrics.observe_selected(len(report["retrieved_gids"]))
        return result

    # ------------------------------------------------------------------------------ memories
    async def create_memory(self, memory_id: str, placement: str = "auto") -> dict:
        record = self.metadata.create_memory(self.namespace(), memory_id)
        if record is None:
            raise APIError(409, f"memory {memory_id!r} already exists", "memory_id")
        try:
            await self.control_request(protocol.CreateMemory(
                memory_key=record.memory_key, memory_id=memory_id, owner=record.owner or None, placement=placement))
        except APIError as exc:
            self.metadata.delete_memory(record.memory_key)
            if exc.status == 422:
                raise APIError(422, exc.message, "placement") from exc
            raise
        return {"memory_id": memory_id, "created": True, "placement": placement}

    def list_memories(self) -> dict:
        """The caller's memories."""
        return {"memories": self.metadata.list_memories(self.namespace())}

    async def store_stats(self) -> dict:
        """What the scheduler holds: a tenant's totals over its own memories; without API keys, or
        with the admin key, over every memory, with the server's budgets and free slots."""
        reply = await self.control_request(protocol.StoreStats())
        per_memory = reply["memories"]
        server_wide = not self.keys_enabled or caller_is_admin.get()
        if not server_wide:
            tenant = self.namespace()
            own = {key for key, record in self.metadata.memories().items() if record.owner == tenant}
            per_memory = {memory_key: stats for memory_key, stats in per_memory.items() if memory_key in own}
        totals = {key: sum(stats[key] for stats in per_memory.values()) for key in STATS_TOTALS}
        if not server_wide:
            return {"memories": len(per_memory), **totals}
        capacity = {key: reply[key] for key in ("budget_bytes", "host_budget_bytes", "chunk_slots") if key in reply}
        stats = {"memories": len(per_memory), **totals, **capacity, "requests_in_flight": reply["requests"],
                 "request_selection_bytes": reply["request_selection_bytes"]}
        if self.keys_enabled:  # the admin key: per tenant too (never on the unauthenticated /metrics)
            stats["tenants"] = per_tenant(per_memory, self.metadata.memories())
        return stats

    async def memory_info(self, memory_id: str) -> dict:
        record = self.require_memory(memory_id)
        stats = await self.control_request(protocol.MemoryStats(memory_key=record.memory_key))
        info = {
            "memory_id": memory_id,
            "documents": stats["documents"],
            "tokens": stats["tokens"],
            "chunks": stats["chunks"],
            "placement": stats["placement"],
            "bytes": {"device": stats["device_bytes"], "host": stats["host_bytes"]},
        }
        if "routed_documents_per_rank" in stats:  # Memory Parallel: whose router keys each TP rank holds
            info["routed_documents_per_rank"] = stats["routed_documents_per_rank"]
        return info

    async def delete_memory(self, memory_id: str) -> dict:
        """Forget the record first, then the tensors: a crash in between leaves tensors that the
        next start-up removes, never a deleted memory that comes back."""
        record = self.require_memory(memory_id)
        if not self.metadata.delete_memory(record.memory_key):
            raise APIError(404, f"memory {memory_id!r} does not exist", "memory_id")
        await self.control_request(protocol.DropMemory(memory_key=record.memory_key))
        return {"memory_id": memory_id, "deleted": True}

    # ------------------------------------------------------------------------------ documents
    def check_documents(self, memory_id: str, body: schemas.AddDocumentsRequest) -> MemoryRecord:
        """The checks of a document submission, synchronous or a job, before anything is encoded:
        the caller's memory, the count, duplicate doc_ids, lengths, and 409 naming the field for
        a doc_id stored with another text (unless `replace`). The memory's record."""
        record = self.require_memory(memory_id)
        if len(body.documents) > self.options.max_documents_per_request:
            raise APIError(413, f"{len(body.documents)} documents in one request; the limit is "
                           f"{self.options.max_documents_per_request}", "documents")
        explicit = [doc.doc_id for doc in body.documents if doc.doc_id is not None]
        if len(set(explicit)) != len(explicit):
            raise APIError(409, "duplicate doc_id in the request", "documents")
        self.check_document_lengths(body)
        if not body.replace:
            stored = self.metadata.documents_by_doc_id(record.memory_key, explicit)
            for index, doc in enumerate(body.documents):
                if doc.doc_id in stored and stored[doc.doc_id].text != doc.text:
                    raise APIError(409, conflict_message(doc.doc_id, memory_id), f"documents[{index}].doc_id")
        return record

    async def add_documents(self, memory_id: str, body: schemas.AddDocumentsRequest) -> tuple[int, dict]:
        """Encode documents into the memory, synchronously. Returns (status, body): 201 when every
        document is stored (a doc_id already stored with the same text counts, `existing`), else
        the failures' status with the stored ones and the failures."""
        record = self.check_documents(memory_id, body)
        results = await self.store_documents(record, body.documents, body.replace, strict=True)
        stored = [result.out() for result in results if result.state != "failed"]
        failures = [{"index": index, "param": f"documents[{index}]", "error": result.error, "status": result.status}
                    for index, result in enumerate(results) if result.state == "failed"]
        content = schemas.AddDocumentsResponse(memory_id=memory_id, documents=stored).model_dump()
        if not failures:
            return 201, content
        status = max(failure["status"] for failure in failures)
        content["error"] = {"message": f"{len(failures)} of {len(body.documents)} documents were not stored",
                            "failures": failures, "code": status}
        return status, content

    async def store_documents(self, record: MemoryRecord, documents: list[schemas.DocumentIn], replace: bool,
                              strict: bool) -> list[StoreResult]:
        """Store documents in the memory incarnation `record` (each one a prefill through SGLang);
        one result per document, in order.

        A doc_id already stored with the same text is `existing` (not encoded again); with
        another text it fails with 409, or with `replace` the new text is stored under a new
        gid and swapped in for the old one in one transaction. Each document is staged by the
        scheduler (stored, durable, invisible to routing), then recorded here (the
        acknowledgement), then published to routing. A document whose ingestion failed, was
        aborted, or whose memory was deleted meanwhile is discarded and its gid retired, so it
        can never appear; in particular never in a memory created since under the same name.
        `strict`: a document that cannot be tokenized within the limits raises (4xx naming it)
        instead of failing alone.
        """
        key = record.memory_key
        stored = self.metadata.documents_by_doc_id(key, [doc.doc_id for doc in documents if doc.doc_id])
        results: list[StoreResult | None] = [None] * len(documents)
        todo = []
        for index, doc in enumerate(documents):
            old = stored.get(doc.doc_id) if doc.doc_id else None
            if old is not None and old.text == doc.text:
                results[index] = StoreResult.of(old, "existing")
            elif old is not None and not replace:
                results[index] = StoreResult.failure(409, conflict_message(doc.doc_id, record.memory_id))
            else:
                todo.append((index, doc, old))
        if todo:
            await self._encode_and_record(record, todo, results, strict)
        return results

    async def _encode_and_record(self, record: MemoryRecord, todo: list, results: list, strict: bool) -> None:
        """Tokenize, ingest, acknowledge and publish the documents in `todo` ((index, doc, the
        record it replaces or None)); fills their `results`."""
        key = record.memory_key
        # tokenize on the ids the documents will most likely get, then take the ids for real;
        # tokenize again only if a concurrent request took those ids first
        try:
            next_gid = self.metadata.next_gid(key)
            prospective = list(range(next_gid, next_gid + len(todo)))
            token_ids = await asyncio.to_thread(self.tokenize_documents, todo, prospective)
            if strict:
                raise_first_error(token_ids)
            gids = self.metadata.reserve_gids(key, len(todo))
        except KeyError:
            raise APIError(404, f"memory {record.memory_id!r} does not exist", "memory_id") from None
        if gids != prospective:
            token_ids = await asyncio.to_thread(self.tokenize_documents, todo, gids)
        started = time.monotonic()
        published: list[int] = []
        try:
            reports = await asyncio.gather(*(
                self.ingest(record, gid, ids) if isinstance(ids, list) else refused_report(ids)
                for gid, ids in zip(gids, token_ids)))
            replaced = []
            for (index, doc, old), gid, ids, report in zip(todo, gids, token_ids, reports):
                doc_id = doc.doc_id or str(gid)
                if report.get("stored"):
                    new = DocumentRecord(key, gid, doc_id, doc.text, len(ids))
                    if self.metadata.replace_document(old.gid, new) if old else self.metadata.add_document(new):
                        results[index] = StoreResult.of(new, "replaced" if old else "stored")
                        replaced += [old.gid] if old else []
                        continue
                    now = self.metadata.get_document(key, doc_id)
                    if now is not None and now.text == doc.text:  # a concurrent submission stored it
                        results[index] = StoreResult.of(now, "existing")
                        continue
                    report = {"status": 404, "error": f"memory {record.memory_id!r} was deleted or doc_id {doc_id!r} "
                                                      "was taken meanwhile"}
                results[index] = StoreResult.failure(report.get("status", 409), report.get("error"))
            fresh = [results[index].gid for index, _, _ in todo if results[index].state in ("stored", "replaced")]
            if fresh:
                published = (await self.control_request(protocol.PublishDocuments(memory_key=key, gids=fresh)))[
                    "published"]
                tokens = {results[index].gid: results[index].num_tokens for index, _, _ in todo}
                metrics.observe_ingestion(len(published), sum(tokens[gid] for gid in published),
                                          time.monotonic() - started)
            for gid in replaced:  # the record is gone already; now its tensors
                await self.control_request(protocol.RemoveDocument(memory_key=key, gid=gid))
        finally:  # whatever was not published goes, also when this handler is cancelled
            unpublished = sorted(set(gids) - set(published))
            if unpublished:
                await asyncio.shield(self.control_request(protocol.DiscardDocuments(memory_key=key, gids=unpublished)))

    async def ingest(self, record: MemoryRecord, gid: int, token_ids: list[int]) -> dict:
        """One document through SGLang; the scheduler's report ({"stored": ..., "error": ...}),
        with the HTTP status of a failure."""
        rid = grants.new_rid("ingest")
        msa = {"op": "ingest", "gid": gid, **self.memory_params(record, rid)}
        try:
            completed(await self.generate(token_ids, {"max_new_tokens": 1, "temperature": 0}, msa, rid).__anext__())
        except ValueError as exc:  # the scheduler refused the request
            refused = refusal(exc, record)
            return {"stored": False, "status": 409 if refused.status == 400 else refused.status,
                    "error": refused.message}
        except APIError as exc:  # aborted
            return {"stored": False, "status": exc.status, "error": exc.message}
        try:
            report = await self.control_request(protocol.TakeReport(rid=rid))
        except APIError:  # its state left with an abort
            return {"stored": False, "status": 503, "error": "the ingestion was aborted"}
        if report["stored"]:
            return report
        error = (report["error"] or "").replace(record.memory_key, record.memory_id)
        return {**report, "error": error, "status": report["error_status"] or 409}

    def check_document_lengths(self, body: schemas.AddDocumentsRequest) -> None:
        """413 for a document that must have more tokens than max_document_tokens, untokenized."""
        limit = self.options.max_document_tokens
        for index, doc in enumerate(body.documents):
            if len(doc.text) > limit * self.max_token_chars:
                raise APIError(413, f"the document has {len(doc.text)} characters, more than max_document_tokens "
                               f"({limit}) tokens can hold", f"documents[{index}].text")

    def tokenize_documents(self, todo: list, gids) -> list[list[int] | APIError]:
        """Token ids of each document as the model encodes it (MSA checkpoints: wrapped with its
        id), or the 4xx refusing it (naming `documents[index].text`)."""
        token_ids = []
        for (index, doc, _), gid in zip(todo, gids):
            ids = document_token_ids(self.tokenizer, gid, doc.text, self.is_msa_checkpoint)
            field = f"documents[{index}].text"
            if not ids:
                ids = APIError(422, "the document has no tokens", field)
            elif len(ids) > self.options.max_document_tokens:
                ids = APIError(413, f"the document has {len(ids)} tokens; max_document_tokens is "
                               f"{self.options.max_document_tokens}", field)
            elif len(ids) >= self.tokenizer_manager.context_len:  # its prefill must fit, with one token to generate
                ids = APIError(413, f"the document has {len(ids)} tokens; the model's context length is "
                               f"{self.tokenizer_manager.context_len}", field)
            token_ids.append(ids)
        return token_ids

    def get_document(self, memory_id: str, doc_id: str, tokens: bool = False) -> dict:
        """The document's record; with `tokens`, also the token ids it was encoded with."""
        record = self.metadata.get_document(self.require_memory(memory_id).memory_key, doc_id)
        if record is None:
            raise APIError(404, f"document {doc_id!r} does not exist in memory {memory_id!r}", "doc_id")
        document = {"doc_id": record.doc_id, "gid": record.gid, "text": record.text,
                    "num_tokens": record.num_tokens}
        if tokens:
            document["token_ids"] = document_token_ids(self.tokenizer, record.gid, record.text,
                                                       self.is_msa_checkpoint)
        return document

    def list_documents(self, memory_id: str, limit: int, offset: int, hashes: bool = False) -> dict:
        key = self.require_memory(memory_id).memory_key
        return {"memory_id": memory_id, "documents": self.metadata.list_documents(key, limit, offset, hashes),
                "limit": limit, "offset": offset}

    async def delete_document(self, memory_id: str, doc_id: str) -> dict:
        """Record first, then tensors (as for memories)."""
        key = self.require_memory(memory_id).memory_key
        record = self.metadata.delete_document(key, doc_id)
        if record is None:
            raise APIError(404, f"document {doc_id!r} does not exist in memory {memory_id!r}", "doc_id")
        await self.control_request(protocol.RemoveDocument(memory_key=key, gid=record.gid))
        return {"doc_id": doc_id, "deleted": True}

    # ------------------------------------------------------------------------------ queries
    async def chat_prompt(self, record: MemoryRecord, body: schemas.MemoryChatRequest) -> tuple[MemoryPrompt, dict]:
        messages = [message.model_dump(include={"role", "content"}) for message in body.messages]
        return await self.query_prompt(record, messages, body.msa)

    async def query_prompt(self, record: MemoryRecord, messages: list[dict],
                           options: schemas.MemoryOptions) -> tuple[MemoryPrompt, dict]:
        """The prompt of the answer, and what injection or interleave rounds added (empty without)."""
        if options.interleave:
            prompt, injection = await self.interleave(record, messages, options)
            metrics.observe_injection_rounds(len(injection["interleave"]["rounds"]))
            return prompt, injection
        if options.inject_documents == 0:
            build = build_msa_chat_prompt if self.is_msa_checkpoint else build_chat_prompt
            return build(self.tokenizer, messages, options.routing_text), {}
        if self.is_msa_checkpoint:
            raise APIError(422, "router-driven injection is for training-free models; MSA checkpoints "
                           "retrieve by generating document ids (msa.interleave)", "msa.inject_documents")
        prompt, injection = await self.inject_documents(record, messages, options)
        metrics.observe_injection_rounds(len(injection["injection_rounds"]))
        return prompt, injection

    async def interleave(self, record: MemoryRecord, messages: list[dict],
                         options: schemas.MemoryOptions) -> tuple[MemoryPrompt, dict]:
        """Memory Interleave (MSA checkpoints): retrieval rounds in which the model writes document
        ids and the server injects their text, then the answer prompt (`interleave.py`)."""
        if not self.is_msa_checkpoint:
            raise APIError(422, "Memory Interleave needs an MSA checkpoint (trained to generate document ids); "
                           "training-free models use msa.inject_documents", "msa.interleave")
        if options.inject_documents or options.routing_text is not None:
            param = "msa.inject_documents" if options.inject_documents else "msa.routing_text"
            raise APIError(422, "interleave builds its own prompts and routing; it does not combine with "
                           f"{param}", param)
        max_rounds = options.max_rounds or self.options.max_interleave_rounds
        if max_rounds > self.options.max_interleave_rounds:
            raise APIError(422, f"max_rounds {max_rounds} exceeds the server's max_interleave_rounds "
                           f"{self.options.max_interleave_rounds}", "msa.max_rounds")
        question = messages[last_user_turn(messages)]["content"]

        async def generate_round(prompt: MemoryPrompt) -> RoundOutput:
            rid = grants.new_rid("round")
            try:
                out = completed(await self.generate(prompt.input_ids, ROUND_SAMPLING_PARAMS,
                                                    self.query_params(record, prompt, rid), rid).__anext__())
            except ValueError as exc:
                raise refusal(exc, record) from exc
            return RoundOutput(out["output_ids"], await self.retrieved(record, rid, options.routing_details))

        def documents(gids: list[int]) -> dict[int, tuple[str, str]]:
            records = self.metadata.documents_by_gid(record.memory_key, gids)
            return {gid: (doc.doc_id, doc.text) for gid, doc in records.items()}

        limits = InterleaveLimits(max_rounds=max_rounds, max_injected_tokens=self.options.max_injected_tokens)
        result = await run_interleave(self.interleave_prompts, question, limits, generate_round, documents)
        injected = [{"doc_id": result.doc_ids[gid], "gid": gid} for r in result.rounds for gid in r.gids]
        return result.answer_prompt, {"interleave": result.report(), "injected": injected}

    async def route_only(self, record: MemoryRecord, prompt: MemoryPrompt) -> list[int]:
        """Prefill the prompt over the memory and return the documents its routing ranked."""
        rid = grants.new_rid("route")
        try:
            completed(await self.generate(prompt.input_ids, {"max_new_tokens": 1, "temperature": 0},
                                          self.query_params(record, prompt, rid), rid).__anext__())
        except ValueError as exc:
            raise refusal(exc, record) from exc
        return (await self.control_request(protocol.TakeReport(rid=rid)))["ranked_gids"]

    async def inject_documents(self, record: MemoryRecord, messages: list[dict],
                               options: schemas.MemoryOptions) -> tuple[MemoryPrompt, dict]:
        """Router-driven injection: route, put the top documents' original text before the
        question, optionally route again on what was injected, then answer."""
        turn = last_user_turn(messages)
        question = messages[turn]["content"]
        routing_text, older, newest = options.routing_text, [], []
        injected, rounds, budget = set(), [], self.options.max_injected_tokens
        current = messages
        for _ in range(options.inject_rounds):
            gids = await self.route_only(record, build_chat_prompt(self.tokenizer, current, routing_text))
            records = self.metadata.documents_by_gid(record.memory_key, gids)
            chosen = []
            for gid in gids:
                if gid in records and gid not in injected and len(chosen) < options.inject_documents:
                    cost = records[gid].num_tokens
                    if cost > budget:
                        break
                    budget -= cost
                    chosen.append(records[gid])
                    injected.add(gid)
            rounds.append([{"doc_id": r.doc_id, "gid": r.gid} for r in chosen])
            # the best-ranked document goes last, next to the question (small models copy from what is nearest)
            older, newest = older + newest, [f"[{r.doc_id}] {r.text}" for r in reversed(chosen)]
            content, routing_text = injected_question(older, newest, question)
            current = [*messages[:turn], {"role": "user", "content": content}, *messages[turn + 1:]]
        prompt = build_chat_prompt(self.tokenizer, current, "Question: " + question)
        return prompt, {"injection_rounds": rounds,
                        "injected": [doc for round_docs in rounds for doc in round_docs]}

    def query_params(self, record: MemoryRecord, prompt: MemoryPrompt, rid: str,
                     explain_gids: list[int] = ()) -> dict:
        params = {"op": "query", "routing_spans": [list(span) for span in prompt.routing_spans],
                  "template_tokens": prompt.template_tokens, **self.memory_params(record, rid)}
        return {**params, "explain_gids": list(explain_gids)} if explain_gids else params

    async def chat(self, memory_id: str, body: schemas.MemoryChatRequest, created: int) -> dict:
        """A non-streaming OpenAI chat completion over the memory."""
        record = self.require_memory(memory_id)
        explain = self.explain_gids(record, body.msa)
        prompt, injection = await self.chat_prompt(record, body)
        rid = grants.new_rid("chat")
        try:
            out = completed(await self.generate(
                prompt.input_ids, chat_sampling_params(body), self.query_params(record, prompt, rid, explain), rid
            ).__anext__())
        except ValueError as exc:
            raise refusal(exc, record) from exc
        meta = out["meta_info"]
        return {
            "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": finish_reason(meta)}],
            "usage": {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
                      "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"]},
            "msa": {**await self.retrieved(record, rid, body.msa.routing_details),
                    **with_answer(injection, out["text"])},
        }

    async def generate_over_memory(self, memory_id: str, body: schemas.MemoryGenerateRequest) -> dict:
        """SGLang-native generate over the memory; the output adds the retrieved documents."""
        record = self.require_memory(memory_id)
        if (body.text is None) == (body.input_ids is None):
            raise APIError(422, "give exactly one of text and input_ids", "text")
        sampling_params = checked_sampling_params(body.sampling_params, self.vocab_size)
        options = body.msa
        explain = self.explain_gids(record, options)
        injection = {}
        if options.interleave or options.inject_documents:
            if body.text is None:
                raise APIError(422, "interleave and inject_documents take the question as text", "input_ids")
            prompt, injection = await self.query_prompt(record, [{"role": "user", "content": body.text}], options)
        elif body.text is not None:
            if options.routing_spans is not None or options.template_tokens is not None:
                raise APIError(422, "routing_spans and template_tokens need input_ids", "msa.routing_spans")
            prompt = build_prompt(self.tokenizer, body.text, options.routing_text or body.text, "msa.routing_text")
        else:
            if options.routing_text is not None:
                raise APIError(422, "routing_text needs a text prompt", "msa.routing_text")
            check_input_ids(body.input_ids, self.vocab_size)
            params = QueryParams(memory_key=record.memory_key, routing_spans=options.routing_spans,
                                 template_tokens=options.template_tokens or 0)
            spans = params.spans_within(len(body.input_ids))
            if isinstance(spans, str):
                raise APIError(422, spans, "msa.routing_spans")
            prompt = MemoryPrompt(body.input_ids, tuple(spans), params.template_tokens)
        rid = grants.new_rid("generate")
        try:
            out = completed(await self.generate(
                prompt.input_ids, sampling_params, self.query_params(record, prompt, rid, explain), rid,
                return_logprob=body.return_logprob, top_logprobs_num=body.top_logprobs_num,
                logprob_start_len=body.logprob_start_len,
            ).__anext__())
        except ValueError as exc:
            raise refusal(exc, record) from exc
        return {**out, "msa": {**await self.retrieved(record, rid, body.msa.routing_details),
                               **with_answer(injection, out["text"])}}
