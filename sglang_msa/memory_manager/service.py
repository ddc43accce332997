"""The scheduler-side MSA service: one per scheduler process, created by the `msa` backend.

It owns the memory store, the per-request registry and a control thread answering the HTTP
server over ZMQ, and it admits MSA requests when the scheduler receives them
(`admit_request`, called from a hook on `Scheduler._add_request_to_queue`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
import zmq
from pydantic import ValidationError

from sglang_msa.config import MSAOptions, load_options
from sglang_msa.memory_manager import grants, protocol
from sglang_msa.memory_manager.persistence import DocumentArchive
from sglang_msa.memory_manager.requests import (
    CUSTOM_PARAMS_KEY,
    IngestParams,
    IngestState,
    QueryParams,
    QueryState,
    RequestRegistry,
    parse_request_params,
)
from sglang_msa.memory_manager.store import MemoryOperationError, MemoryStore
from sglang_msa.memory_manager.tiers import SlotLayout
from sglang_msa.models.msa_config import options_for_checkpoint

logger = logging.getLogger(__name__)

_service: "MemoryService | None" = None


@dataclass(frozen=True)
class KVGeometry:
    """One token's K and V rows in the scheduler's KV pool (this rank's KV heads)."""

    kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class ModelFacts:
    num_layers: int
    msa_config: dict | None  # the checkpoint's msa_config (MSA format); None for training-free models
    max_prefill_tokens: int | None  # a query's prompt must fit one prefill pass
    model_identity: dict = field(default_factory=dict)  # what persisted memories must match (model, dtype)
    kv_geometry: KVGeometry | None = None  # the KV pool's per-token rows: memory slots are reserved at start-up

    @property
    def is_msa_checkpoint(self) -> bool:
        return self.msa_config is not None


def get_service() -> "MemoryService | None":
    return _service


def start_service(facts: ModelFacts, port: int, options: MSAOptions | None = None) -> "MemoryService":
    """Create this process's service (once) and start its control thread."""
    global _service
    if _service is None:
        _service = MemoryService(options or load_options(), facts)
        _service.restore_memories()
        _service.start_control_thread(protocol.control_address(port))
    return _service


def _bypass_prefix_cache(req) -> None:
    """Neither reuse nor publish prefix-cache entries for this request."""
    req.extra_key = f"msa:{req.rid}"
    req.skip_radix_cache_insert = True


class MemoryService:
    def __init__(self, options: MSAOptions, facts: ModelFacts):
        if facts.is_msa_checkpoint:
            options = options_for_checkpoint(options, facts.msa_config, facts.num_layers)
        self.options = options
        self.facts = facts
        self.routed_layers = options.routed_layer_ids(facts.num_layers)
        self.store = MemoryStore(int(options.memory_budget_mb * 2**20), options.chunk_size, self._open_archive(),
                                 host_budget_bytes=int(options.host_memory_budget_mb * 2**20),
                                 router_key_format=options.router_key_format)
        if facts.kv_geometry is not None:
            self.store.reserve(self.slot_layout(facts.kv_geometry))
        self.registry = RequestRegistry(on_leave=self._release_state)
        self._control_thread: threading.Thread | None = None
        logger.info(
            "sglang-msa: routed layers %s, top_k_docs=%d, chunk_size=%d, memory_content=%s",
            self.routed_layers, options.top_k_docs, options.chunk_size, options.memory_content,
        )

    def slot_layout(self, kv: KVGeometry) -> SlotLayout:
        """What each stored document holds per routed layer, from the KV pool and the options."""
        fp8 = self.options.router_key_format == "fp8"
        return SlotLayout(
            layers=tuple(self.routed_layers), chunk_size=self.options.chunk_size, kv_heads=kv.kv_heads,
            head_dim=kv.head_dim, v_head_dim=kv.v_head_dim, dtype=kv.dtype,
            router_dtype=torch.float8_e4m3fn if fp8 else kv.dtype,
            router_is_pooled_k=not fp8 and not self.facts.is_msa_checkpoint,
            full=self.options.memory_content == "full", device=kv.device,
        )

    def _open_archive(self) -> DocumentArchive | None:
        if self.options.memory_dir is None:
            return None
        options = self.options
        fingerprint = {**self.facts.model_identity, "routed_layers": self.routed_layers,
                       "chunk_size": options.chunk_size, "memory_content": options.memory_content,
                       "msa_checkpoint": self.facts.is_msa_checkpoint}
        return DocumentArchive(options.memory_dir, fingerprint)

    def restore_memories(self) -> None:
        """Load what the memory directory holds (start-up)."""
        archive = self.store.backing
        if archive is None:
            return
        memories = archive.load()
        self.store.restore(memories)
        logger.info("sglang-msa: restored %d memories, %d documents (%.1f MiB) from %s", len(memories),
                    sum(len(memory.documents) for memory in memories.values()), self.store.used_bytes() / 2**20,
                    archive.root)

    # ------------------------------------------------------------------ admission
    def admit_request(self, req) -> str | None:
        """Register an MSA request's state; return an error message to abort it with, or None."""
        custom = getattr(req.sampling_params, "custom_params", None) or {}
        if CUSTOM_PARAMS_KEY not in custom:
            return None
        if self.registry.get(req.rid) is not None:  # a retracted request coming back: keep its state
            return None
        try:
            params = parse_request_params(custom[CUSTOM_PARAMS_KEY])
        except ValidationError as exc:
            return f"custom_params.msa is invalid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        prompt_len = len(req.origin_input_ids)
        if not self.store.exists(params.memory_id):
            return f"memory {params.memory_id!r} does not exist"
        if self.options.api_keys_file is not None and not grants.verify(
            self.store.owner(params.memory_id), params.memory_id, params.grant
        ):
            return f"no grant for memory {params.memory_id!r}: with API keys, memories are reached through /v1/memories"
        if isinstance(params, IngestParams):
            return self._admit_ingest(req, params, prompt_len)
        return self._admit_query(req, params, prompt_len)

    def _admit_ingest(self, req, params: IngestParams, prompt_len: int) -> str | None:
        if prompt_len > self.options.max_document_tokens:
            return f"document has {prompt_len} tokens; max_document_tokens is {self.options.max_document_tokens}"
        if self.store.has_document(params.memory_id, params.gid):
            return f"document {params.gid} already exists in memory {params.memory_id!r}"
        self.registry.put(req.rid, IngestState(params=params, num_tokens=prompt_len))
        _bypass_prefix_cache(req)  # every token's router keys must be computed in this request
        return None

    def _admit_query(self, req, params: QueryParams, prompt_len: int) -> str | None:
        limit = self.facts.max_prefill_tokens
        if limit is not None and prompt_len > limit:
            return f"a memory query must fit one prefill pass: {prompt_len} tokens > chunked_prefill_size {limit}"
        if params.template_tokens >= prompt_len:
            return f"template_tokens={params.template_tokens} leaves no local tokens in a {prompt_len}-token prompt"
        spans = params.spans_within(prompt_len)
        if isinstance(spans, str):
            return spans
        self.registry.put(
            req.rid,
            QueryState(params=params, prompt_len=prompt_len, routing_spans=spans,
                       position_offset=self.position_offset(params.memory_id)),
        )
        _bypass_prefix_cache(req)  # upper-layer KV depends on the selection: never share it
        return None

    def _release_state(self, state: QueryState | IngestState) -> None:
        """A request's state left: the documents its selections read in place may be reused."""
        if isinstance(state, QueryState):
            for selection in state.selections.values():
                self.store.unpin(selection.pinned)
                selection.pinned = []

    def position_offset(self, memory_id: str) -> int:
        if self.options.position_offset != "auto":
            return self.options.position_offset
        if self.facts.is_msa_checkpoint:
            return 3 + self.options.top_k_docs
        # training-free: every document's positions 0..n-1 precede the first local token
        return self.store.max_document_tokens(memory_id)

    # ------------------------------------------------------------------ control channel
    def start_control_thread(self, address: str) -> None:
        context = zmq.Context.instance()
        socket = context.socket(zmq.REP)
        socket.bind(address)
        self._control_thread = threading.Thread(
            target=self._serve_control, args=(socket,), name="sglang-msa-control", daemon=True
        )
        self._control_thread.start()
        logger.info("sglang-msa: control channel at %s", address)

    def _serve_control(self, socket) -> None:
        while True:
            raw = socket.recv()
            try:
                message = protocol.control_message_adapter.validate_json(raw)
                reply = protocol.ControlReply(ok=True, result=self.handle(message))
            except MemoryOperationError as exc:
                reply = protocol.ControlReply(ok=False, status=exc.status, error=str(exc))
            except ValidationError as exc:
                reply = protocol.ControlReply(ok=False, status=422, error=str(exc))
            except Exception as exc:  # the channel must survive anything a message does
                logger.exception("sglang-msa: control message failed")
                reply = protocol.ControlReply(ok=False, status=500, error=f"{type(exc).__name__}: {exc}")
            socket.send(reply.model_dump_json().encode())

    def handle(self, message) -> dict:
        store = self.store
        if isinstance(message, protocol.CreateMemory):
            return {"created": store.create(message.memory_id, message.owner, message.placement)}
        if isinstance(message, protocol.DropMemory):
            return {"dropped": store.drop(message.memory_id)}
        if isinstance(message, protocol.RemoveDocument):
            return {"removed": store.remove_document(message.memory_id, message.gid)}
        if isinstance(message, protocol.MemoryStats):
            return store.stats(message.memory_id)
        if isinstance(message, protocol.TakeReport):
            return self.take_report(message.rid)
        if isinstance(message, protocol.ListContents):
            return {"memories": store.contents()}
        if isinstance(message, protocol.StoreStats):
            return {"memories": store.all_stats(), **store.capacity()}
        raise ValueError(f"unhandled message {message!r}")

    def take_report(self, rid: str) -> dict:
        state = self.registry.pop(rid)
        if state is None:
            raise MemoryOperationError(f"no MSA state for request {rid!r}", 404)
        if isinstance(state, QueryState):
            return {"kind": "query", **state.report()}
        return {"kind": "ingest", "committed": state.committed, "error": state.error, "num_tokens": state.num_tokens}
