"""Bytes per memory token by tier and placement, from the store's own accounting.

For each model shape, content mode and router-key format, builds the `tiers.SlotLayout` the
server would reserve, stores one document of whole chunks in a memory of each placement
(`device`, `host`), and reads back what the store charges to each tier. MSA-4B's shape (18 routed
layers, 8 KV heads, d = 128, bf16, P = 64) must give spec §8's 576 B of router keys and 1,152 B
of content per token. Prints a table, writes JSON.

    .venv/bin/python benchmarks/memory_bytes.py [--out benchmarks/results/memory_bytes.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sglang_msa.memory_manager.store import LayerTensors, MemoryStore, StoredDocument

SHAPES = {  # routed layers, KV heads, head dim, dtype
    "MSA-4B (Qwen3-4B, 18 of 36 layers routed)": (18, 8, 128, torch.bfloat16),
    "SmolLM2-135M (embedded, 15 of 30 routed)": (15, 3, 64, torch.bfloat16),
}
CHUNK = 64
MODES = [  # name, own router keys (MSA checkpoint), router key format, full-resolution content
    ("MSA checkpoint, pooled", True, "model", False),
    ("MSA checkpoint, pooled, fp8 router keys", True, "fp8", False),
    ("training-free, pooled", False, "model", False),
    ("training-free, full-resolution", False, "model", True),
]


def document(layers: int, kv_heads: int, dim: int, dtype, own_router: bool, full: bool) -> StoredDocument:
    tokens = 4 * CHUNK

    def rows(n):
        return torch.zeros(n, kv_heads, dim, dtype=dtype)

    parts = {}
    for layer in range(layers):
        pooled_k = rows(4)
        parts[layer] = LayerTensors(pooled_k=pooled_k, pooled_v=rows(4), router_k=rows(4) if own_router else pooled_k,
                                    full_k=rows(tokens) if full else None, full_v=rows(tokens) if full else None)
    return StoredDocument(gid=0, num_tokens=tokens, num_chunks=4, layers=parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memory_bytes.json")
    args = parser.parse_args()
    rows = []
    for shape, (layers, kv_heads, dim, dtype) in SHAPES.items():
        for mode, own_router, router_format, full in MODES:
            doc = document(layers, kv_heads, dim, dtype, own_router, full)
            store = MemoryStore(256 << 20, CHUNK, host_budget_bytes=64 << 20, router_key_format=router_format)
            row = {"shape": shape, "mode": mode}
            for placement in ("device", "host"):
                store.create(placement, placement=placement)
                store.commit_document(placement, doc)
                stats = store.stats(placement)
                row[placement] = {tier: stats[f"{tier}_bytes"] / stats["tokens"] for tier in ("device", "host")}
            rows.append(row)
    print(f"{'shape':<44} {'mode':<40} {'device placement':>18} {'host placement: device + host':>30}")
    for r in rows:
        device, host = r["device"], r["host"]
        print(f"{r['shape']:<44} {r['mode']:<40} {device['device']:>16.1f} B "
              f"{host['device']:>14.1f} B + {host['host']:>9.1f} B")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"chunk_size": CHUNK, "bytes_per_memory_token": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
