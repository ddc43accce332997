"""The memory tiers: router keys on the device, document content on the device or in host memory.

Spec §8: routing reads every router key of a memory per query, so router keys always live in the
device's key pool; the content of documents (pooled K̄ / V̄, and full-resolution K / V in that
mode) is only read for the selected documents, so it can live in host memory and be copied to
the device for the selected documents only (gathered into pinned memory when a GPU is present,
so the copy is asynchronous). Each memory has a placement: `device`, `host`, or `auto` (the
device while its content pool has room, then the host). A document that fits nowhere is refused
with 507 and a message naming the budget.

Pools and their capacities (`TierCapacity`): the device budget (`memory_budget_mb`) holds the key
pool and the device content pools; the host budget (`host_memory_budget_mb`) holds the host
content pools. The key pool has a slot for every chunk of either tier, so
  host chunks   C_h = host budget / (content bytes per chunk)
  device chunks C_d = (device budget - C_h · key bytes per chunk) / (key + content bytes per chunk).
Under tensor parallelism over N ranks (`key_shards`) a rank keeps the router keys of about 1/N of
the chunks, plus one longest document of headroom: the formulas use key bytes / N per chunk, and
the headroom's keys at full size.
Full-resolution token pools get P slots per chunk slot (a document of n tokens has ceil(n/P)
chunks, so its tokens always fit when its chunks do).

Training-free models that route on the pooled keys themselves (router keys in the model's dtype)
keep K̄ only once: in the key pool, which the content then reads (spec: "without a decoupled
router, K̄ stays on the GPU and doubles as the routing key").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from sglang_msa.kernels.routing_scan import FP8_DTYPES, quantize_fp8
from sglang_msa.memory_manager.slot_pool import FieldSpec, SlotPool

logger = logging.getLogger(__name__)

Tier = Literal["device", "host"]
Placement = Literal["auto", "device", "host"]


class SlotsExhausted(Exception):
    """No tier the placement allows has room for a document (HTTP 507)."""


@dataclass(frozen=True)
class SlotLayout:
    """What every stored document holds per routed layer."""

    layers: tuple[int, ...]
    chunk_size: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype  # pooled and full-resolution K / V
    router_dtype: torch.dtype  # router keys (float8: with one float32 scale per chunk and KV head)
    router_is_pooled_k: bool  # router keys are the pooled keys: K̄ is stored once, in the key pool
    full: bool  # full-resolution K / V kept
    device: torch.device
    router_heads: int = 0  # KV heads of a router key (0: kv_heads); all the model's under tensor parallelism
    key_shards: int = 1  # ranks sharing router keys by document (Memory Parallel, `sharding.py`)
    max_document_chunks: int = 0  # a sharded key pool's headroom: one rank may hold one document more
    router_dim: int = 0  # dims of a router-key head (0: head_dim); a router adapter's may differ

    @property
    def router_key_heads(self) -> int:
        return self.router_heads or self.kv_heads

    @property
    def router_head_dim(self) -> int:
        return self.router_dim or self.head_dim

    @classmethod
    def of_document(cls, doc, chunk_size: int, router_key_format: str | None = None) -> "SlotLayout":
        """The layout a first document implies (a `store.StoredDocument`); `router_key_format`
        ("model" | "fp8", the serving option) overrides how that document stored its router keys."""
        layers = tuple(sorted(doc.layers))
        first = doc.layers[layers[0]]
        router_dtype, shared = first.router_k.dtype, first.router_k is first.pooled_k
        if router_key_format == "fp8":
            router_dtype, shared = torch.float8_e4m3fn, False
        elif router_key_format == "model" and router_dtype in FP8_DTYPES:
            router_dtype = first.pooled_k.dtype
        return cls(
            layers=layers, chunk_size=chunk_size, kv_heads=first.pooled_k.shape[1], head_dim=first.pooled_k.shape[2],
            v_head_dim=first.pooled_v.shape[2], dtype=first.pooled_k.dtype, router_dtype=router_dtype,
            router_is_pooled_k=shared, full=first.full_k is not None, device=first.pooled_k.device,
            router_heads=first.router_k.shape[1], router_dim=first.router_k.shape[2],
        )

    @property
    def quantized(self) -> bool:
        return self.router_dtype in FP8_DTYPES

    def key_fields(self) -> list[FieldSpec]:
        fields = [FieldSpec("router_k", (self.router_key_heads, self.router_head_dim), self.router_dtype)]
        if self.quantized:
            fields.append(FieldSpec("router_k_scale", (self.router_key_heads,), torch.float32))
        return fields

    def chunk_fields(self) -> list[FieldSpec]:
        fields = [] if self.router_is_pooled_k else [FieldSpec("pooled_k", (self.kv_heads, self.head_dim), self.dtype)]
        return [*fields, FieldSpec("pooled_v", (self.kv_heads, self.v_head_dim), self.dtype)]

    def token_fields(self) -> list[FieldSpec]:
        return [FieldSpec("full_k", (self.kv_heads, self.head_dim), self.dtype),
                FieldSpec("full_v", (self.kv_heads, self.v_head_dim), self.dtype)]

    def key_bytes_per_chunk(self) -> int:
        return len(self.layers) * sum(spec.row_bytes() for spec in self.key_fields())

    def content_bytes_per_chunk(self) -> int:
        """Content of one chunk slot, with its P full-resolution token slots in that mode."""
        chunk = sum(spec.row_bytes() for spec in self.chunk_fields())
        tokens = self.chunk_size * sum(spec.row_bytes() for spec in self.token_fields()) if self.full else 0
        return len(self.layers) * (chunk + tokens)


@dataclass(frozen=True)
class TierCapacity:
    device_chunks: int
    host_chunks: int
    key_chunks: int  # router-key slots: every chunk of either tier, or this rank's share when sharded

    @classmethod
    def from_budgets(cls, layout: SlotLayout, device_bytes: int, host_bytes: int) -> "TierCapacity":
        """With router keys sharded over S ranks, each rank keeps about 1/S of the chunks' keys
        (documents go to the rank with the fewest), plus one longest document of headroom."""
        key, content, shards = layout.key_bytes_per_chunk(), layout.content_bytes_per_chunk(), layout.key_shards
        headroom = layout.max_document_chunks if shards > 1 else 0
        key_share = -(-key // shards)  # a chunk's router keys, amortised over the ranks
        host_chunks = host_bytes // content
        keys_of_host_chunks = host_chunks * key_share + headroom * key
        if keys_of_host_chunks > device_bytes:
            raise ValueError(
                f"sglang-msa: host_memory_budget_mb holds {host_chunks} chunks whose router keys need "
                f"{keys_of_host_chunks / 2**20:.0f} MiB on the device, more than memory_budget_mb "
                f"({device_bytes / 2**20:.0f} MiB); raise memory_budget_mb or lower host_memory_budget_mb"
            )
        device_chunks = (device_bytes - keys_of_host_chunks) // (key_share + content)
        key_chunks = device_chunks + host_chunks if shards == 1 else -(-(device_chunks + host_chunks) // shards) + headroom
        return cls(device_chunks=device_chunks, host_chunks=host_chunks, key_chunks=key_chunks)


@dataclass(frozen=True)
class DocumentSlots:
    """Where one stored document lives."""

    gid: int
    num_tokens: int
    num_chunks: int
    tier: Tier
    key_slots: torch.Tensor  # [num_chunks] int64 slots of the key pool (device); empty where another rank routes it
    chunk_slots: torch.Tensor  # [num_chunks] slots of the tier's chunk-content pool
    token_slots: torch.Tensor | None  # [num_tokens] slots of the tier's token pool (full resolution)
    router_rank: int = 0  # the rank holding its router keys (Memory Parallel); 0 with one rank

    @property
    def holds_keys(self) -> bool:
        return self.key_slots.numel() > 0


class MemorySlots:
    """The key pool and each tier's content pools of one store."""

    def __init__(self, layout: SlotLayout, device_budget_bytes: int, host_budget_bytes: int):
        self.layout = layout
        self.capacity = TierCapacity.from_budgets(layout, device_budget_bytes, host_budget_bytes)
        device, host = layout.device, torch.device("cpu")
        pin = device.type == "cuda" and torch.cuda.is_available()
        chunks = {"device": self.capacity.device_chunks, "host": self.capacity.host_chunks}
        self.keys = SlotPool("keys", self.capacity.key_chunks, layout.layers, layout.key_fields(), device)
        self.chunk_pools = {
            tier: SlotPool(f"{tier} chunks", chunks[tier], layout.layers, layout.chunk_fields(),
                           device if tier == "device" else host, pin_reads=pin and tier == "host")
            for tier in ("device", "host")
        }
        self.token_pools = {
            tier: SlotPool(f"{tier} tokens", chunks[tier] * layout.chunk_size, layout.layers, layout.token_fields(),
                           device if tier == "device" else host, pin_reads=pin and tier == "host")
            for tier in ("device", "host")
        } if layout.full else {}
        logger.warning(
            "sglang-msa: memory slots for %d routed layers: device %.0f MiB (router keys of %d chunks, content of "
            "%d chunks = %d tokens), host %.0f MiB (content of %d chunks = %d tokens)",
            len(layout.layers), self.tier_nbytes("device") / 2**20, self.capacity.key_chunks,
            chunks["device"], chunks["device"] * layout.chunk_size, self.tier_nbytes("host") / 2**20,
            chunks["host"], chunks["host"] * layout.chunk_size,
        )

    def tier_nbytes(self, tier: Tier) -> int:
        """Bytes the tier's content pools take (and, for the device, the key pool)."""
        pools = [self.chunk_pools[tier], *([self.token_pools[tier]] if self.token_pools else [])]
        return sum(pool.nbytes() for pool in pools) + (self.keys.nbytes() if tier == "device" else 0)

    # ------------------------------------------------------------------ placing documents
    def place(self, gid: int, num_tokens: int, num_chunks: int, placement: Placement,
              router_rank: int = 0, holds_keys: bool = True) -> DocumentSlots:
        """Slots for a document in the first tier the placement allows that has room (router-key
        slots only where this rank routes it: `holds_keys`)."""
        tiers: list[Tier] = ["device", "host"] if placement == "auto" else [placement]
        for tier in tiers:
            slots = self._alloc(tier, num_tokens, num_chunks, holds_keys)
            if slots is not None:
                return DocumentSlots(gid, num_tokens, num_chunks, tier, *slots, router_rank=router_rank)
        raise SlotsExhausted(self._exhausted_message(num_chunks, placement))

    def _alloc(self, tier: Tier, num_tokens: int, num_chunks: int, holds_keys: bool):
        chunk_pool = self.chunk_pools[tier]
        token_pool = self.token_pools.get(tier)
        key_chunks = num_chunks if holds_keys else 0
        if chunk_pool.available() < num_chunks or self.keys.available() < key_chunks or (
            token_pool is not None and token_pool.available() < num_tokens
        ):
            return None
        key_slots, chunk_slots = self.keys.alloc(key_chunks), chunk_pool.alloc(num_chunks)
        token_slots = token_pool.alloc(num_tokens) if token_pool is not None else None
        return key_slots, chunk_slots, token_slots

    def _exhausted_message(self, num_chunks: int, placement: Placement) -> str:
        free = {tier: pool.available() for tier, pool in self.chunk_pools.items()}
        return (
            f"memory budget exhausted: the document needs {num_chunks} chunk slots per routed layer; free: "
            f"{free['device']} on the device (memory_budget_mb), {free['host']} in host memory "
            f"(host_memory_budget_mb); the memory's placement is {placement!r}"
        )

    def release(self, doc: DocumentSlots) -> None:
        if doc.holds_keys:
            self.keys.free(doc.key_slots)
        self.chunk_pools[doc.tier].free(doc.chunk_slots)
        if doc.token_slots is not None:
            self.token_pools[doc.tier].free(doc.token_slots)

    def nbytes(self, doc: DocumentSlots) -> dict[Tier, int]:
        """The document's bytes per tier (its router keys count on the device)."""
        key = doc.key_slots.numel() * self.keys.slot_bytes()
        content = doc.num_chunks * self.chunk_pools[doc.tier].slot_bytes()
        if doc.token_slots is not None:
            content += doc.num_tokens * self.token_pools[doc.tier].slot_bytes()
        return {"device": key + content, "host": 0} if doc.tier == "device" else {"device": key, "host": content}

    # ------------------------------------------------------------------ tensors in and out
    def write(self, doc: DocumentSlots, layers: dict) -> None:
        """Store a document's `store.LayerTensors` per routed layer at its slots."""
        if doc.holds_keys:
            self._write_keys(doc, layers)
        content = [(self.chunk_pools[doc.tier], doc.chunk_slots)]
        if doc.token_slots is not None:
            content.append((self.token_pools[doc.tier], doc.token_slots))
        for pool, slots in content:  # every field the pool holds, from the LayerTensors field of that name
            for name in pool.fields:
                pool.write(name, slots, {layer: getattr(parts, name) for layer, parts in layers.items()})

    def _write_keys(self, doc: DocumentSlots, layers: dict) -> None:
        layout = self.layout
        router_k, scales = {}, {}
        for layer, parts in layers.items():
            keys = parts.pooled_k if layout.router_is_pooled_k else parts.router_k
            keys_scale = None if keys is parts.pooled_k else parts.router_k_scale
            if layout.quantized and keys_scale is None:
                keys, keys_scale = quantize_fp8(keys, layout.router_dtype)
            elif not layout.quantized and keys_scale is not None:  # stored as float8 under another setting
                keys = keys.float() * keys_scale.unsqueeze(-1)
            router_k[layer], scales[layer] = keys, keys_scale
        self.keys.write("router_k", doc.key_slots, router_k)
        if layout.quantized:
            self.keys.write("router_k_scale", doc.key_slots, scales)

    def read_keys(self, layer: int, key_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Router keys (and float8 scales) at `key_slots` in `layer`."""
        scales = self.keys.read("router_k_scale", layer, key_slots) if self.layout.quantized else None
        return self.keys.read("router_k", layer, key_slots), scales

    def read_content(self, docs: list[DocumentSlots], layer: int, content: str,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows of `docs` in `layer`, back to back in their order, on `device`: pooled
        chunks, or full-resolution tokens (`content="full"`). Host-tier rows are gathered into
        pinned host memory and copied to the device asynchronously."""
        parts_k, parts_v = [], []
        for run in _runs_by_tier(docs):
            tier = run[0].tier
            if content == "full":
                pool, slots = self.token_pools[tier], torch.cat([doc.token_slots for doc in run])
                k, v = pool.read("full_k", layer, slots), pool.read("full_v", layer, slots)
            else:
                pool, slots = self.chunk_pools[tier], torch.cat([doc.chunk_slots for doc in run])
                v = pool.read("pooled_v", layer, slots)
                if self.layout.router_is_pooled_k:
                    k = self.keys.read("router_k", layer, torch.cat([doc.key_slots for doc in run]))
                else:
                    k = pool.read("pooled_k", layer, slots)
            parts_k.append(_to_device(k, device))
            parts_v.append(_to_device(v, device))
        return torch.cat(parts_k), torch.cat(parts_v)

    def content_in_place(self, docs: list[DocumentSlots], layer: int,
                         content: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`layer`'s K and V buffers and the slots of `docs`' rows in them, back to back, when the
        rows can be read in place: every document on the device tier, K and V in one pool (not so
        for pooled content routed on K̄ itself, whose K̄ is in the key pool and V̄ in a chunk pool)."""
        if not docs or any(doc.tier != "device" for doc in docs):
            return None
        if content == "full":
            pool, slots, names = self.token_pools["device"], [doc.token_slots for doc in docs], ("full_k", "full_v")
        elif self.layout.router_is_pooled_k:
            return None
        else:
            pool, slots, names = self.chunk_pools["device"], [doc.chunk_slots for doc in docs], ("pooled_k", "pooled_v")
        return pool.layer_buffer(names[0], layer), pool.layer_buffer(names[1], layer), torch.cat(slots)

    def read_document(self, doc: DocumentSlots, layers: tuple[int, ...]) -> dict:
        """The document's tensors per layer, as `store.LayerTensors` fields (copies)."""
        result = {}
        for layer in layers:
            router_k, scale = self.read_keys(layer, doc.key_slots)
            pool = self.chunk_pools[doc.tier]
            pooled_k = router_k if self.layout.router_is_pooled_k else pool.read("pooled_k", layer, doc.chunk_slots)
            parts = {"pooled_k": pooled_k, "pooled_v": pool.read("pooled_v", layer, doc.chunk_slots),
                     "router_k": router_k, "router_k_scale": scale}
            if doc.token_slots is not None:
                tokens = self.token_pools[doc.tier]
                parts["full_k"] = tokens.read("full_k", layer, doc.token_slots)
                parts["full_v"] = tokens.read("full_v", layer, doc.token_slots)
            result[layer] = parts
        return result


def _runs_by_tier(docs: list[DocumentSlots]) -> list[list[DocumentSlots]]:
    runs: list[list[DocumentSlots]] = []
    for doc in docs:
        if runs and runs[-1][0].tier == doc.tier:
            runs[-1].append(doc)
        else:
            runs.append([doc])
    return runs


def _to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows gathered by a pool, on `device`: from pinned host memory without blocking the host,
    on the current stream (`memory_ops.read_selection`'s side stream when serving on a GPU)."""
    if rows.device == torch.device(device):
        return rows
    return rows.to(device, non_blocking=rows.is_pinned())
