"""Run under TRITON_INTERPRET=1 (set by tests/test_kernels.py): the Triton routing scan against
the reference on fresh random inputs. Prints one line per case; exits non-zero on a mismatch."""

from __future__ import annotations

import itertools
import sys

import torch

from sglang_msa.kernels import reference as ref
from sglang_msa.kernels.routing_scan import chunk_scores, route_with_scan


def main() -> None:
    gen = torch.Generator().manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else torch.seed() % 2**31)
    shapes = [  # (tokens, heads, kv heads, head dim, document lengths, chunk size)
        (1, 4, 2, 16, [5, 9, 3], 4),          # one routing token, GQA 2, partial chunks
        (3, 6, 2, 24, [13, 1, 40, 7], 8),     # odd head dim (masked), GQA 3
        (2, 4, 4, 8, [70], 4),                # single document, chunks over one tile
        (5, 8, 1, 32, [3] * 30, 2),           # MQA, many small documents
    ]
    failures = 0
    for (tokens, heads, kv_heads, dim, doc_lens, chunk), similarity, head_reduce, query_reduce in itertools.product(
        shapes, ("dot", "cosine"), ("mean", "max"), ("max", "mean", "last")
    ):
        q = torch.randn(tokens, heads, dim, generator=gen)
        keys = ref.pool_chunks(torch.randn(sum(doc_lens), kv_heads, dim, generator=gen), doc_lens, chunk)
        got = chunk_scores(q, keys, similarity, head_reduce, query_reduce, block_c=16)
        want = ref.chunk_scores(q, keys, similarity, head_reduce, query_reduce)
        error = (got - want).abs().max().item()
        layout = ref.chunk_layout(doc_lens, chunk)
        same_docs = route_with_scan(q, keys, layout, 3, similarity, head_reduce, query_reduce).tolist() == \
            ref.route_documents(q, keys, layout, 3, similarity, head_reduce, query_reduce).tolist()
        ok = not torch.isnan(got).any() and error < 1e-5 and same_docs
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} T={tokens} H={heads}/{kv_heads} d={dim} C={keys.shape[0]} "
              f"{similarity}/{head_reduce}/{query_reduce} max_err={error:.2e} same_top3={same_docs}")
    empty = chunk_scores(torch.randn(2, 4, 8), torch.zeros(0, 2, 8))
    assert empty.shape == (0,)
    assert route_with_scan(torch.randn(2, 4, 8), torch.zeros(0, 2, 8), ref.chunk_layout([], 4), 16).tolist() == []
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
