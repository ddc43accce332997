"""Run under TRITON_INTERPRET=1 (set by tests/test_kernels.py), or on a GPU at real shapes
(benchmarks/gpu_check.sh): a query's selection read through the store (`memory_ops.route`, the
Triton scan) from device-tier and host-tier memories holding the same documents. Both tiers must
select the same documents, the top-k of the pure-PyTorch scores on the CPU up to near-ties
(scores within a tolerance of the reference, none below the reference's k-th score by more), and
the rows must be exactly the stored ones. On a GPU the rows are gathered on a side stream
(host-tier rows copied from pinned memory) and read on the current stream after `gathered()`."""

from __future__ import annotations

import torch
from check_main import run_checks

from sglang_msa.attention_backend import memory_ops
from sglang_msa.config import MSAOptions
from sglang_msa.memory_manager.store import LayerTensors, MemoryStore, StoredDocument
from sglang_msa.memory_manager.tiers import SlotLayout

TINY = [  # (layers, kv heads, head dim, document lengths, chunk size, top-k, own router keys, content)
    ((2, 3), 2, 8, [5, 9, 3, 12, 1], 4, 3, True, "pooled"),
    ((1,), 1, 16, [7, 8, 20], 4, 5, False, "pooled"),  # training-free, k > documents
    ((0, 2), 2, 8, [6, 13, 2, 9], 4, 2, True, "full"),
]
REAL = [  # MSA-4B-like: 8 KV heads, d = 128, P = 64; full-resolution content makes the copies large
    ((18, 19), 8, 128, [4096] * 24 + [1000, 64, 1, 8191], 64, 16, True, "pooled"),
    ((18,), 8, 128, [4096] * 24 + [1000, 64, 1, 8191], 64, 16, True, "full"),
    ((15, 16), 3, 64, [256] * 300 + [70], 64, 16, False, "pooled"),
]


def documents(layers, kv_heads, dim, lengths, chunk, own_router, content, gen) -> list[StoredDocument]:
    docs = []
    for gid, length in enumerate(lengths):
        chunks = -(-length // chunk)
        tensors = {}
        for layer in layers:
            def rows(n):
                return torch.randn(n, kv_heads, dim, generator=gen).to(torch.bfloat16)
            pooled_k, pooled_v = rows(chunks), rows(chunks)
            full = {"full_k": rows(length), "full_v": rows(length)} if content == "full" else {}
            tensors[layer] = LayerTensors(pooled_k=pooled_k, pooled_v=pooled_v,
                                          router_k=rows(chunks) if own_router else pooled_k, **full)
        docs.append(StoredDocument(gid=gid, num_tokens=length, num_chunks=chunks, layers=tensors))
    return docs


def store_with(docs, chunk, device, placement) -> MemoryStore:
    """A store on `device` holding `docs` (copied there) in a memory "m" with `placement`."""
    docs = [StoredDocument(gid=doc.gid, num_tokens=doc.num_tokens, num_chunks=doc.num_chunks,
                           layers={layer: _on(parts, device) for layer, parts in doc.layers.items()})
            for doc in docs]
    layout = SlotLayout.of_document(docs[0], chunk)
    chunks = sum(doc.num_chunks for doc in docs)
    key, content = layout.key_bytes_per_chunk(), layout.content_bytes_per_chunk()
    store = MemoryStore(chunks * (key + content) * 2, chunk, host_budget_bytes=chunks * content * 2)
    store.reserve(layout)
    store.create("m", placement=placement)
    for doc in docs:
        store.commit_document("m", doc)
    return store


def _on(parts: LayerTensors, device) -> LayerTensors:
    moved = {name: t.to(device) for name, t in parts.tensors().items()}
    if parts.router_k is parts.pooled_k:  # routing on pooled keys: one tensor, as the model stores it
        moved["router_k"] = moved["pooled_k"]
    return LayerTensors(**moved)


def check(cases, device, gen) -> int:
    failures = 0
    for layers, kv_heads, dim, lengths, chunk, top_k, own_router, content in cases:
        docs = documents(layers, kv_heads, dim, lengths, chunk, own_router, content, gen)
        options = MSAOptions(top_k_docs=top_k, chunk_size=chunk, memory_content=content, similarity="dot")
        every = MSAOptions(top_k_docs=len(docs), chunk_size=chunk, memory_content=content, similarity="dot")
        router_q = torch.randn(33, 2 * kv_heads, dim, generator=gen).to(torch.bfloat16)
        reference = store_with(docs, chunk, "cpu", "device")
        chosen_by_tier = {}
        for placement in ("device", "host"):
            store = store_with(docs, chunk, device, placement)
            like = torch.empty(0, kv_heads, dim, dtype=torch.bfloat16, device=device)
            ok = True
            for layer in layers:
                ranked, scores, _ = memory_ops.top_documents(reference.routing_view("m", layer), router_q, every, "torch")
                want = dict(zip(ranked, scores))
                kth = scores[min(top_k, len(scores)) - 1]
                tolerance = 5e-3 * max(1.0, max(abs(x) for x in scores))
                selection = memory_ops.route(store, "m", layer, router_q.to(device), options, like, "triton")
                chosen_by_tier.setdefault(layer, selection.gids)
                ok &= selection.gids == chosen_by_tier[layer]  # both tiers: the same scan, the same choice
                ok &= len(set(selection.gids)) == len(selection.gids) == min(top_k, len(docs))
                ok &= all(abs(got - want[gid]) <= tolerance and want[gid] >= kth - tolerance
                          for gid, got in zip(selection.gids, selection.scores))
                memory_k, memory_v = selection.gathered()
                stored = [docs[gid].layers[layer] for gid in selection.gids]
                stored_k = torch.cat([(t.full_k if content == "full" else t.pooled_k) for t in stored])
                stored_v = torch.cat([(t.full_v if content == "full" else t.pooled_v) for t in stored])
                ok &= torch.equal(memory_k.cpu(), stored_k) and torch.equal(memory_v.cpu(), stored_v)
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} {placement} layers={layers} Hkv={kv_heads} d={dim} docs={len(lengths)} "
                  f"P={chunk} k={top_k} router={'own' if own_router else 'pooled K'} content={content}")
    return failures


def checks(gpu: bool, gen: torch.Generator) -> int:
    failures = check(TINY, "cuda" if gpu else "cpu", gen)
    if gpu:
        failures += check(REAL, "cuda", gen)
    return failures


if __name__ == "__main__":
    run_checks(checks)
