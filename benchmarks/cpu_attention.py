"""The CPU serving path's memory attention per routed layer: the reference (`reference.msa_attention_split`,
KV heads repeated for their query groups) against `attention_torch.msa_attention_split` (each group
against its one KV head), at the embedded model's shapes (9 query heads, 3 KV heads, d = 64, bf16).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_attention.py [--out benchmarks/results/cpu_attention.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sglang_msa.kernels import attention_torch, reference as ref

HEADS, KV_HEADS, DIM = 9, 3, 64
CASES = [  # (what, new tokens, memory tokens, local tokens)
    ("decode, top-4 documents of 290 tokens", 1, 1160, 300),
    ("decode, top-16 documents of 1,024 tokens", 1, 16384, 300),
    ("prefill of a 32-token question, top-16 of 256", 32, 4096, 40),
]


def inputs(num_q: int, memory: int, local: int, dtype=torch.bfloat16) -> ref.AttentionInputs:
    def rand(*shape):
        return torch.randn(*shape).to(dtype)

    return ref.AttentionInputs(q=rand(num_q, HEADS, DIM), prefix_k=rand(0, KV_HEADS, DIM), prefix_v=rand(0, KV_HEADS, DIM),
                               memory_k=rand(memory, KV_HEADS, DIM), memory_v=rand(memory, KV_HEADS, DIM),
                               local_k=rand(local, KV_HEADS, DIM), local_v=rand(local, KV_HEADS, DIM), scale=DIM**-0.5)


def median_ms(fn, args, repeats: int) -> float:
    for _ in range(3):
        fn(args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(args)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_attention.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for what, num_q, memory, local in CASES:
        case = inputs(num_q, memory, local)
        reference_ms = median_ms(ref.msa_attention_split, case, args.repeats)
        grouped_ms = median_ms(attention_torch.msa_attention_split, case, args.repeats)
        rows.append({"case": what, "new_tokens": num_q, "memory_tokens": memory, "local_tokens": local,
                     "reference_ms": round(reference_ms, 3), "grouped_ms": round(grouped_ms, 3),
                     "speedup": round(reference_ms / grouped_ms, 2)})
    print("| case | reference ms / layer | grouped ms / layer | speedup |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['case']} | {row['reference_ms']:.2f} | {row['grouped_ms']:.2f} | {row['speedup']:.1f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "threads": torch.get_num_threads(),
                                    "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
