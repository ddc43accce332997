"""Memory slots: where memory documents' tensors live, addressed by slot like SGLang's token KV pool.

One pooled chunk is one slot (design.md §1): a pooled K̄ row has the shape of one token's K,
`[kv_heads, head_dim]`. A `SlotPool` holds, for the routed layers only, one buffer per field
(`[routed layers, capacity + 1, *row]`; slot 0 is padding, as in SGLang's pools) and hands out
slots through SGLang's own allocator (`TokenToKVPoolAllocator`: a sorted free list and a list
of slots freed since, from whose heads the lowest free slots are taken, so the pool stays packed
at its low end and host memory is touched only up to the peak in use). Adding a document
allocates its slots, deleting it frees them: no compaction, and any free slot serves any
document, so a pool never refuses a document while it has as many free slots as it needs.

Buffers are allocated once, at their full capacity: when the backend starts (from the KV pool's
shapes), or with a store's first document when nothing reserved them; `torch.empty`, so host
memory is committed by the pages written, and the device budget is the one the plugin takes out
of SGLang's `mem_fraction_static`. Host buffers are pageable: pinning them would lock the whole
capacity at start-up (and PyTorch's pinned allocator rounds each buffer up to a power of two);
only the rows a read gathers land in pinned memory (`pin_reads`), which is what the
asynchronous copy to a GPU needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FieldSpec:
    """One tensor per slot and routed layer: its row shape (without the slot) and dtype."""

    name: str
    row_shape: tuple[int, ...]
    dtype: torch.dtype

    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize


class SlotPool:
    """Per-field buffers of `capacity` slots in every routed layer, with SGLang's slot allocator."""

    def __init__(self, name: str, capacity: int, layers: tuple[int, ...], fields: list[FieldSpec],
                 device: torch.device, pin_reads: bool = False):
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

        self.name = name
        self.capacity = capacity
        self.layer_index = {layer: i for i, layer in enumerate(layers)}
        self.fields = {spec.name: spec for spec in fields}
        self.device = torch.device(device)
        self.pin_reads = pin_reads
        try:
            self.buffers = {
                spec.name: torch.empty((len(layers), capacity + 1, *spec.row_shape), dtype=spec.dtype, device=device)
                for spec in fields
            }
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            need = sum(spec.row_bytes() for spec in fields) * len(layers) * (capacity + 1)
            raise MemoryError(
                f"sglang-msa: cannot reserve {need / 2**20:.0f} MiB for the {name} memory slots on {device}: "
                f"lower memory_budget_mb / host_memory_budget_mb ({exc})"
            ) from exc
        # slot indices are bookkeeping: they stay on the host; kernels get them per memory version
        self.allocator = TokenToKVPoolAllocator(capacity, torch.int64, "cpu", kvcache=None, need_sort=True)

    def slot_bytes(self) -> int:
        """Bytes one slot holds over all routed layers and fields."""
        return len(self.layer_index) * sum(spec.row_bytes() for spec in self.fields.values())

    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers.values())

    def available(self) -> int:
        return self.allocator.available_size()

    def alloc(self, count: int) -> torch.Tensor | None:
        """The `count` lowest free slots (int64, on the host), or None when fewer are free."""
        if count == 0:
            return torch.empty(0, dtype=torch.int64)
        if self.available() < count:
            return None
        free, released = self.allocator.free_pages, self.allocator.release_pages
        if len(released):
            # the allocator's free list stays sorted; slots freed since wait in its release list.
            # The lowest `count` of both come from the heads of the two: no sort of the whole free
            # list (SGLang's merge_and_sort_free), which took 24 ms per document added after a
            # deletion in a pool of 1.5M slots
            released = torch.sort(released).values
            lowest = torch.sort(torch.cat((free[:count], released[:count]))).values[:count].clone()
            from_free = int(torch.searchsorted(free[:count], lowest[-1:], right=True))
            self.allocator.free_pages, self.allocator.release_pages = free[from_free:], released[count - from_free:]
            return lowest
        # a view of the allocator's whole free list: a copy, or every document would keep a
        # free list of the pool's size alive
        return self.allocator.alloc(count).clone()

    def free(self, slots: torch.Tensor) -> None:
        self.allocator.free(slots)

    def write(self, name: str, slots: torch.Tensor, rows_per_layer: dict[int, torch.Tensor]) -> None:
        """Store `rows_per_layer[layer]` ([len(slots), *row]) at `slots` of every routed layer."""
        buffer = self.buffers[name]
        index = slots.to(self.device)
        for layer, rows in rows_per_layer.items():
            rows = rows.to(device=self.device, dtype=buffer.dtype)
            _bytes_of(buffer[self.layer_index[layer]]).index_copy_(0, index, _bytes_of(rows))

    def read(self, name: str, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """The rows at `slots` in `layer` (a copy, on the pool's device; in pinned memory with
        `pin_reads`, so that the copy to a GPU does not block the host)."""
        buffer = _bytes_of(self.buffers[name][self.layer_index[layer]])
        out = torch.empty((slots.shape[0], *buffer.shape[1:]), dtype=buffer.dtype, device=self.device,
                          pin_memory=self.pin_reads)
        torch.index_select(buffer, 0, slots.to(self.device), out=out)
        return out.view(self.fields[name].dtype)

    def layer_buffer(self, name: str, layer: int) -> torch.Tensor:
        """The whole `[capacity + 1, *row]` buffer of one layer (kernels read it through slots)."""
        return self.buffers[name][self.layer_index[layer]]


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """float8 tensors as their bytes (torch has no float8 index_copy / index_select on a CPU)."""
    return tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor
