"""Memory at scale on this machine, without the model: the store's ingestion and a query's memory work vs memory size.

Fills a memory with synthetic pooled documents shaped like a model's routed layers (`--shape
embedded`: SmolLM2-135M, 15 routed layers, 9 query / 3 KV heads, d = 64, training-free pooled
mode where K̄ routes and is stored once; `--shape msa-4b`: 18 routed layers, 32 / 8 heads,
d = 128, own router keys; bf16, P = 64) through `MemoryStore.commit_document`, once per
placement (`device`, `host`, or `auto`: the device up to `--device-budget-gb`, then host memory),
and measures per size: the commit rate (tokens/s, slot allocation and writes only: the model's
prefill is what `benchmarks/serving.py` measures), bytes per token on each tier, and one query's memory work over all routed layers (`memory_ops.route`: score every
chunk, top-16 documents, gather their content), median of several random queries. The kernels
are the serving defaults for the device: the pure-PyTorch path on a CPU, Triton on a GPU.

It also times each routed layer as the server runs it at a query's prefill: route, then the
layer's dense attention (a causal `--prefill-tokens` prompt, the stand-in for SGLang's pass),
then wait for the selected rows. On a GPU the rows are gathered on a side stream, so host-tier
content crosses PCIe while the dense attention runs: `exposed_ms` (that time minus the dense
attention alone) is what the memory adds to the prefill, by placement. And it times replacing a
document (delete one, commit another: allocation after a deletion) at each size.

    .venv/bin/python benchmarks/memory_scale.py [--sizes 1000000,4000000,16000000] [--shape embedded|msa-4b]
        [--placements device,host,auto] [--device-budget-gb 60] [--router-keys model|fp8]
        [--doc-tokens 256] [--prefill-tokens 1024] [--out benchmarks/results/memory_scale.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_msa.attention_backend import memory_ops
from sglang_msa.config import MSAOptions
from sglang_msa.memory_manager.store import LayerTensors, MemoryStore, StoredDocument
from sglang_msa.memory_manager.tiers import SlotLayout

CHUNK = 64


@dataclass(frozen=True)
class Shape:
    layers: tuple[int, ...]
    heads: int
    kv_heads: int
    dim: int
    own_router_keys: bool


SHAPES = {
    "embedded": Shape(tuple(range(15, 30)), heads=9, kv_heads=3, dim=64, own_router_keys=False),
    "msa-4b": Shape(tuple(range(18, 36)), heads=32, kv_heads=8, dim=128, own_router_keys=True),
}


def documents(shape: Shape, count: int, doc_tokens: int, first_gid: int, gen: torch.Generator,
              device) -> list[StoredDocument]:
    chunks = -(-doc_tokens // CHUNK)

    def rows():
        return torch.randn(len(shape.layers), count, chunks, shape.kv_heads, shape.dim,
                           generator=gen, device=gen.device).to(torch.bfloat16).to(device)

    keys, values = rows(), rows()
    router = rows() if shape.own_router_keys else None
    docs = []
    for i in range(count):
        layers = {}
        for j, layer in enumerate(shape.layers):
            pooled_k = keys[j, i]  # training-free: the same tensor routes (stored once)
            layers[layer] = LayerTensors(pooled_k=pooled_k, pooled_v=values[j, i],
                                         router_k=router[j, i] if shape.own_router_keys else pooled_k)
        docs.append(StoredDocument(gid=first_gid + i, num_tokens=doc_tokens, num_chunks=chunks, layers=layers))
    return docs


def dense_attention(shape: Shape, tokens: int, gen: torch.Generator, device: str):
    """One layer's dense causal attention over a `tokens` prompt (GQA), as a callable."""
    q = torch.randn(1, shape.heads, tokens, shape.dim, generator=gen, device=gen.device).to(torch.bfloat16).to(device)
    k, v = (torch.randn(1, shape.kv_heads, tokens, shape.dim, generator=gen, device=gen.device)
            .to(torch.bfloat16).to(device) for _ in range(2))
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def timed(work, device: str, repeats: int) -> float:
    """Median seconds of `work()` with the device drained before and after."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def replace_documents(store: MemoryStore, shape: Shape, doc_tokens: int, gen: torch.Generator, device: str,
                      count: int = 10) -> float:
    """Median seconds to delete a stored document and commit a new one in its place (allocation
    from the slot pools' free lists after a deletion), over `count` documents spread over the memory."""
    gids = store.contents()["m"]
    doomed = [gids[i * len(gids) // count] for i in range(count)]
    times = []
    for gid, new in zip(doomed, documents(shape, count, doc_tokens, 10**9 + gids[-1], gen, device)):
        started = time.perf_counter()
        store.remove_document("m", gid)
        store.commit_document("m", new)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(shape: Shape, placement: str, sizes: list[int], doc_tokens: int, queries: int, device: str,
            prefill_tokens: int, router_keys: str, device_budget: int) -> list[dict]:
    gen = torch.Generator(device=device if device.startswith("cuda") else "cpu").manual_seed(0)
    # the slots the server would reserve at start-up, sized by the store's own accounting for
    # exactly the largest memory in this placement (`auto`: the device budget given, the rest of
    # the content in host memory)
    layout = SlotLayout.of_document(documents(shape, 1, doc_tokens, 0, gen, device)[0], CHUNK, router_keys)
    doc_chunks = -(-doc_tokens // CHUNK)
    chunks = -(-max(sizes) // doc_tokens) * doc_chunks
    key, content = layout.key_bytes_per_chunk(), layout.content_bytes_per_chunk()
    if placement == "host":
        device_bytes, host_bytes = chunks * key, chunks * content
    elif placement == "auto":
        device_bytes = min(device_budget, chunks * (key + content))
        host_bytes = max(0, chunks * (key + content) - device_bytes + doc_chunks * (key + content)) // content * content
    else:
        device_bytes, host_bytes = chunks * (key + content), 0
    store = MemoryStore(device_bytes, CHUNK, host_budget_bytes=host_bytes, router_key_format=router_keys)
    store.reserve(layout)
    store.create("m", placement=placement)
    options = MSAOptions(top_k_docs=16, chunk_size=CHUNK, memory_content="pooled", similarity="dot")
    kernels = options.kernel_path(device)
    like = torch.empty(0, shape.kv_heads, shape.dim, dtype=torch.bfloat16, device=device)
    rows, stored = [], 0
    for size in sizes:
        commit_s, added = 0.0, 0
        while stored < size:
            batch = documents(shape, min(max(1, 2**18 // doc_tokens), -(-(size - stored) // doc_tokens)), doc_tokens,
                              stored // doc_tokens, gen, device)  # ~256K tokens at a time
            started = time.perf_counter()
            for doc in batch:
                store.commit_document("m", doc)
            commit_s += time.perf_counter() - started
            added += sum(doc.num_tokens for doc in batch)
            stored += sum(doc.num_tokens for doc in batch)
        router_q = torch.randn(queries, 32, shape.heads, shape.dim, generator=gen,
                               device=gen.device).to(torch.bfloat16).to(device)
        selections = []
        asked = iter(range(10**9))

        def memory_work():  # one query: every routed layer routes and its rows are gathered
            q = router_q[next(asked) % queries]
            selections[:] = [memory_ops.route(store, "m", layer, q, options, like, kernels) for layer in shape.layers]
            for selection in selections:
                selection.gathered()

        def prefill_layers():  # the same, each layer's routing followed by its dense attention
            q = router_q[next(asked) % queries]
            for layer in shape.layers:
                selection = memory_ops.route(store, "m", layer, q, options, like, kernels)
                dense()
                selection.gathered()

        def dense_layers():
            for _ in shape.layers:
                dense()

        dense = dense_attention(shape, prefill_tokens, gen, device)
        dense_layers()  # warm-up (kernels compiled, caches filled)
        prefill_layers()
        query_s = timed(memory_work, device, queries)
        dense_s = timed(dense_layers, device, queries)
        prefill_s = timed(prefill_layers, device, queries)
        selection = selections[-1]
        replace_s = replace_documents(store, shape, doc_tokens, gen, device)
        stats = store.stats("m")
        row = {"placement": placement, "memory_tokens": stats["tokens"], "documents": stats["documents"],
               "device_bytes_per_token": stats["device_bytes"] / stats["tokens"],
               "host_bytes_per_token": stats["host_bytes"] / stats["tokens"],
               "commit_tok_s": added / commit_s, "query_memory_ms": 1000 * query_s,
               "dense_ms": 1000 * dense_s, "prefill_layers_ms": 1000 * prefill_s,
               "exposed_ms": 1000 * (prefill_s - dense_s), "prefill_tokens": prefill_tokens,
               "replace_ms": 1000 * replace_s, "selected_rows_per_layer": selection.num_rows, "kernels": kernels}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,4000000,16000000")
    parser.add_argument("--placements", default="device,host")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="embedded")
    parser.add_argument("--doc-tokens", type=int, default=256)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--prefill-tokens", type=int, default=1024,
                        help="the prompt length of the dense attention each routed layer's memory work overlaps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--router-keys", choices=["model", "fp8"], default="model",
                        help="router keys as the model makes them (bf16) or float8 (the router_key_format option)")
    parser.add_argument("--device-budget-gb", type=float, default=60.0,
                        help="placement auto: the device budget (memory_budget_mb); the rest goes to host memory")
    parser.add_argument("--out", default="benchmarks/results/memory_scale.json")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    rows = []
    for placement in args.placements.split(","):
        rows += measure(SHAPES[args.shape], placement, sizes, args.doc_tokens, args.queries, args.device,
                        args.prefill_tokens, args.router_keys, int(args.device_budget_gb * 2**30))
    print(f"\n{'memory tokens':>13} {'placement':>9} {'dev B/tok':>9} {'host B/tok':>10} {'commit tok/s':>12} "
          f"{'query memory ms (all layers)':>28} {'vs device':>9} {'dense ms':>8} {'+memory, exposed ms':>19} "
          f"{'replace doc ms':>14}")
    device_ms = {r["memory_tokens"]: r["query_memory_ms"] for r in rows if r["placement"] == "device"}
    for r in rows:
        ratio = r["query_memory_ms"] / device_ms[r["memory_tokens"]] if r["memory_tokens"] in device_ms else float("nan")
        print(f"{r['memory_tokens']:>13,} {r['placement']:>9} {r['device_bytes_per_token']:>9.1f} "
              f"{r['host_bytes_per_token']:>10.1f} {r['commit_tok_s']:>12,.0f} {r['query_memory_ms']:>28.1f} "
              f"{ratio:>8.2f}x {r['dense_ms']:>8.1f} {r['exposed_ms']:>19.1f} {r['replace_ms']:>14.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                               "device": args.device, "device_name": device_name(args.device), "shape": args.shape,
                               "doc_tokens": args.doc_tokens, "router_keys": args.router_keys,
                               "torch_threads": torch.get_num_threads(),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()


if __name__ == "__main__":
    main()
