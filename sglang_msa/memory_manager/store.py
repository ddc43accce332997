"""Per-memory document tensors kept by the scheduler process.

A memory maps document ids (`gid`, assigned in insertion order by the server's metadata layer)
to what the routed layers need: pooled K̄, V̄ and router keys per chunk, and in full-resolution
mode the document's token KV. Adding and deleting a document touches only that document; the
routing view of a memory (its router keys back to back with their chunk layout) is rebuilt
lazily once per change, not per query.

Thread safety: the control thread (create/delete) and the scheduler thread (ingest commits,
reads during forward) share the store under one lock; readers take immutable snapshots.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from sglang_msa.kernels.reference import ChunkLayout, chunk_layout
from sglang_msa.kernels.routing_scan import RouterKeyTable


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


@dataclass(frozen=True)
class StoredDocument:
    gid: int
    num_tokens: int
    num_chunks: int
    layers: dict[int, LayerTensors]

    def nbytes(self) -> int:
        return sum(tensors.nbytes() for tensors in self.layers.values())


HOST_MAPPING_MIN_BYTES = 128 * 1024


def document_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D buffer for one document's tensors.

    In host memory, a buffer of its own anonymous mapping: deleting the document unmaps it, so
    the process shrinks with the store. (From malloc, such buffers end up on the heap once glibc
    has raised its mmap threshold after the first frees, and a stream of additions and deletions
    then grows the process although the store does not.)
    """
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HOST_MAPPING_MIN_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    mapping = mmap.mmap(-1, nbytes)  # kept alive by the tensor; unmapped when the last view goes
    return torch.frombuffer(mapping, dtype=torch.uint8).view(dtype)


