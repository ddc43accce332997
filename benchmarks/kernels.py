"""GPU kernel benchmarks (issue #4): prints a table and writes JSON.

- copy: the device's measured device-to-device copy bandwidth (bytes read + written), the ceiling
  the routing scan is held to;
- routing scan: one query's scan over every routed layer's router keys (MSA-4B dimensions:
  18 routed layers, 8 KV heads, 32 query heads, d=128, P=64, synthetic keys) at 1M, 10M and
  100M memory tokens, bfloat16 and float8; achieved bytes/s over the keys vs copy bandwidth
  (target ≥ 70%);
- memory attention decode: the indexed kernel over N selected rows per request (read in place
  through an index list) vs PyTorch's fused SDPA decode over the same N rows stored contiguously
  (FlashInfer is not installed where this ran; see docs/results.md) (target ≤ 1.2×);
- pooling: ingestion pooling of K, V and router keys, bytes/s vs copy bandwidth.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json

Timing: CUDA events via `triton.testing.do_bench` (median, warm-up first); inputs are random.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from sglang_msa.kernels import reference as ref
from sglang_msa.kernels.indexed_attention import IndexedBatch, indexed_attention
from sglang_msa.kernels.pooling import pool_layer
from sglang_msa.kernels.routing_scan import (RouterKeyTable, RoutingPlan, RoutingRequest, quantize_fp8, scan_layer,
                                             split_scores, top_k_per_request)

ROUTED_LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, CHUNK = 18, 8, 32, 128, 64
GB = 1e9


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def bench_graph_ms(fn) -> float:
    """`fn` captured once in a CUDA graph and timed by replays: device time without Python's
    launch overhead (NaN, with the reason printed, if it cannot be captured)."""
    try:
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay)
    except Exception as exc:  # report and go on: the other numbers still count
        print(f"  (CUDA graph capture failed: {exc!r})")
        return float("nan")


def copy_bandwidth() -> dict:
    src = torch.randn(2 * 1024**3 // 4, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    moved = 2 * src.numel() * 4
    return {"bytes_moved": moved, "ms": ms, "gbps": moved / ms / 1e6}


def routing_scan(memory_tokens: int, key_format: str, routing_tokens: int, doc_tokens: int) -> dict:
    num_chunks = memory_tokens // CHUNK
    chunks_per_doc = doc_tokens // CHUNK
    num_docs = num_chunks // chunks_per_doc
    num_chunks = num_docs * chunks_per_doc
    layout = ref.ChunkLayout(
        chunk_doc=torch.arange(num_docs).repeat_interleave(chunks_per_doc),
        doc_chunk_start=torch.arange(num_docs + 1) * chunks_per_doc,
        chunk_token_count=torch.full((num_chunks,), CHUNK),
    )
    tables = []
    for _ in range(ROUTED_LAYERS):
        keys = torch.randn(num_chunks, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        if key_format == "fp8":
            stored, scales = quantize_fp8(keys)
            del keys
            tables.append(RouterKeyTable.from_layout(stored, layout, scales))
        else:
            tables.append(RouterKeyTable.from_layout(keys, layout))
    key_bytes = sum(t.keys.numel() * t.keys.element_size() + (t.scales.numel() * 4 if t.scales is not None else 0)
                    for t in tables)
    query = torch.randn(routing_tokens, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    plan = RoutingPlan.build([RoutingRequest(router_q=query, chunk_start=0, chunk_end=num_chunks, num_docs=num_docs)],
                             "cuda")

    def scan_all_layers(block_c=None):
        for table in tables:
            scan_layer(plan, [query], table, block_c=block_c)

    def route_all_layers():  # scan + top-16 documents of every layer, indices on the host
        return [top_k_per_request(split_scores(plan, scan_layer(plan, [query], table)), 16) for table in tables]

    by_block = {block_c: bench_ms(lambda: scan_all_layers(block_c)) for block_c in (64, 128, 256)}
    ms = bench_ms(scan_all_layers)  # the default BLOCK_C for this key format
    route_ms = bench_ms(route_all_layers)
    selected = route_all_layers()[0][0]
    # the same 18 scans replayed from a CUDA graph: device time without Python's launch overhead
    graph_ms = bench_graph_ms(scan_all_layers)
    return {"memory_tokens": num_chunks * CHUNK, "key_format": key_format, "routing_tokens": routing_tokens,
            "documents": num_docs, "key_bytes": key_bytes, "ms_all_layers": ms, "gbps": key_bytes / ms / 1e6,
            "ms_by_block_c": by_block, "ms_graph_replay": graph_ms, "gbps_graph_replay": key_bytes / graph_ms / 1e6,
            "ms_route_all_layers": route_ms, "selected": int(selected.numel())}


def memory_attention_decode(batch: int, rows: int) -> dict:
    """Decode: `batch` requests × one query token, each over `rows` KV rows."""
    scale = HEAD_DIM**-0.5
    pool_rows = batch * rows * 2
    k_pool = torch.randn(pool_rows, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    index = torch.cat([torch.randperm(pool_rows, device="cuda")[:rows] for _ in range(batch)]).to(torch.int32)
    meta = IndexedBatch(q_start=list(range(batch)), q_count=[1] * batch,
                        kv_start=[i * rows for i in range(batch)], kv_count=[rows] * batch).plan("cuda")
    out = torch.empty(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.float32)
    lse = torch.empty(batch, Q_HEADS, device="cuda", dtype=torch.float32)
    indexed_ms = bench_ms(lambda: indexed_attention(q, k_pool, v_pool, index, meta, scale, out=out, lse=lse))
    graph_ms = bench_graph_ms(lambda: indexed_attention(q, k_pool, v_pool, index, meta, scale, out=out, lse=lse))
    # the same rows stored contiguously per request, through PyTorch's fused attention
    k_dense = k_pool[index.long()].view(batch, rows, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    v_dense = v_pool[index.long()].view(batch, rows, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    q_dense = q.view(batch, Q_HEADS, 1, HEAD_DIM)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dense_ms = bench_ms(lambda: sdpa(q_dense, k_dense, v_dense, scale=scale, enable_gqa=True))
    got = out.view(batch, Q_HEADS, HEAD_DIM)
    want = sdpa(q_dense, k_dense, v_dense, scale=scale, enable_gqa=True).float().view(batch, Q_HEADS, HEAD_DIM)
    error = ((got - want).abs().max() / want.abs().max()).item()
    kv_bytes = 2 * batch * rows * KV_HEADS * HEAD_DIM * 2
    return {"batch": batch, "rows_per_request": rows, "indexed_ms": indexed_ms, "indexed_graph_ms": graph_ms,
            "sdpa_contiguous_ms": dense_ms,
            "ratio": indexed_ms / dense_ms, "indexed_gbps": kv_bytes / indexed_ms / 1e6, "rel_err_vs_sdpa": error}


def pooling(tokens: int) -> dict:
    doc_lens = [4096] * (tokens // 4096)
    n = sum(doc_lens)
    k, v, r = (torch.randn(n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ms = bench_ms(lambda: pool_layer(k, v, r, doc_lens, CHUNK))
    moved = 3 * k.numel() * 2 * (1 + 1 / CHUNK)
    return {"tokens": n, "ms": ms, "gbps": moved / ms / 1e6, "tokens_per_s": n / ms * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--routing-tokens", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args()
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
              "copy": copy_bandwidth(), "routing": [], "decode": [], "pooling": []}
    copy_gbps = result["copy"]["gbps"]
    print(f"device {result['device']}: copy bandwidth {copy_gbps:.0f} GB/s (read + written)", flush=True)
    for size in args.sizes:
        for key_format in ("bf16", "fp8"):
            row = routing_scan(size, key_format, args.routing_tokens, args.doc_tokens)
            torch.cuda.empty_cache()  # the keys of this size are gone with the call
            row["fraction_of_copy"] = row["gbps"] / copy_gbps
            result["routing"].append(row)
            row["graph_fraction_of_copy"] = row["gbps_graph_replay"] / copy_gbps
            blocks = " ".join(f"{b}:{t:.2f}" for b, t in row["ms_by_block_c"].items())
            print(f"routing {size:>11,} tokens {key_format:4}: {row['ms_all_layers']:8.3f} ms for "
                  f"{ROUTED_LAYERS} layers, {row['gbps']:6.0f} GB/s = {row['fraction_of_copy']:.0%} of copy; "
                  f"graph replay {row['ms_graph_replay']:7.3f} ms = {row['graph_fraction_of_copy']:.0%}; "
                  f"with top-16: {row['ms_route_all_layers']:7.3f} ms; ms by BLOCK_C {blocks}", flush=True)
    for batch, rows in ((1, 1024), (32, 1024), (32, 4096), (128, 1024), (8, 16384)):
        row = memory_attention_decode(batch, rows)
        result["decode"].append(row)
        print(f"decode batch {batch:3} × {rows:5} rows: indexed {row['indexed_ms'] * 1e3:7.1f} µs "
              f"(graph replay {row['indexed_graph_ms'] * 1e3:6.1f} µs), SDPA contiguous "
              f"{row['sdpa_contiguous_ms'] * 1e3:7.1f} µs, ratio {row['ratio']:.2f}, err {row['rel_err_vs_sdpa']:.1e}",
              flush=True)
    for tokens in (1 << 20,):
        row = pooling(tokens)
        row["fraction_of_copy"] = row["gbps"] / copy_gbps
        result["pooling"].append(row)
        print(f"pooling {tokens:,} tokens (K, V, router keys): {row['ms']:.3f} ms, {row['gbps']:.0f} GB/s "
              f"= {row['fraction_of_copy']:.0%} of copy", flush=True)
    result["seconds"] = time.time() - started
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
