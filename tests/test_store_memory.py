"""Deleted documents give their memory back: document buffers are their own mappings
(`store.document_buffer`), so after add/delete churn the process shrinks by what the store frees.
Run in a child process so that the resident-size readings are this scenario's alone."""

from __future__ import annotations

import subprocess
import sys

import torch

from sglang_msa.memory_manager.store import HOST_MAPPING_MIN_BYTES, document_buffer

CHURN = """
import random, psutil, torch
from sglang_msa.memory_manager.store import LayerTensors, MemoryStore, StoredDocument
rng = random.Random(0)
store = MemoryStore(budget_bytes=1 << 36, chunk_size=4)
store.create("m")
def document(gid):
    n = rng.randint(200, 2000)
    tensor = lambda rows: torch.randn(rows, 2, 64)
    layers = {layer: LayerTensors(pooled_k=tensor(-(-n // 4)), pooled_v=tensor(-(-n // 4)), router_k=tensor(-(-n // 4)),
                                  full_k=tensor(n), full_v=tensor(n)) for layer in range(4)}
    return StoredDocument(gid=gid, num_tokens=n, num_chunks=-(-n // 4), layers=layers)
live = []
for gid in range(300):  # keep ~40 documents while adding 300, deleting at random
    store.commit_document("m", document(gid)); live.append(gid)
    if len(live) > 40:
        store.remove_document("m", live.pop(rng.randrange(len(live))))
before, freed = psutil.Process().memory_info().rss, store.used_bytes()
for gid in live:
    store.remove_document("m", gid)
print(freed, before - psutil.Process().memory_info().rss, store.used_bytes())
"""


def test_document_buffers_are_separate_mappings():
    buffer = document_buffer(HOST_MAPPING_MIN_BYTES // 2, torch.bfloat16, torch.device("cpu"))
    assert buffer.dtype == torch.bfloat16 and buffer.numel() == HOST_MAPPING_MIN_BYTES // 2
    assert buffer.untyped_storage().nbytes() == HOST_MAPPING_MIN_BYTES  # the mapping itself, nothing more
    small = document_buffer(16, torch.float32, torch.device("cpu"))  # small ones stay on the heap
    assert small.numel() == 16


def test_deleting_documents_returns_their_memory_to_the_system():
    result = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    freed, returned, left = (int(x) for x in result.stdout.split())
    assert left == 0 and freed > 100 * 2**20  # ~40 documents of ~1-9 MB were still stored
    assert returned >= 0.9 * freed, (freed, returned)
