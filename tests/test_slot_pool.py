"""Memory slots (`memory_manager/slot_pool.py`, `tiers.py`) through the store: documents take slots
of SGLang's allocator and give them back, churn never fragments (a document fits whenever enough
slots are free) and never grows the process past its peak, every tier returns exactly what was
written, placements decide the tier, and a full tier is refused with the budget named."""

from __future__ import annotations

import dataclasses
import random
import pytest
import torch

from sglang_msa.kernels import reference as ref
from sglang_msa.kernels.routing_scan import quantize_fp8
from sglang_msa.memory_manager.store import LayerTensors, MemoryOperationError, MemoryStore, StoredDocument
from sglang_msa.memory_manager.tiers import SlotLayout, TierCapacity

HKV, D, CHUNK, LAYERS = 2, 8, 4, (1, 3)


def document(gid: int, n: int, gen: torch.Generator, *, full: bool = False, router: bool | str = True,
             dtype=torch.float32) -> StoredDocument:
    """router: True (own router keys), False (the pooled keys route), "fp8" (float8 router keys)."""
    chunks = -(-n // CHUNK)
    layers = {}
    for layer in LAYERS:
        pooled_k = torch.randn(chunks, HKV, D, generator=gen).to(dtype)
        router_k, scale = (torch.randn(chunks, HKV, D, generator=gen).to(dtype) if router else pooled_k), None
        if router == "fp8":
            router_k, scale = quantize_fp8(router_k)
        layers[layer] = LayerTensors(
            pooled_k=pooled_k, pooled_v=torch.randn(chunks, HKV, D, generator=gen).to(dtype), router_k=router_k,
            full_k=torch.randn(n, HKV, D, generator=gen).to(dtype) if full else None,
            full_v=torch.randn(n, HKV, D, generator=gen).to(dtype) if full else None, router_k_scale=scale,
        )
    return StoredDocument(gid=gid, num_tokens=n, num_chunks=chunks, layers=layers)


def layout_of(doc: StoredDocument) -> SlotLayout:
    return SlotLayout.of_document(doc, CHUNK)


def budget_for(doc: StoredDocument, chunks: int, host_chunks: int = 0) -> tuple[int, int]:
    """(device, host) budgets holding exactly `chunks` device chunks and `host_chunks` host chunks."""
    layout = layout_of(doc)
    key, content = layout.key_bytes_per_chunk(), layout.content_bytes_per_chunk()
    return chunks * (key + content) + host_chunks * key, host_chunks * content


def assert_same(stored: StoredDocument, back: StoredDocument) -> None:
    for layer in LAYERS:
        for name in ("pooled_k", "pooled_v", "router_k", "full_k", "full_v", "router_k_scale"):
            want, got = getattr(stored.layers[layer], name), getattr(back.layers[layer], name)
            assert (want is None) == (got is None), name
            if want is not None:
                assert want.dtype == got.dtype and torch.equal(want.float(), got.float()), (layer, name)


@pytest.mark.parametrize("full,router", [(False, True), (True, False), (False, "fp8")])
def test_churn_never_fragments_and_every_document_reads_back_exactly(full, router):
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    probe = document(0, 1, gen, full=full, router=router)
    capacity = 60
    store = MemoryStore(*budget_for(probe, capacity)[:1], CHUNK)
    store.create("m")
    live: dict[int, StoredDocument] = {}
    refused = 0
    for gid in range(400):
        doc = document(gid, rng.randint(1, 9 * CHUNK), gen, full=full, router=router)
        free = store.capacity().get("chunk_slots", {"device": {"free": capacity}})["device"]["free"]
        try:
            store.commit_document("m", doc)
            live[gid] = doc
            assert free >= doc.num_chunks
        except MemoryOperationError as exc:  # refused only when too few slots are free: no fragmentation
            assert exc.status == 507 and free < doc.num_chunks, (free, doc.num_chunks)
            assert "memory_budget_mb" in str(exc)
            refused += 1
        while len(live) > 10 or (live and rng.random() < 0.2):
            gone = rng.choice(sorted(live))
            assert store.remove_document("m", gone)
            del live[gone]
    assert refused > 0  # the churn did fill the pool
    for placed in store.documents("m", sorted(live)):  # slots of their own, not views of a free list
        for slots in (placed.key_slots, placed.chunk_slots, placed.token_slots):
            assert slots is None or slots.untyped_storage().nbytes() == slots.numel() * slots.element_size()
    for gid, doc in live.items():
        assert_same(doc, store.document_tensors("m", gid))
    stats = store.stats("m")
    assert stats["chunks"] == sum(doc.num_chunks for doc in live.values())
    assert store.used_bytes() == stats["bytes"] == stats["device_bytes"] > 0
    store.drop("m")
    assert store.capacity()["chunk_slots"]["device"]["free"] == capacity and store.used_bytes() == 0


def test_the_routing_view_reads_keys_through_slots_in_document_order():
    gen = torch.Generator().manual_seed(4)
    store = MemoryStore(1 << 24, CHUNK)
    store.create("a")
    store.create("b")
    docs = {gid: document(gid, n, gen) for gid, n in enumerate((9, 4, 13, 7, 5))}
    for gid, doc in docs.items():  # interleaved with another memory: a's slots are not contiguous
        store.commit_document("a", doc)
        store.commit_document("b", document(gid, 6, gen))
    store.remove_document("a", 1)
    view = store.routing_view("a", 3)
    assert view.gids == [0, 2, 3, 4]
    torch.testing.assert_close(view.router_keys, torch.cat([docs[g].layers[3].router_k for g in view.gids]),
                               rtol=0, atol=0)
    assert view.layout.doc_chunk_start.tolist() == ref.chunk_layout([9, 13, 7, 5], CHUNK).doc_chunk_start.tolist()
    table = view.key_table()  # what the Triton scan reads: the pool's buffer through the view's slots
    torch.testing.assert_close(table.keys[table.chunk_slot.long()], view.router_keys, rtol=0, atol=0)


def test_placements_choose_the_tier_and_a_full_tier_is_refused_with_its_budget():
    gen = torch.Generator().manual_seed(5)
    probe = document(0, 1, gen, full=True, router=False)
    device_budget, host_budget = budget_for(probe, chunks=4, host_chunks=6)
    store = MemoryStore(device_budget, CHUNK, host_budget_bytes=host_budget)
    store.create("dev", placement="device")
    store.create("host", placement="host")
    store.create("auto")
    layout = layout_of(probe)
    a = document(0, 3 * CHUNK, gen, full=True, router=False)  # 3 chunks: the device has 4
    store.commit_document("dev", a)
    with pytest.raises(MemoryOperationError) as refused:
        store.commit_document("dev", document(1, 2 * CHUNK, gen, full=True, router=False))
    assert refused.value.status == 507 and "'device'" in str(refused.value)
    b = document(0, 2 * CHUNK + 1, gen, full=True, router=False)  # 3 chunks on the host
    store.commit_document("host", b)
    c = document(0, CHUNK, gen, full=True, router=False)  # fits the device's last chunk
    d = document(1, 2 * CHUNK, gen, full=True, router=False)  # the device is full: spills to the host
    store.commit_document("auto", c)
    store.commit_document("auto", d)
    with pytest.raises(MemoryOperationError) as full:
        store.commit_document("auto", document(2, 2 * CHUNK, gen, full=True, router=False))
    assert full.value.status == 507 and "host_memory_budget_mb" in str(full.value)
    key = layout.key_bytes_per_chunk()
    chunk = len(LAYERS) * sum(spec.row_bytes() for spec in layout.chunk_fields())  # V̄ (K̄ is the router key)
    token = len(LAYERS) * sum(spec.row_bytes() for spec in layout.token_fields())  # full K, V
    assert (chunk, token) == (len(LAYERS) * HKV * D * 4, 2 * len(LAYERS) * HKV * D * 4)
    assert store.stats("host")["device_bytes"] == 3 * key  # router keys stay on the device
    assert store.stats("host")["host_bytes"] == 3 * chunk + 9 * token  # its tokens, not 3 whole chunks
    assert store.stats("auto")["device_bytes"] == 3 * key + chunk + 4 * token
    assert store.stats("auto")["host_bytes"] == 2 * chunk + 8 * token
    # content of both tiers, in the selection's order
    for kind, name_k, name_v in (("full", "full_k", "full_v"), ("pooled", "pooled_k", "pooled_v")):
        keys, values = store.content(store.documents("auto", [1, 0]), 3, kind, torch.device("cpu"))
        torch.testing.assert_close(keys, torch.cat([getattr(d.layers[3], name_k), getattr(c.layers[3], name_k)]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(values, torch.cat([getattr(d.layers[3], name_v), getattr(c.layers[3], name_v)]),
                                   rtol=0, atol=0)
    assert_same(b, store.document_tensors("host", 0))
    with pytest.raises(MemoryOperationError) as no_host:
        MemoryStore(device_budget, CHUNK).create("x", placement="host")
    assert no_host.value.status == 422 and "host_memory_budget_mb" in str(no_host.value)


def test_routing_on_pooled_keys_stores_them_once():
    gen = torch.Generator().manual_seed(6)
    shared, own = layout_of(document(0, 5, gen, router=False)), layout_of(document(0, 5, gen, router=True))
    assert shared.router_is_pooled_k and not own.router_is_pooled_k
    row = HKV * D * 4 * len(LAYERS)
    assert (shared.key_bytes_per_chunk(), shared.content_bytes_per_chunk()) == (row, row)  # K̄R = K̄, V̄
    assert (own.key_bytes_per_chunk(), own.content_bytes_per_chunk()) == (row, 2 * row)  # K̄R, then K̄ and V̄


def test_a_host_budget_whose_keys_do_not_fit_the_device_is_refused():
    probe = document(0, 4, torch.Generator().manual_seed(7))
    layout = layout_of(probe)
    from sglang_msa.memory_manager.tiers import TierCapacity

    with pytest.raises(ValueError, match="host_memory_budget_mb"):
        TierCapacity.from_budgets(layout, device_bytes=layout.key_bytes_per_chunk() * 9,
                                  host_bytes=layout.content_bytes_per_chunk() * 10)


def test_a_router_key_format_change_converts_documents_to_the_store_format():
    gen = torch.Generator().manual_seed(8)
    store = MemoryStore(1 << 24, CHUNK, router_key_format="fp8")
    store.create("m")
    plain = document(0, 9, gen)
    store.commit_document("m", plain)
    stored = store.document_tensors("m", 0).layers[1]
    assert stored.router_k.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(stored.router_k.float() * stored.router_k_scale.unsqueeze(-1),
                               plain.layers[1].router_k, rtol=0.07, atol=1e-3)
    back = MemoryStore(1 << 24, CHUNK, router_key_format="model")
    back.create("m")
    back.commit_document("m", document(0, 9, gen, router="fp8"))
    assert back.document_tensors("m", 0).layers[1].router_k.dtype == torch.float32


def test_churn_reuses_the_lowest_slots_instead_of_walking_the_pool():
    """A large pool, ~12 documents live while 300 come and go: documents take the lowest free
    slots, so the pool's touched part (host memory pages, device locality) stays near the peak in
    use instead of walking through the whole pool."""
    rng, gen = random.Random(9), torch.Generator().manual_seed(9)
    store = MemoryStore(1 << 28, CHUNK)
    store.create("m")
    live, peak_chunks, highest = [], 0, 0
    for gid in range(300):
        store.commit_document("m", document(gid, rng.randint(1, 40 * CHUNK), gen, full=True, router=False))
        live.append(gid)
        placed = store.documents("m", [gid])[0]
        highest = max(highest, int(placed.key_slots.max()), int(placed.chunk_slots.max()))
        peak_chunks = max(peak_chunks, store.stats("m")["chunks"])
        if len(live) > 12:
            store.remove_document("m", live.pop(rng.randrange(len(live))))
    capacity = store.capacity()["chunk_slots"]["device"]["total"]
    assert capacity > 20 * peak_chunks  # the walk would have reached far beyond the peak
    assert highest <= 1.25 * peak_chunks, (highest, peak_chunks)


def test_a_pool_always_hands_out_its_lowest_free_slots():
    """Random allocations and frees against a plain set of free slots: every allocation is the
    `count` lowest free slots, in order, and nothing is handed out twice or lost."""
    from sglang_msa.memory_manager.slot_pool import FieldSpec, SlotPool

    rng = random.Random(4)
    pool = SlotPool("t", 500, (0,), [FieldSpec("v", (1,), torch.float32)], "cpu")
    free, held = set(range(1, 501)), []  # slot 0 is padding
    for _ in range(2000):
        if held and (rng.random() < 0.45 or len(free) < 40):
            slots = held.pop(rng.randrange(len(held)))
            pool.free(torch.tensor(slots, dtype=torch.int64))
            free.update(slots)
        else:
            count = rng.randint(1, 40)
            slots = pool.alloc(count)
            assert slots.tolist() == sorted(free)[:count]
            free.difference_update(slots.tolist())
            held.append(slots.tolist())
        assert pool.available() == len(free)
    assert pool.alloc(len(free) + 1) is None and pool.available() == len(free)


def test_msa_4b_bytes_per_token_are_the_specs():
    """Spec §8 (18 routed layers, 8 KV heads, d = 128, bf16, P = 64): router keys 576 B per
    token on the device, content 1,152 B wherever the memory is placed."""
    layout = SlotLayout(layers=tuple(range(18, 36)), chunk_size=64, kv_heads=8, head_dim=128, v_head_dim=128,
                        dtype=torch.bfloat16, router_dtype=torch.bfloat16, router_is_pooled_k=False, full=False,
                        device=torch.device("cpu"))
    assert layout.key_bytes_per_chunk() / 64 == 576 and layout.content_bytes_per_chunk() / 64 == 1152


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("device_mb, host_mb", [(256, 0), (160, 256)])
def test_sharded_key_pools_stay_within_the_device_budget(shards, device_mb, host_mb):
    """Under --tp N a rank keeps its heads of the content and about 1/N of the router keys (all
    heads) plus one longest document of headroom: the pools it reserves never exceed the
    budgets, and the content the group can hold grows with N."""
    layout = SlotLayout(layers=tuple(range(18)), chunk_size=64, kv_heads=8 // shards, head_dim=128, v_head_dim=128,
                        dtype=torch.bfloat16, router_dtype=torch.bfloat16, router_is_pooled_k=False, full=False,
                        device=torch.device("cpu"), router_heads=8, key_shards=shards, max_document_chunks=64)
    capacity = TierCapacity.from_budgets(layout, device_mb << 20, host_mb << 20)
    device_use = capacity.key_chunks * layout.key_bytes_per_chunk() + capacity.device_chunks * layout.content_bytes_per_chunk()
    assert device_use <= device_mb << 20
    assert capacity.host_chunks * layout.content_bytes_per_chunk() <= host_mb << 20
    if shards > 1:
        single = TierCapacity.from_budgets(dataclasses.replace(layout, kv_heads=8, key_shards=1, max_document_chunks=0),
                                           device_mb << 20, host_mb << 20)
        assert capacity.device_chunks + capacity.host_chunks > 1.5 * (single.device_chunks + single.host_chunks)


class OneRankOf:
    """Rank 0's view of a group of `size` ranks that always agree (each rank places alike)."""

    def __init__(self, size: int):
        self.rank, self.size = 0, size

    def agree(self, ok: bool) -> bool:
        return ok


@pytest.mark.parametrize("shards", [2, 4])
def test_a_sharded_rank_never_runs_out_of_key_slots_before_content_slots(shards):
    """Documents of 1..16 chunks added and deleted at random: the rank's router-key pool (its
    share plus one document of headroom) never refuses a document its content pools can hold."""
    chunk, max_chunks = 4, 16
    rng = random.Random(shards)
    store = MemoryStore(64 << 10, chunk, shard=OneRankOf(shards))
    store.reserve(SlotLayout(layers=(0, 1), chunk_size=chunk, kv_heads=1, head_dim=8, v_head_dim=8,
                             dtype=torch.float32, router_dtype=torch.float32, router_is_pooled_k=False, full=False,
                             device=torch.device("cpu"), router_heads=shards, key_shards=shards,
                             max_document_chunks=max_chunks))
    store.create("m")
    content = store.slots.chunk_pools["device"]
    live, gid, refused = [], 0, 0
    for _ in range(3000):
        if live and rng.random() < 0.4:
            store.remove_document("m", live.pop(rng.randrange(len(live))))
            continue
        chunks = rng.randint(1, max_chunks)
        layers = {layer: LayerTensors(pooled_k=torch.zeros(chunks, 1, 8), pooled_v=torch.zeros(chunks, 1, 8),
                                      router_k=torch.zeros(chunks, shards, 8)) for layer in (0, 1)}
        try:
            store.commit_document("m", StoredDocument(gid=gid, num_tokens=chunks * chunk, num_chunks=chunks,
                                                      layers=layers))
            live.append(gid)
        except MemoryOperationError:
            refused += 1
            assert content.available() < chunks  # refused only when the content is full, never for keys
        gid += 1
    assert refused > 0 and store.stats("m")["routed_documents"] < len(live)  # it filled up; others route some


