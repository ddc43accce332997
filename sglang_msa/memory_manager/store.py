"""The memories of one scheduler process.

Memories are known by their incarnation key (`memory_key`, made by the server's metadata layer
at each creation and never reused), not by the name a tenant gave them, so a write aimed at a
memory that was deleted can only miss its successor of the same name. A memory maps document ids (`gid`, assigned in insertion order by the server's metadata layer)
to where the document's routed-layer tensors live: slots of the memory slot pools
(`tiers.MemorySlots`: router keys in the device's key pool, pooled K̄ / V̄ and, in
full-resolution mode, token K / V in the content pools of the memory's tier). Adding a document
allocates its slots and writes them, deleting it frees them; nothing else moves. A document
arrives *staged* (slots written, durable on disk, invisible to routing) and becomes visible when
the server has recorded its acknowledgement (`publish`); an ingestion that fails or is aborted
is discarded and its gid retired, so a request still under way for it can never stage it. The routing
view of a memory (its documents in order, their chunk layout and key slots) is rebuilt lazily
once per change, not per query; the keys themselves are read in place. For standardized routing
(`query_reduce` zmax / zmean) a memory also keeps, per routed layer, the moments of its published
router keys (`kernels.key_moments.KeyMoments`): added when documents are published or restored,
subtracted when they are removed, gone with the memory; derived from the stored keys, so they are
rebuilt on restore and never written.

Under tensor parallelism (`sharding.MemoryShard`) every rank's store holds every document's
content in the rank's own KV heads, and the router keys (all heads) of the documents it routes:
each document goes to the rank holding the fewest router-key chunks, a choice every rank makes
alike because all of them see the same commits and deletions in the same order. A commit that
one rank cannot place is refused on all of them.

Thread safety: the control thread (create/delete) and the scheduler thread (ingest commits,
reads during forward) share the store under one lock; readers take immutable snapshots.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Protocol

import torch

from sglang_msa.kernels.key_moments import KeyMoments
from sglang_msa.kernels.reference import ChunkLayout, Similarity, chunk_layout
from sglang_msa.kernels.routing_scan import RouterKeyTable
from sglang_msa.memory_manager.sharding import MemoryShard
from sglang_msa.memory_manager.tiers import DocumentSlots, MemorySlots, Placement, SlotLayout, SlotsExhausted


class MemoryOperationError(Exception):
    """A memory operation that cannot be done; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LayerTensors:
    """One document in one routed layer."""

    pooled_k: torch.Tensor  # [C, Hkv, d]
    pooled_v: torch.Tensor  # [C, Hkv, d]
    router_k: torch.Tensor  # [C, Hkv, d]; the same tensor as pooled_k when routing on pooled keys
    full_k: torch.Tensor | None = None  # [n, Hkv, d] in full-resolution mode
    full_v: torch.Tensor | None = None
    router_k_scale: torch.Tensor | None = None  # [C, Hkv] float32, when router_k is float8

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors present, by field name (router keys that are the pooled keys appear twice)."""
        return {name: getattr(self, name) for name in LAYER_TENSOR_NAMES if getattr(self, name) is not None}

    def nbytes(self) -> int:
        unique = {id(t): t for t in self.tensors().values()}
        return sum(t.numel() * t.element_size() for t in unique.values())


LAYER_TENSOR_NAMES = tuple(f.name for f in fields(LayerTensors))
MOMENTS_BLOCK_CHUNKS = 65536  # router keys read at once to update a memory's key moments
ROUTER_KEY_NAMES = ("router_k", "router_k_scale")


@dataclass(frozen=True)
class StoredDocument:
    gid: int
    num_tokens: int
    num_chunks: int
    layers: dict[int, LayerTensors]  # router keys absent (None) where another rank routes it, read back
    router_rank: int = 0  # the tensor-parallel rank that routes it (set at commit)

    def nbytes(self) -> int:
        return sum(tensors.nbytes() for tensors in self.layers.values())


class RoutingView:
    """A memory's router keys in one layer: its documents, their chunk layout, and the key-pool
    slots of its chunks in that order. Kernels read the keys in place through the slots; the
    reference path gathers them."""

    def __init__(self, index: "_MemoryIndex", layer_id: int, slots: MemorySlots | None):
        self._index, self._layer, self._slots = index, layer_id, slots

    @property
    def gids(self) -> list[int]:
        return self._index.gids

    @property
    def layout(self) -> ChunkLayout:
        return self._index.layout

    @property
    def key_slots(self) -> torch.Tensor:
        return self._index.key_slots

    def keys_and_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The router keys [C, Hkv, d] in this view's order (a copy), and their float8 scales."""
        if self._slots is None or not self.gids:
            return torch.zeros(0), None
        return self._slots.read_keys(self._layer, self.key_slots)

    @property
    def router_keys(self) -> torch.Tensor:
        return self.keys_and_scales()[0]

    @property
    def key_moments(self) -> KeyMoments | None:
        """The moments of this view's router keys in its layer, when the store keeps them."""
        return self._index.key_moments.get(self._layer)

    def read_keys(self, start: int, end: int) -> torch.Tensor:
        """The router keys of chunks start..end-1 as the CPU path scores them (float8 keys times
        their scales), read through the slots of those chunks only."""
        keys, scales = self._slots.read_keys(self._layer, self.key_slots[start:end])
        return keys if scales is None else keys.float() * scales.unsqueeze(-1)

    def key_table(self) -> RouterKeyTable:
        """The view as the Triton routing scan reads it: the layer's whole key buffer, read
        through this memory's slots (no copy of the keys)."""
        pool = self._slots.keys
        scales = pool.layer_buffer("router_k_scale", self._layer) if "router_k_scale" in pool.fields else None
        doc_map = self._index.device_maps(pool.device)
        return RouterKeyTable(keys=pool.layer_buffer("router_k", self._layer), scales=scales, chunk_doc=doc_map[0],
                              chunk_weight=doc_map[1], chunk_slot=doc_map[2])


