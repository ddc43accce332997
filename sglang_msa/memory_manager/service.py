"""The scheduler-side MSA service: one per scheduler process, created by the `msa` backend.

It owns the memory store, the per-request registry and a control thread answering the HTTP
server over ZMQ, and it admits MSA requests when the scheduler receives them
(`admit_request`, called from a hook on `Scheduler._add_request_to_queue`).

Under tensor parallelism every rank has a service and a store shard (`sharding.py`); only rank 0
has the control thread. It does not apply messages itself: it queues them, rank 0's scheduler
hands them to SGLang's per-step broadcast of incoming requests (`ControlBatch`, a hook on
`Scheduler._poll_timeout_aborts`), and every rank applies them in the same step, before that
step's requests (`apply_control_batch`, a hook on `Scheduler.process_input_requests`). So
creations and deletions reach all ranks in the same order relative to forward passes, and the
handlers may use collectives (statistics are summed over the ranks).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import zmq
from pydantic import ValidationError

from sglang_msa import metrics
from sglang_msa.config import MSAOptions, load_options
from sglang_msa.kernels.reference import STANDARDIZED_REDUCTIONS, Similarity
from sglang_msa.memory_manager import grants, protocol
from sglang_msa.memory_manager.persistence import DocumentArchive, common_to_all_ranks
from sglang_msa.memory_manager.sharding import MemoryShard
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
from sglang_msa.models.router_adapter import AdapterError, RouterAdapter, load_adapter, options_with_adapter
from sglang_msa.models.text_router import ExternalRouter, ExternalRouterError, options_with_external_router

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
    hidden_size: int | None = None  # the attention input's width (what a router adapter projects)
    tokenizer_path: str | None = None  # the served model's tokenizer (what an external router decodes with)

    @property
    def is_msa_checkpoint(self) -> bool:
        return self.msa_config is not None

    @property
    def device(self) -> torch.device:
        """Where the KV pool (and so the memories' device tier) lives."""
        return self.kv_geometry.device if self.kv_geometry is not None else torch.device("cpu")


def get_service() -> "MemoryService | None":
    return _service


def start_service(facts: ModelFacts, port: int, options: MSAOptions | None = None,
                  shard: MemoryShard | None = None) -> "MemoryService":
    """Create this process's service (once) and, on the first rank, start its control thread."""
    global _service
    if _service is None:
        _service = MemoryService(options or load_options(), facts, shard)
        _service.restore_memories()
        if shard is None or shard.rank == 0:
            _service.start_control_thread(protocol.control_address(port))
    return _service


@dataclass
class ControlBatch:
    """Control messages (raw JSON) rank 0 received since the last step, broadcast to every rank
    with that step's requests (Memory Parallel)."""

    messages: list[bytes]


# control messages after which the store's sizes (metrics) may differ
CHANGES_CONTENTS = (protocol.DropMemory, protocol.RemoveDocument, protocol.PublishDocuments)


def reserved_rid_error(rid: str) -> str:
    return (f"rid {rid!r} is reserved: request ids starting with {grants.RESERVED_RID_PREFIX!r} (or prefixing it) "
            "belong to the memory API")


def _bypass_prefix_cache(req) -> None:
    """Neither reuse nor publish prefix-cache entries for this request."""
    req.extra_key = f"msa:{req.rid}"
    req.skip_radix_cache_insert = True


def check_standardized_routing(options: MSAOptions, device, shard: MemoryShard | None) -> None:
    """Refuse `query_reduce` zmax / zmean where it is not implemented (ValueError naming the option)."""
    if options.query_reduce not in STANDARDIZED_REDUCTIONS:
        return
    if options.kernel_path(device) == "triton":
        raise ValueError(f"query_reduce {options.query_reduce!r} needs kernels 'torch': the Triton routing scan "
                         "does not standardize scores")
    if shard is not None:
        raise ValueError(f"query_reduce {options.query_reduce!r} is not supported under --tp > 1 (Memory Parallel): "
                         "a rank holds a shard of the router keys, and standardizing needs the whole memory's")


def key_moments_similarity(options: MSAOptions) -> Similarity | None:
    """The similarity whose router-key moments the store keeps: those of a standardized reduction
    with a head mean (in closed form, `kernels.key_moments`); none otherwise (a head max takes its
    moments from the scores)."""
    if options.query_reduce not in STANDARDIZED_REDUCTIONS or options.head_reduce != "mean":
        return None
    return "dot" if options.similarity == "auto" else options.similarity


class MemoryService:
    def __init__(self, options: MSAOptions, facts: ModelFacts, shard: MemoryShard | None = None):
        if facts.is_msa_checkpoint:
            if options.router_adapter is not None:
                raise AdapterError("router_adapter: this is an MSA checkpoint, which routes with its own router "
                                   "projections; a router adapter is for models without them")
            options = options_for_checkpoint(options, facts.msa_config, facts.num_layers)
        self.adapter: RouterAdapter | None = None
        self.external_router: ExternalRouter | None = None
        if options.external_router is not None:
            self.external_router = self._load_external_router(options, facts)
            options = options_with_external_router(options)
        if options.router_adapter is not None:
            self.adapter = load_adapter(options.router_adapter)
            self.adapter.check_model(facts.hidden_size, facts.num_layers)
            options = options_with_adapter(options, self.adapter, facts.num_layers)
        check_standardized_routing(options, facts.device, shard)
        self.options = options
        self.facts = facts
        self.shard = shard
        self.routed_layers = options.routed_layer_ids(facts.num_layers)
        self.store = MemoryStore(int(options.memory_budget_mb * 2**20), options.chunk_size, self._open_archive(),
                                 host_budget_bytes=int(options.host_memory_budget_mb * 2**20),
                                 router_key_format=options.router_key_format, shard=shard,
                                 key_moments_similarity=key_moments_similarity(options))
        self._pending: queue.Queue[tuple[bytes, Future]] = queue.Queue()  # rank 0, sharded: for the next step
        # rank 0, sharded: waiters of the batch being broadcast (one message at a time: the
        # control socket is REQ/REP, so its thread waits for each reply before the next message)
        self._in_flight: list[Future] = []
        if facts.kv_geometry is not None:
            self.store.reserve(self.slot_layout(facts.kv_geometry))
        self.registry = RequestRegistry(on_leave=self._release_state)
        self._control_thread: threading.Thread | None = None
        logger.info(
            "sglang-msa: routed layers %s, top_k_docs=%d, chunk_size=%d, memory_content=%s",
            self.routed_layers, options.top_k_docs, options.chunk_size, options.memory_content,
        )

    @staticmethod
    def _load_external_router(options: MSAOptions, facts: ModelFacts) -> ExternalRouter:
        if facts.is_msa_checkpoint:
            raise ExternalRouterError("external_router: this is an MSA checkpoint, which routes with its own router "
                                      "projections; an external router is for models without them")
        if options.router_adapter is not None:
            raise ExternalRouterError("external_router and router_adapter are exclusive: choose one router")
        if facts.tokenizer_path is None:
            raise ExternalRouterError("external_router needs the served model's tokenizer (not with "
                                      "--skip-tokenizer-init)")
        router = ExternalRouter(options.external_router, facts.tokenizer_path, facts.device)
        logger.warning("sglang-msa: MSA memory attention with an EXTERNAL router (%s): documents are chosen by "
                       "all-MiniLM-L6-v2 text embeddings, not by MSA routing", router.identity)
        return router

    @property
    def own_router_geometry(self) -> tuple[int, int] | None:
        """(heads, dim) of router keys that are not the KV pool's (adapter, external router)."""
        if self.adapter is not None:
            return self.adapter.key_heads, self.adapter.head_dim
        if self.external_router is not None:
            return self.external_router.heads, self.external_router.dim
        return None

    def slot_layout(self, kv: KVGeometry) -> SlotLayout:
        """What each stored document holds per routed layer, from the KV pool and the options."""
        fp8 = self.options.router_key_format == "fp8"
        own = self.own_router_geometry
        shards = self.shard.size if self.shard is not None else 1
        return SlotLayout(
            layers=tuple(self.routed_layers), chunk_size=self.options.chunk_size, kv_heads=kv.kv_heads,
            head_dim=kv.head_dim, v_head_dim=kv.v_head_dim, dtype=kv.dtype,
            router_dtype=torch.float8_e4m3fn if fp8 else kv.dtype,
            # sharded, a router key has every rank's heads and the content this rank's: K̄ is kept twice
            router_is_pooled_k=not fp8 and self.routes_on_pooled_keys and shards == 1,
            full=self.options.memory_content == "full", device=kv.device,
            router_heads=own[0] if own else kv.kv_heads * shards, key_shards=shards,
            router_dim=own[1] if own else 0,
            max_document_chunks=-(-self.options.max_document_tokens // self.options.chunk_size),
        )

    @property
    def exclude_sink(self) -> bool:
        """Each document's first token is left out of its router-key pooling (never for MSA checkpoints)."""
        return (self.options.router_exclude_sink and not self.facts.is_msa_checkpoint
                and self.external_router is None)

    @property
    def routes_on_pooled_keys(self) -> bool:
        """Router keys are the pooled attention keys themselves (training-free, sink included)."""
        return (not self.facts.is_msa_checkpoint and self.own_router_geometry is None
                and not self.exclude_sink)

    def router_identity(self) -> str:
        """What made the router keys: persisted memories must have been encoded by the same."""
        if self.facts.is_msa_checkpoint:
            return "checkpoint"
        if self.external_router is not None:
            return self.external_router.identity
        source = f"adapter:{self.adapter.identity}" if self.adapter is not None else "pooled-keys"
        return f"{source}{'/no-sink' if self.exclude_sink else ''}"

    def _open_archive(self) -> DocumentArchive | None:
        if self.options.memory_dir is None:
            return None
        options = self.options
        fingerprint = {**self.facts.model_identity, "routed_layers": self.routed_layers,
                       "chunk_size": options.chunk_size, "memory_content": options.memory_content,
                       "msa_checkpoint": self.facts.is_msa_checkpoint, "router": self.router_identity()}
        if self.shard is None:
            return DocumentArchive(options.memory_dir, fingerprint)
        return DocumentArchive(options.memory_dir, fingerprint, rank=self.shard.rank, ranks=self.shard.size)

    def restore_memories(self) -> None:
        """Load what the memory directory holds (start-up)."""
        archive = self.store.backing
        if archive is None:
            return
        memories = archive.load()
        if self.shard is not None:  # only what every rank wrote (an interrupted write is on some ranks)
            everyone = self.shard.gather_objects({memory_id: [doc.gid for doc in memory.documents]
                                                  for memory_id, memory in memories.items()})
            memories = common_to_all_ranks(memories, archive, everyone)
        self.store.restore(memories)
        metrics.observe_store(self.store)
        logger.info("sglang-msa: restored %d memories, %d documents (%.1f MiB) from %s", len(memories),
                    sum(len(memory.documents) for memory in memories.values()), self.store.used_bytes() / 2**20,
                    archive.root)

    # ------------------------------------------------------------------ admission
    def admit_request(self, req) -> str | None:
        """Register an MSA request's state; return an error message to abort it with, or None.

        A memory is reached only through the memory API's grant for the incarnation it resolved,
        or, without API keys, by name from SGLang's own endpoints (queries only). Anything else
        is answered as if the memory did not exist. The memory API's request ids are reserved
        for requests carrying its grant, so no other caller can abort them by rid prefix."""
        custom = getattr(req.sampling_params, "custom_params", None) or {}
        reserved = grants.is_reserved_rid(req.rid)
        if CUSTOM_PARAMS_KEY not in custom:
            return reserved_rid_error(req.rid) if reserved else None
        if self.registry.get(req.rid) is not None:  # a retracted request coming back: keep its state
            return None
        try:
            params = parse_request_params(custom[CUSTOM_PARAMS_KEY])
        except ValidationError as exc:
            return f"custom_params.msa is invalid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        if reserved and params.memory_key is None:
            return reserved_rid_error(req.rid)
        memory_key = self.resolve_memory(params, req.rid)
        if memory_key is None:
            return f"memory {getattr(params, 'memory_id', None) or params.memory_key!r} does not exist"
        params = params.model_copy(update={"memory_key": memory_key})
        prompt_len = len(req.origin_input_ids)
        if isinstance(params, IngestParams):
            return self._admit_ingest(req, params, prompt_len)
        return self._admit_query(req, params, prompt_len)

    def resolve_memory(self, params: QueryParams | IngestParams, rid: str) -> str | None:
        """The key of the memory the request may reach, or None (absent, or not the caller's)."""
        if params.memory_key is not None:
            key = params.memory_key
            if self.store.exists(key) and grants.verify(self.store.owner(key), key, rid, params.grant):
                return key
            return None
        if self.options.api_keys_file is not None:  # tenants' memories only through the memory API
            return None
        return self.store.find(None, params.memory_id)

    def _admit_ingest(self, req, params: IngestParams, prompt_len: int) -> str | None:
        if prompt_len > self.options.max_document_tokens:
            return f"document has {prompt_len} tokens; max_document_tokens is {self.options.max_document_tokens}"
        if not self.store.can_stage(params.memory_key, params.gid):
            return f"document {params.gid} was stored, removed or discarded already"
        state = IngestState(params=params, num_tokens=prompt_len)
        if self.external_router is not None:  # made once, stored by every routed layer
            keys = self.external_router.chunk_keys(list(req.origin_input_ids), self.options.chunk_size)
            kv = self.facts.kv_geometry
            state.text_chunk_keys = keys if kv is None else keys.to(kv.device, kv.dtype)
        self.registry.put(req.rid, state)
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
        state = QueryState(params=params, prompt_len=prompt_len, routing_spans=spans,
                           position_offset=self.position_offset(params.memory_key))
        if self.external_router is not None:
            ids = list(req.origin_input_ids)
            query = self.external_router.query([token for start, end in spans for token in ids[start:end]])
            state.text_query = query.to(self.facts.device)  # routed in every routed layer
        self.registry.put(req.rid, state)
        _bypass_prefix_cache(req)  # upper-layer KV depends on the selection: never share it
        return None

    def _release_state(self, state: QueryState | IngestState) -> None:
        """A request's state left: the documents its selections read in place may be reused."""
        if isinstance(state, QueryState):
            for selection in state.selections.values():
                self.store.unpin(selection.pinned)
                selection.pinned = []

    def position_offset(self, memory_key: str) -> int:
        if self.options.position_offset != "auto":
            return self.options.position_offset
        if self.facts.is_msa_checkpoint:
            return 3 + self.options.top_k_docs
        # training-free: every document's positions 0..n-1 precede the first local token
        return self.store.max_document_tokens(memory_key)

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
            if self.shard is None:
                reply = self._apply(raw)
            else:  # applied by every rank's scheduler in the same step
                applied: Future = Future()
                self._pending.put((raw, applied))
                reply = applied.result()
            socket.send(reply.model_dump_json().encode())

    def _apply(self, raw: bytes) -> protocol.ControlReply:
        try:
            message = protocol.control_message_adapter.validate_json(raw)
            result = self.handle(message)
            if isinstance(message, CHANGES_CONTENTS):
                metrics.observe_store(self.store)
            return protocol.ControlReply(ok=True, result=result)
        except MemoryOperationError as exc:
            return protocol.ControlReply(ok=False, status=exc.status, error=str(exc))
        except ValidationError as exc:
            return protocol.ControlReply(ok=False, status=422, error=str(exc))
        except Exception as exc:  # the channel must survive anything a message does
            logger.exception("sglang-msa: control message failed")
            return protocol.ControlReply(ok=False, status=500, error=f"{type(exc).__name__}: {exc}")

    def take_pending(self) -> ControlBatch | None:
        """Rank 0: the control messages waiting for the next step, as one broadcastable batch."""
        raws = []
        while True:
            try:
                raws.append(self._pending.get_nowait())
            except queue.Empty:
                break
        if not raws:
            return None
        self._in_flight = [applied for _, applied in raws]
        return ControlBatch(messages=[raw for raw, _ in raws])

    def apply_control_batch(self, batch: ControlBatch) -> None:
        """Every rank, in the same step: apply the batch in order; rank 0 answers its waiters."""
        replies = [self._apply(raw) for raw in batch.messages]
        if self.shard.rank == 0:
            for applied, reply in zip(self._in_flight, replies):
                applied.set_result(reply)
            self._in_flight = []

    def handle(self, message) -> dict:
        store = self.store
        if isinstance(message, protocol.CreateMemory):
            return {"created": store.create(message.memory_key, message.memory_id, message.owner, message.placement)}
        if isinstance(message, protocol.DropMemory):
            return {"dropped": store.drop(message.memory_key)}
        if isinstance(message, protocol.RemoveDocument):
            return {"removed": store.remove_document(message.memory_key, message.gid)}
        if isinstance(message, protocol.PublishDocuments):
            return {"published": store.publish(message.memory_key, message.gids)}
        if isinstance(message, protocol.DiscardDocuments):
            return {"discarded": store.discard(message.memory_key, message.gids)}
        if isinstance(message, protocol.MemoryStats):
            return self._summed_over_ranks(store.stats(message.memory_key))
        if isinstance(message, protocol.TakeReport):
            return self.take_report(message.rid)
        if isinstance(message, protocol.ListContents):
            return {"memories": store.contents()}
        if isinstance(message, protocol.StoreStats):
            memories = {memory_key: self._summed_over_ranks(stats) for memory_key, stats in store.all_stats().items()}
            held = self.registry.held_bytes()
            if self.shard is not None:
                held = sum(self.shard.gather_objects(held))
            return {"memories": memories, **store.capacity(), "requests": len(self.registry),
                    "request_selection_bytes": held}
        raise ValueError(f"unhandled message {message!r}")

    def _summed_over_ranks(self, stats: dict) -> dict:
        """A memory's statistics over the tensor-parallel ranks: bytes summed (each rank holds
        its heads of the content and its shard of the router keys), documents as one rank sees
        them (all of them), and how many documents each rank routes."""
        if self.shard is None:
            return stats
        ranks = self.shard.gather_objects(stats)
        summed = {**stats, **{name: sum(r[name] for r in ranks) for name in ("bytes", "device_bytes", "host_bytes")}}
        summed["routed_documents"] = sum(r["routed_documents"] for r in ranks)
        summed["routed_documents_per_rank"] = [r["routed_documents"] for r in ranks]
        return summed

    @staticmethod
    def may_abort(rid: str, abort_all: bool) -> bool:
        """Whether SGLang may run this abort: it matches requests by rid prefix, so an abort
        whose rid is, or prefixes, the memory API's reserved rids runs only when it is a whole
        memory API rid, which matches that one request (its client went away) and no other."""
        return abort_all or not grants.is_reserved_rid(rid) or grants.names_one_request(rid)

    def release_aborted(self, rid: str, abort_all: bool) -> None:
        """SGLang aborted the requests whose rid starts with `rid` (their client went away, or an
        abort was asked), or all of them: their states, and the pins of their selections, go now;
        nobody will take their reports."""
        if abort_all or rid:
            self.registry.pop_prefixed("" if abort_all else rid)

    def release_finished(self, rid: str) -> None:
        """SGLang finished request `rid` (on every rank): its selections' rows and pins go now;
        its report (documents and scores per layer) waits for its reader, or expires."""
        state = self.registry.get(rid)
        if isinstance(state, QueryState) and state.selections:
            self._release_state(state)
            state.selections = {layer: sel.report_only() for layer, sel in state.selections.items()}

    def take_report(self, rid: str) -> dict:
        state = self.registry.pop(rid)
        if state is None:
            raise MemoryOperationError(f"no MSA state for request {rid!r}", 404)
        if isinstance(state, QueryState):
            return {"kind": "query", **state.report()}
        return {"kind": "ingest", "stored": state.stored, "error": state.error, "error_status": state.error_status,
                "num_tokens": state.num_tokens}