def pack_document(doc: StoredDocument) -> StoredDocument:
    """The same document with all its tensors as views of one buffer per dtype.

    A document is then one large allocation that is freed (and, being large, returned to the
    operating system) at once when it is deleted, instead of dozens of small ones that fragment
    the heap under a stream of additions and deletions. Router keys that are the pooled keys
    stay the same tensor.
    """
    unique: dict[int, torch.Tensor] = {}
    for parts in doc.layers.values():
        for tensor in parts.tensors().values():
            unique.setdefault(id(tensor), tensor)
    views: dict[int, torch.Tensor] = {}
    for dtype in {t.dtype for t in unique.values()}:
        members = [t for t in unique.values() if t.dtype == dtype]
        buffer = document_buffer(sum(t.numel() for t in members), dtype, members[0].device)
        offset = 0
        for tensor in members:
            view = buffer[offset : offset + tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            views[id(tensor)] = view
            offset += tensor.numel()
    layers = {
        layer: LayerTensors(**{name: views[id(tensor)] for name, tensor in parts.tensors().items()})
        for layer, parts in doc.layers.items()
    }
    return StoredDocument(gid=doc.gid, num_tokens=doc.num_tokens, num_chunks=doc.num_chunks, layers=layers)


@dataclass(frozen=True)
class RoutingView:
    """A memory's router keys in one layer, back to back, with their chunk layout."""

    gids: list[int]
    router_keys: torch.Tensor  # [C_total, Hkv, d]
    layout: ChunkLayout
    router_key_scales: torch.Tensor | None = None  # [C_total, Hkv] when the keys are float8
    _key_table: list = field(default_factory=list, compare=False, repr=False)

    def key_table(self) -> RouterKeyTable:
        """The view as the Triton routing scan reads it, built on first use (views are rebuilt
        whenever the memory changes, so this never goes stale)."""
        if not self._key_table:
            self._key_table.append(RouterKeyTable.from_layout(self.router_keys, self.layout, self.router_key_scales))
        return self._key_table[0]

    def float_keys(self) -> torch.Tensor:
        """The router keys as the reference path scores them: float8 keys times their scales."""
        if self.router_key_scales is None:
            return self.router_keys
        return self.router_keys.float() * self.router_key_scales.unsqueeze(-1)


@dataclass
class Memory:
    memory_id: str
    owner: str | None = None  # the tenant whose grants reach it (API keys enabled)
    documents: dict[int, StoredDocument] = field(default_factory=dict)
    version: int = 0
    _views: dict[int, RoutingView] = field(default_factory=dict)
    _views_version: int = -1

    def nbytes(self) -> int:
        return sum(doc.nbytes() for doc in self.documents.values())

    def max_document_tokens(self) -> int:
        return max((doc.num_tokens for doc in self.documents.values()), default=0)


class DurableBacking(Protocol):
    """Where committed memories are also written (`persistence.DocumentArchive`), if anywhere."""

    def create_memory(self, memory_id: str, owner: str | None) -> None: ...
    def drop_memory(self, memory_id: str) -> None: ...
    def write_document(self, memory_id: str, doc: StoredDocument) -> None: ...
    def remove_document(self, memory_id: str, gid: int) -> None: ...


class MemoryStore:
    def __init__(self, budget_bytes: int, chunk_size: int, backing: DurableBacking | None = None):
        self.budget_bytes = budget_bytes
        self.chunk_size = chunk_size
        self.backing = backing
        self._memories: dict[str, Memory] = {}
        self._used_bytes = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ control operations
    def create(self, memory_id: str, owner: str | None = None) -> bool:
        """Create an empty memory; False if it already exists."""
        with self._lock:
            if memory_id in self._memories:
                return False
            if self.backing is not None:
                self.backing.create_memory(memory_id, owner)
            self._memories[memory_id] = Memory(memory_id, owner)
            return True

    def drop(self, memory_id: str) -> bool:
        with self._lock:
            memory = self._memories.pop(memory_id, None)
            if memory is None:
                return False
            if self.backing is not None:
                self.backing.drop_memory(memory_id)
            self._used_bytes -= memory.nbytes()
            return True

    def remove_document(self, memory_id: str, gid: int) -> bool:
        with self._lock:
            memory = self._require(memory_id)
            doc = memory.documents.pop(gid, None)
            if doc is None:
                return False
            if self.backing is not None:
                self.backing.remove_document(memory_id, gid)
            self._used_bytes -= doc.nbytes()
            memory.version += 1
            return True

    def commit_document(self, memory_id: str, doc: StoredDocument) -> None:
        """Make a fully pooled document visible to routing (all routed layers at once), after
        it is durable when the store has a backing."""
        with self._lock:
            memory = self._require(memory_id)
            if doc.gid in memory.documents:
                raise MemoryOperationError(f"document {doc.gid} already exists in memory {memory_id!r}", 409)
            size = doc.nbytes()
            if self._used_bytes + size > self.budget_bytes:
                raise MemoryOperationError(
                    f"memory budget exhausted: {self._used_bytes + size} bytes needed, "
                    f"memory_budget_mb allows {self.budget_bytes}", 507,
                )
            if self.backing is not None:
                self.backing.write_document(memory_id, doc)
            self._insert(memory, pack_document(doc))

    def restore(self, memories: dict[str, tuple[str | None, list[StoredDocument]]]) -> None:
        """Load memories read back from the backing (start-up): {id: (owner, documents)}."""
        with self._lock:
            for memory_id, (owner, docs) in memories.items():
                memory = self._memories.setdefault(memory_id, Memory(memory_id, owner))
                for doc in docs:
                    self._insert(memory, pack_document(doc))

    def _insert(self, memory: Memory, doc: StoredDocument) -> None:
        memory.documents[doc.gid] = doc
        memory.version += 1
        self._used_bytes += doc.nbytes()

    # ------------------------------------------------------------------ reads
    def exists(self, memory_id: str) -> bool:
        with self._lock:
            return memory_id in self._memories

    def owner(self, memory_id: str) -> str | None:
        with self._lock:
            return self._require(memory_id).owner

    def has_document(self, memory_id: str, gid: int) -> bool:
        with self._lock:
            memory = self._memories.get(memory_id)
            return memory is not None and gid in memory.documents

    def max_document_tokens(self, memory_id: str) -> int:
        with self._lock:
            return self._require(memory_id).max_document_tokens()

    def routing_view(self, memory_id: str, layer_id: int) -> RoutingView:
        """The memory's router keys in `layer_id`, rebuilt only after the memory changed."""
        with self._lock:
            memory = self._require(memory_id)
            if memory._views_version != memory.version:
                memory._views, memory._views_version = {}, memory.version
            view = memory._views.get(layer_id)
            if view is None:
                view = _build_view(memory, layer_id, self.chunk_size)
                memory._views[layer_id] = view
            return view

    def documents(self, memory_id: str, gids: list[int]) -> list[StoredDocument]:
        """Those of `gids` that are still in the memory, in order (a routing view taken earlier
        may name documents deleted since)."""
        with self._lock:
            memory = self._require(memory_id)
            return [memory.documents[gid] for gid in gids if gid in memory.documents]

    def contents(self) -> dict[str, list[int]]:
        """Every memory and its document ids."""
        with self._lock:
            return {memory_id: sorted(memory.documents) for memory_id, memory in self._memories.items()}

    def used_bytes(self) -> int:
        with self._lock:
            return self._used_bytes

    def stats(self, memory_id: str) -> dict:
        with self._lock:
            memory = self._require(memory_id)
            return {
                "documents": len(memory.documents),
                "tokens": sum(doc.num_tokens for doc in memory.documents.values()),
                "chunks": sum(doc.num_chunks for doc in memory.documents.values()),
                "bytes": memory.nbytes(),
            }

    def all_stats(self) -> dict[str, dict]:
        with self._lock:
            return {memory_id: self.stats(memory_id) for memory_id in self._memories}

    def _require(self, memory_id: str) -> Memory:
        memory = self._memories.get(memory_id)
        if memory is None:
            raise MemoryOperationError(f"memory {memory_id!r} does not exist", 404)
        return memory


def _build_view(memory: Memory, layer_id: int, chunk_size: int) -> RoutingView:
    gids = list(memory.documents)
    docs = [memory.documents[gid] for gid in gids]
    layout = chunk_layout([doc.num_tokens for doc in docs], chunk_size)
    parts = [doc.layers[layer_id] for doc in docs]
    if not parts:
        return RoutingView(gids=gids, router_keys=torch.zeros(0), layout=layout)
    quantized = [p.router_k_scale is not None for p in parts]
    if all(quantized):
        return RoutingView(gids=gids, router_keys=torch.cat([p.router_k for p in parts]), layout=layout,
                           router_key_scales=torch.cat([p.router_k_scale for p in parts]))
    if any(quantized):  # documents stored before and after a change of router_key_format
        plain_dtype = next(p.router_k.dtype for p in parts if p.router_k_scale is None)
        keys = [p.router_k if p.router_k_scale is None else
                (p.router_k.float() * p.router_k_scale.unsqueeze(-1)).to(plain_dtype) for p in parts]
        return RoutingView(gids=gids, router_keys=torch.cat(keys), layout=layout)
    return RoutingView(gids=gids, router_keys=torch.cat([p.router_k for p in parts]), layout=layout)