@dataclass
class _MemoryIndex:
    """A memory's documents at one version, in routing order (the same in every layer)."""

    gids: list[int]
    layout: ChunkLayout
    key_slots: torch.Tensor  # [C] int64 on the host
    key_moments: dict[int, KeyMoments]  # per layer, when the store keeps them (else empty)
    _device_maps: dict = field(default_factory=dict)

    def device_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """chunk → document, chunk weights (chunk_reduce mean) and key slots, on `device`, built once."""
        if device not in self._device_maps:
            table = RouterKeyTable.from_layout(torch.zeros(0), self.layout)
            self._device_maps[device] = (table.chunk_doc.to(device), table.chunk_weight.to(device),
                                         self.key_slots.to(device=device, dtype=torch.int32))
        return self._device_maps[device]


@dataclass
class Memory:
    memory_key: str
    memory_id: str  # its name in its owner's namespace
    owner: str | None = None  # the tenant whose grants reach it (None: no API keys)
    placement: Placement = "auto"
    documents: dict[int, DocumentSlots] = field(default_factory=dict)  # published: routing selects them
    staged: dict[int, DocumentSlots] = field(default_factory=dict)  # stored, acknowledgement not yet recorded
    retired: set[int] = field(default_factory=set)  # gids discarded or removed: never staged again
    # per layer, of the published router keys this rank holds, when the store keeps them; replaced,
    # never changed in place, so that a routing view keeps the moments of its version
    key_moments: dict[int, KeyMoments] = field(default_factory=dict)
    version: int = 0
    _index: _MemoryIndex | None = None
    _index_version: int = -1

    def max_document_tokens(self) -> int:
        return max((doc.num_tokens for doc in self.documents.values()), default=0)

    def gid_taken(self, gid: int) -> bool:
        """Whether `gid` was ever stored here (published, staged, removed or discarded)."""
        return gid in self.documents or gid in self.staged or gid in self.retired


class ArchivedMemory(NamedTuple):
    """A memory as the backing stores it."""

    owner: str | None
    documents: list[StoredDocument]
    placement: Placement = "auto"
    memory_id: str | None = None  # its name (None: written before names and keys were told apart)


class DurableBacking(Protocol):
    """Where committed memories are also written (`persistence.DocumentArchive`), if anywhere."""

    def create_memory(self, memory_key: str, memory_id: str, owner: str | None, placement: Placement) -> None: ...
    def drop_memory(self, memory_key: str) -> None: ...
    def write_document(self, memory_key: str, doc: StoredDocument) -> None: ...
    def remove_document(self, memory_key: str, gid: int) -> None: ...


