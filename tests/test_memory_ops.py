"""`memory_ops.route` against documents deleted while a request routes (the control thread
deletes between the routing view and the content fetch): the request keeps routing, without
the deleted documents, and the scheduler does not fail."""

from __future__ import annotations

import torch

from sglang_msa.attention_backend import memory_ops
from sglang_msa.config import MSAOptions
from sglang_msa.memory_manager.store import MemoryStore, StoredDocument

HKV, D, CHUNK = 2, 8, 4


class DeletesAfterSnapshot(MemoryStore):
    """A store whose documents named in `victims` are deleted right after a routing view is taken."""

    victims: list[int] = []

    def routing_view(self, memory_id, layer_id):
        view = super().routing_view(memory_id, layer_id)
        for gid in self.victims:
            self.remove_document(memory_id, gid)
        return view


def filled_store(gen) -> DeletesAfterSnapshot:
    store = DeletesAfterSnapshot(budget_bytes=1 << 30, chunk_size=CHUNK)
    store.create("m")
    for gid, n in enumerate((5, 9, 4, 7)):
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        layers = {0: memory_ops.pool_document(k, v, CHUNK, keep_full=False)}
        store.commit_document("m", StoredDocument(gid=gid, num_tokens=n, num_chunks=-(-n // CHUNK), layers=layers))
    return store


def test_a_document_deleted_while_routing_is_dropped_from_the_selection():
    options = MSAOptions(top_k_docs=3, chunk_size=CHUNK, memory_content="pooled")
    q = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(2))
    like = torch.zeros(1, HKV, D)
    untouched = memory_ops.route(filled_store(torch.Generator().manual_seed(3)), "m", 0, q, options, like)
    assert len(untouched.gids) == 3

    store = filled_store(torch.Generator().manual_seed(3))
    store.victims = [untouched.gids[0]]  # the best document goes while the request routes
    # same documents (same seed), so the same ranking; the victim is missing from the result
    selection = memory_ops.route(store, "m", 0, q, options, like)
    assert selection.gids == untouched.gids[1:]
    assert selection.scores == untouched.scores[1:]
    assert selection.memory_k.shape[0] == sum(store.documents("m", [g])[0].num_chunks for g in selection.gids)


def test_every_selected_document_deleted_gives_an_empty_selection():
    gen = torch.Generator().manual_seed(4)
    store = filled_store(gen)
    store.victims = [0, 1, 2, 3]
    selection = memory_ops.route(store, "m", 0, torch.randn(2, 4, D, generator=gen),
                                 MSAOptions(top_k_docs=2, chunk_size=CHUNK), torch.zeros(1, HKV, D))
    assert selection.gids == [] and selection.memory_k.shape == (0, HKV, D)
