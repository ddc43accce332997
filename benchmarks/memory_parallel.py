"""Memory Parallel on this machine, without the model: one rank vs two ranks (gloo) holding a memory.

Fills a memory with synthetic MSA-4B-shaped pooled documents (18 routed layers, 32 query / 8 KV
heads, d = 128, own router keys, bf16, P = 64) and measures, per memory size, one query's memory
work over all routed layers (route, top-16 documents, read their content):

- `1 rank`: `memory_ops.route` in one process over the whole memory (all CPU threads);
- `2 ranks`: `memory_ops.route_sharded` in two gloo processes (the threads split between them),
  each holding its 4 KV heads of every document's content and the router keys (all heads) of the
  documents it routes, exactly as `--tp 2` serves.

It checks that both give the same documents for every query and layer, and reports the query
time, the ratio, and the bytes per memory token each rank holds. Prints a table, writes JSON.

    .venv/bin/python benchmarks/memory_parallel.py [--sizes 500000,2000000] [--out benchmarks/results/memory_parallel.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sglang_msa.attention_backend import memory_ops
from sglang_msa.config import MSAOptions
from sglang_msa.memory_manager.sharding import MemoryShard
from sglang_msa.memory_manager.store import LayerTensors, MemoryStore, StoredDocument
from sglang_msa.memory_manager.tiers import SlotLayout
from sglang_msa.server_process import free_port

CHUNK, DOC_TOKENS, LAYERS, HEADS, KV_HEADS, DIM = 64, 256, tuple(range(18, 36)), 32, 8, 128
QUERY_TOKENS, QUERIES = 32, 5


def fill(store: MemoryStore, size: int, stored: int, rank: int, world: int) -> int:
    """Commit documents up to `size` tokens: this rank's KV heads of the content, all heads of the
    router keys (every rank generates the same documents)."""
    chunks, per_rank = DOC_TOKENS // CHUNK, KV_HEADS // world
    heads = slice(rank * per_rank, (rank + 1) * per_rank)
    while stored < size:
        count = min(256, -(-(size - stored) // DOC_TOKENS))
        gen = torch.Generator().manual_seed(stored)
        keys, values, router = (torch.randn(len(LAYERS), count, chunks, KV_HEADS, DIM, generator=gen)
                                .to(torch.bfloat16) for _ in range(3))
        for i in range(count):
            layers = {layer: LayerTensors(pooled_k=keys[j, i, :, heads], pooled_v=values[j, i, :, heads],
                                          router_k=router[j, i]) for j, layer in enumerate(LAYERS)}
            store.commit_document("m", StoredDocument(gid=stored // DOC_TOKENS + i, num_tokens=DOC_TOKENS,
                                                      num_chunks=chunks, layers=layers))
        stored += count * DOC_TOKENS
    return stored


def run_rank(rank: int, world: int, port: int, sizes: list[int], threads: int, results: dict) -> None:
    torch.set_num_threads(threads)
    shard = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        shard = MemoryShard(rank=rank, size=world, device_group=dist.group.WORLD, cpu_group=dist.group.WORLD)
    options = MSAOptions(top_k_docs=16, chunk_size=CHUNK, memory_content="pooled", similarity="dot")
    # the slots a server with --tp `world` reserves: this rank's KV heads of the content, a share of
    # the router keys (all heads) with one document of headroom
    layout = SlotLayout(layers=LAYERS, chunk_size=CHUNK, kv_heads=KV_HEADS // world, head_dim=DIM, v_head_dim=DIM,
                        dtype=torch.bfloat16, router_dtype=torch.bfloat16, router_is_pooled_k=False, full=False,
                        device=torch.device("cpu"), router_heads=KV_HEADS, key_shards=world,
                        max_document_chunks=DOC_TOKENS // CHUNK)
    budget = int(max(sizes) * 1728 / world * 1.05) + (64 << 20)  # MSA-4B: 1,728 B per token over the ranks
    store = MemoryStore(budget, CHUNK, shard=shard)
    store.reserve(layout)
    store.create("m")
    like = torch.empty(0, KV_HEADS // world, DIM, dtype=torch.bfloat16)
    per_rank = HEADS // world
    rows, stored = [], 0
    for size in sizes:
        stored = fill(store, size, stored, rank, world)
        times, chosen = [], []
        for query in range(QUERIES):
            router_q = torch.randn(QUERY_TOKENS, HEADS, DIM, generator=torch.Generator().manual_seed(query))
            router_q = router_q.to(torch.bfloat16)[:, rank * per_rank : (rank + 1) * per_rank]
            if shard is not None:
                shard.agree(True)  # start together
            started = time.perf_counter()
            for layer in LAYERS:
                if shard is None:
                    selection = memory_ops.route(store, "m", layer, router_q, options, like)
                else:
                    selection = memory_ops.route_sharded(store, "m", layer, router_q, options, like, "torch", shard)
                chosen.append(selection.gids)
            times.append(time.perf_counter() - started)
        stats = store.stats("m")
        rows.append({"memory_tokens": stats["tokens"], "query_memory_ms": 1000 * statistics.median(times),
                     "device_bytes_per_token": stats["device_bytes"] / stats["tokens"],
                     "routed_documents": stats["routed_documents"], "selections": chosen})
    results[rank] = rows
    if shard is not None:
        torch.distributed.destroy_process_group()


def run_world(world: int, sizes: list[int], cores: int) -> list[list[dict]]:
    results = mp.Manager().dict()
    threads = max(1, cores // world)
    if world == 1:
        run_rank(0, 1, 0, sizes, threads, results)
    else:
        mp.spawn(run_rank, args=(world, free_port(), sizes, threads, results), nprocs=world, join=True)
    return [results[rank] for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500000,2000000")
    parser.add_argument("--out", default="benchmarks/results/memory_parallel.json")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    cores = os.cpu_count() or 1
    one, two = run_world(1, sizes, cores)[0], run_world(2, sizes, cores)
    table = []
    for index, single in enumerate(one):
        ranks = [rows[index] for rows in two]
        identical = all(rank["selections"] == single["selections"] for rank in ranks)
        sharded_ms = max(rank["query_memory_ms"] for rank in ranks)
        table.append({"memory_tokens": single["memory_tokens"], "one_rank_ms": single["query_memory_ms"],
                      "two_ranks_ms": sharded_ms, "speedup": single["query_memory_ms"] / sharded_ms,
                      "identical_selections": identical,
                      "one_rank_device_bytes_per_token": single["device_bytes_per_token"],
                      "two_ranks_device_bytes_per_token": [rank["device_bytes_per_token"] for rank in ranks],
                      "routed_documents_per_rank": [rank["routed_documents"] for rank in ranks]})
    print(f"\n{'memory tokens':>13} {'1 rank ms':>10} {'2 ranks ms':>11} {'speedup':>8} {'same docs':>9} "
          f"{'B/token, 1 rank':>16} {'B/token per rank, 2 ranks':>26} {'docs routed per rank':>21}")
    for r in table:
        per_rank = " / ".join(f"{b:.0f}" for b in r["two_ranks_device_bytes_per_token"])
        print(f"{r['memory_tokens']:>13,} {r['one_rank_ms']:>10.1f} {r['two_ranks_ms']:>11.1f} {r['speedup']:>7.2f}x "
              f"{'yes' if r['identical_selections'] else 'NO':>9} {r['one_rank_device_bytes_per_token']:>16.0f} "
              f"{per_rank:>26} {str(r['routed_documents_per_rank']):>21}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cores": cores, "shape": "msa-4b", "rows": table},
                              indent=2))
    print(f"wrote {out}")
    if not all(r["identical_selections"] for r in table):
        raise SystemExit("two ranks selected other documents than one rank")


if __name__ == "__main__":
    main()