class MemoryStore:
    """Memories of one scheduler: their documents' slots in `MemorySlots` (created with the first
    document, whose shapes they take), their owners and placements. `key_moments_similarity`: keep
    each memory's router-key moments as this similarity scores the keys (standardized routing), or
    None."""

    def __init__(self, budget_bytes: int, chunk_size: int, backing: DurableBacking | None = None,
                 host_budget_bytes: int = 0, router_key_format: str | None = None,
                 shard: MemoryShard | None = None, key_moments_similarity: Similarity | None = None):
        self.budget_bytes = budget_bytes
        self.key_moments_similarity = key_moments_similarity
        self.shard = shard
        self._routed_chunks = [0] * (shard.size if shard is not None else 1)  # router-key chunks per rank
        self.host_budget_bytes = host_budget_bytes
        self.chunk_size = chunk_size
        self.backing = backing
        self.router_key_format = router_key_format
        self.slots: MemorySlots | None = None
        self._memories: dict[str, Memory] = {}
        self._used_bytes = {"device": 0, "host": 0}
        # documents that selections read in place: their slots are not reused until released
        self._pins: dict[int, list] = {}  # id(DocumentSlots) -> [document, pin count, deleted]
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ control operations
    def create(self, memory_key: str, memory_id: str | None = None, owner: str | None = None,
               placement: Placement = "auto") -> bool:
        """Create an empty memory (named `memory_id`, by default its key); False if the key exists."""
        memory_id = memory_id or memory_key
        with self._lock:
            if memory_key in self._memories:
                return False
            if placement == "host" and self.host_budget_bytes == 0:
                raise MemoryOperationError("placement 'host' needs host memory: host_memory_budget_mb is 0", 422)
            if self.backing is not None:
                self.backing.create_memory(memory_key, memory_id, owner, placement)
            self._memories[memory_key] = Memory(memory_key, memory_id, owner, placement)
            return True

    def find(self, owner: str | None, memory_id: str) -> str | None:
        """The key of `owner`'s memory named `memory_id`, if there is one."""
        with self._lock:
            return next((key for key, memory in self._memories.items()
                         if memory.owner == owner and memory.memory_id == memory_id), None)

    def drop(self, memory_key: str) -> bool:
        with self._lock:
            memory = self._memories.pop(memory_key, None)
            if memory is None:
                return False
            if self.backing is not None:
                self.backing.drop_memory(memory_key)
            for doc in [*memory.documents.values(), *memory.staged.values()]:
                self._forget(doc)
            return True

    def remove_document(self, memory_key: str, gid: int) -> bool:
        """Forget a published or staged document and retire its gid; False if there was none."""
        with self._lock:
            memory = self._require(memory_key)
            memory.retired.add(gid)
            doc = memory.documents.pop(gid, None)
            if doc is not None:
                self._change_moments(memory, [doc], KeyMoments.minus)
                memory.version += 1
            else:
                doc = memory.staged.pop(gid, None)
            if doc is None:
                return False
            if self.backing is not None:
                self.backing.remove_document(memory_key, gid)
            self._forget(doc)
            return True

    def publish(self, memory_key: str, gids: list[int]) -> list[int]:
        """Make staged documents visible to routing; the gids published (a memory deleted
        meanwhile, or a document removed meanwhile, publishes nothing)."""
        with self._lock:
            memory = self._memories.get(memory_key)
            published = [gid for gid in gids if memory is not None and gid in memory.staged]
            for gid in published:
                memory.documents[gid] = memory.staged.pop(gid)
            if published:
                self._change_moments(memory, [memory.documents[gid] for gid in published], KeyMoments.plus)
                memory.version += 1
            return published

    def discard(self, memory_key: str, gids: list[int]) -> int:
        """Drop staged documents and retire their gids (a failed or aborted ingestion); how many
        were staged. Published documents are left alone: their acknowledgement was recorded."""
        with self._lock:
            memory = self._memories.get(memory_key)
            if memory is None:
                return 0
            staged = [gid for gid in gids if gid in memory.staged]
            memory.retired.update(gid for gid in gids if gid not in memory.documents)
            for gid in staged:
                self.remove_document(memory_key, gid)
            return len(staged)

    def commit_document(self, memory_key: str, doc: StoredDocument) -> None:
        """Stage and publish at once: a document with no acknowledgement to wait for (the store
        used on its own, as in benchmarks and tests)."""
        with self._lock:
            self.stage_document(memory_key, doc)
            self.publish(memory_key, [doc.gid])

    def stage_document(self, memory_key: str, doc: StoredDocument) -> None:
        """Store a fully pooled document (all routed layers at once, durable when the store has a
        backing), invisible to routing until `publish`."""
        with self._lock:
            memory = self._require(memory_key)
            if memory.gid_taken(doc.gid):
                raise MemoryOperationError(f"document {doc.gid} of this memory was stored, removed or discarded "
                                           "already", 409)
            placed = self._place_everywhere(memory, doc)
            doc = replace(doc, router_rank=placed.router_rank)
            try:
                if self.backing is not None:
                    self._write_everywhere(memory_key, doc)
                self._write(memory, placed, doc)
            except BaseException:
                self.slots.release(placed)
                raise
            memory.staged[doc.gid] = placed

    def _write_everywhere(self, memory_key: str, doc: StoredDocument) -> None:
        """Write the document to the backing; sharded, every rank must succeed, or none keeps it."""
        if self.shard is None:
            self.backing.write_document(memory_key, doc)
            return
        try:
            self.backing.write_document(memory_key, doc)
            failure = None
        except Exception as exc:  # a full disk on one rank: refused on all, not a crash
            failure = exc
        if self.shard.agree(failure is None):
            return
        if failure is None:
            self.backing.remove_document(memory_key, doc.gid)
        raise MemoryOperationError(f"document {doc.gid} could not be written to the memory directory on every "
                                   f"tensor-parallel rank{f': {failure}' if failure else ''}", 500)

    def restore(self, memories: dict[str, ArchivedMemory]) -> None:
        """Load memories read back from the backing (start-up). A directory holding more than the
        budgets allow is refused with the numbers, not partly loaded."""
        with self._lock:
            for memory_key, archived in memories.items():
                memory = self._memories.setdefault(memory_key, Memory(
                    memory_key, archived.memory_id or memory_key, archived.owner, archived.placement))
                for doc in archived.documents:
                    try:
                        placed = self._place(memory, doc, router_rank=doc.router_rank)
                    except MemoryOperationError as exc:
                        raise MemoryOperationError(
                            f"the memory directory holds more than this server's budgets: {exc}; start with larger "
                            f"memory_budget_mb / host_memory_budget_mb", 507) from exc
                    self._write(memory, placed, doc)
                    memory.documents[doc.gid] = placed
                self._change_moments(memory, [memory.documents[doc.gid] for doc in archived.documents],
                                     KeyMoments.plus)
                memory.version += 1

    def reserve(self, layout: SlotLayout) -> None:
        """Allocate the slot pools now (start-up), instead of with the first document."""
        with self._lock:
            if self.slots is None:
                self.slots = MemorySlots(layout, self.budget_bytes, self.host_budget_bytes)

    def _place_everywhere(self, memory: Memory, doc: StoredDocument) -> DocumentSlots:
        """Place the document on this rank, and, sharded, only if every rank could place it."""
        if self.shard is None:
            return self._place(memory, doc)
        try:
            placed, refusal = self._place(memory, doc), None
        except MemoryOperationError as exc:
            placed, refusal = None, exc
        if self.shard.agree(refusal is None):
            return placed
        if placed is not None:
            self.slots.release(placed)
        raise refusal or MemoryOperationError(
            "memory budget exhausted on another tensor-parallel rank (its router keys or content slots are full)", 507)

    def _place(self, memory: Memory, doc: StoredDocument, router_rank: int | None = None) -> DocumentSlots:
        """Slots for `doc`; its router keys go to `router_rank`, by default the rank routing the
        fewest chunks."""
        if self.slots is None:
            self.reserve(SlotLayout.of_document(doc, self.chunk_size, self.router_key_format))
        if tuple(sorted(doc.layers)) != self.slots.layout.layers:
            raise ValueError(f"document {doc.gid} has routed layers {sorted(doc.layers)}, "
                             f"the store {list(self.slots.layout.layers)}")
        if router_rank is None:
            router_rank = min(range(len(self._routed_chunks)), key=lambda r: (self._routed_chunks[r], r))
        my_rank = self.shard.rank if self.shard is not None else 0
        try:
            return self.slots.place(doc.gid, doc.num_tokens, doc.num_chunks, memory.placement,
                                    router_rank=router_rank, holds_keys=router_rank == my_rank)
        except SlotsExhausted as exc:
            raise MemoryOperationError(str(exc), 507) from exc

    def _write(self, memory: Memory, placed: DocumentSlots, doc: StoredDocument) -> None:
        """Write the document's tensors into its slots and count them (visible to nothing yet)."""
        self.slots.write(placed, doc.layers)
        self._routed_chunks[placed.router_rank] += placed.num_chunks
        for tier, size in self.slots.nbytes(placed).items():
            self._used_bytes[tier] += size

    def _change_moments(self, memory: Memory, docs: list[DocumentSlots], change) -> None:
        """Add (`change` = `KeyMoments.plus`) or subtract (`KeyMoments.minus`) the router-key
        moments of `docs` (those whose keys this rank holds) to the memory's, in every layer."""
        docs = [doc for doc in docs if doc.holds_keys]
        if self.key_moments_similarity is None or not docs:
            return
        key_slots = torch.cat([doc.key_slots for doc in docs])
        updated = {}
        for layer in self.slots.layout.layers:
            moments, current = self._moments_of_keys(layer, key_slots), memory.key_moments.get(layer)
            updated[layer] = moments if current is None else change(current, moments)
        memory.key_moments = updated

    def _moments_of_keys(self, layer: int, key_slots: torch.Tensor) -> KeyMoments:
        """The moments of the router keys at `key_slots` in `layer` (float8 ones dequantized),
        read in blocks so that a restored memory of any size is never copied whole in float64."""
        total = None
        for start in range(0, key_slots.numel(), MOMENTS_BLOCK_CHUNKS):
            keys, scales = self.slots.read_keys(layer, key_slots[start : start + MOMENTS_BLOCK_CHUNKS])
            keys = keys if scales is None else keys.float() * scales.unsqueeze(-1)
            part = KeyMoments.of_keys(keys, self.key_moments_similarity)
            total = part if total is None else total.plus(part)
        return total

    def _forget(self, doc: DocumentSlots) -> None:
        """A document left its memory: no rank routes it any more; its slots go when unpinned."""
        self._routed_chunks[doc.router_rank] -= doc.num_chunks
        self._release(doc)

    def _release(self, doc: DocumentSlots) -> None:
        """Free a deleted document's slots, or, while selections read them in place, once they are done."""
        pin = self._pins.get(id(doc))
        if pin is not None:
            pin[2] = True
            return
        for tier, size in self.slots.nbytes(doc).items():
            self._used_bytes[tier] -= size
        self.slots.release(doc)

    def pin(self, docs: list[DocumentSlots]) -> None:
        """Keep `docs`' slots from reuse (a selection reads them in place) until `unpin`."""
        with self._lock:
            for doc in docs:
                self._pins.setdefault(id(doc), [doc, 0, False])[1] += 1

    def unpin(self, docs: list[DocumentSlots]) -> None:
        with self._lock:
            for doc in docs:
                pin = self._pins[id(doc)]
                pin[1] -= 1
                if pin[1] == 0:
                    del self._pins[id(doc)]
                    if pin[2]:  # deleted meanwhile: its slots are free now
                        self._release(doc)

    # ------------------------------------------------------------------ reads
    def exists(self, memory_key: str) -> bool:
        with self._lock:
            return memory_key in self._memories

    def owner(self, memory_key: str) -> str | None:
        with self._lock:
            return self._require(memory_key).owner

    def can_stage(self, memory_key: str, gid: int) -> bool:
        """Whether document `gid` may still be staged in the memory (never stored, removed or discarded)."""
        with self._lock:
            memory = self._memories.get(memory_key)
            return memory is not None and not memory.gid_taken(gid)

    def max_document_tokens(self, memory_key: str) -> int:
        with self._lock:
            return self._require(memory_key).max_document_tokens()

    def routing_view(self, memory_key: str, layer_id: int) -> RoutingView:
        """The memory's router keys in `layer_id`; its document order and chunk layout are
        rebuilt only after the memory changed."""
        with self._lock:
            memory = self._require(memory_key)
            if memory._index_version != memory.version:
                gids = [gid for gid, doc in memory.documents.items() if doc.holds_keys]  # this rank's shard
                docs = [memory.documents[gid] for gid in gids]
                memory._index = _MemoryIndex(
                    gids=gids, layout=chunk_layout([doc.num_tokens for doc in docs], self.chunk_size),
                    key_slots=torch.cat([doc.key_slots for doc in docs]) if docs else torch.zeros(0, dtype=torch.int64),
                    key_moments=memory.key_moments,
                )
                memory._index_version = memory.version
            return RoutingView(memory._index, layer_id, self.slots)

    def documents(self, memory_key: str, gids: list[int]) -> list[DocumentSlots]:
        """Those of `gids` that are still in the memory, in order (a routing view taken earlier
        may name documents deleted since)."""
        with self._lock:
            memory = self._require(memory_key)
            return [memory.documents[gid] for gid in gids if gid in memory.documents]

    def content(self, docs: list[DocumentSlots], layer_id: int, content: str,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V rows of `docs` in one layer, back to back, on `device` (`tiers.MemorySlots.read_content`)."""
        with self._lock:
            return self.slots.read_content(docs, layer_id, content, device)

    def content_in_place(self, docs: list[DocumentSlots], layer_id: int,
                         content: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Where `docs`' K and V rows are, when they can be read in place
        (`tiers.MemorySlots.content_in_place`); the caller pins `docs` while it reads them."""
        with self._lock:
            return self.slots.content_in_place(docs, layer_id, content)

    def document_tensors(self, memory_key: str, gid: int) -> StoredDocument:
        """A stored document's tensors (copies)."""
        with self._lock:
            doc = self._require(memory_key).documents[gid]
            layers = self.slots.read_document(doc, self.slots.layout.layers)
            return StoredDocument(gid=gid, num_tokens=doc.num_tokens, num_chunks=doc.num_chunks,
                                  layers={layer: LayerTensors(**parts) for layer, parts in layers.items()})

    def contents(self) -> dict[str, list[int]]:
        """Every memory and its document ids, staged ones included."""
        with self._lock:
            return {memory_key: sorted([*memory.documents, *memory.staged])
                    for memory_key, memory in self._memories.items()}

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._used_bytes.values())

    def stats(self, memory_key: str) -> dict:
        with self._lock:
            memory = self._require(memory_key)
            docs = list(memory.documents.values())
            by_tier = {"device": 0, "host": 0}
            for doc in docs:
                for tier, size in self.slots.nbytes(doc).items():
                    by_tier[tier] += size
            return {
                "documents": len(docs),
                "tokens": sum(doc.num_tokens for doc in docs),
                "chunks": sum(doc.num_chunks for doc in docs),
                "bytes": by_tier["device"] + by_tier["host"],
                "device_bytes": by_tier["device"],
                "host_bytes": by_tier["host"],
                "placement": memory.placement,
                "routed_documents": sum(doc.holds_keys for doc in docs),  # whose router keys this rank holds
            }

    def all_stats(self) -> dict[str, dict]:
        with self._lock:
            return {memory_key: self.stats(memory_key) for memory_key in self._memories}

    def tier_totals(self) -> dict[str, dict[str, int]]:
        """Over every memory: documents, tokens and chunks by the tier holding their content, and
        bytes per tier (router keys count on the device)."""
        totals = {tier: dict.fromkeys(("documents", "tokens", "chunks", "bytes"), 0) for tier in ("device", "host")}
        with self._lock:
            for memory in self._memories.values():
                for doc in memory.documents.values():
                    held = totals[doc.tier]
                    held["documents"] += 1
                    held["tokens"] += doc.num_tokens
                    held["chunks"] += doc.num_chunks
                    for tier, size in self.slots.nbytes(doc).items():
                        totals[tier]["bytes"] += size
        return totals

    def capacity(self) -> dict:
        """Budgets and, once the slots exist, free and total chunk slots per tier."""
        with self._lock:
            result = {"budget_bytes": self.budget_bytes, "host_budget_bytes": self.host_budget_bytes}
            if self.slots is not None:
                result["chunk_slots"] = {tier: {"total": pool.capacity, "free": pool.available()}
                                         for tier, pool in self.slots.chunk_pools.items()}
            return result

    def _require(self, memory_key: str) -> Memory:
        memory = self._memories.get(memory_key)
        if memory is None:
            raise MemoryOperationError(f"memory {memory_key!r} does not exist", 404)
        return memory
