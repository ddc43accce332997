"""A query's routing report: the injection ranking by standardized scores summed over the routed
layers, and the explained documents' ranks."""

from __future__ import annotations

import torch

from sglang_msa.memory_manager.requests import DocScores, LayerSelection, QueryParams, QueryState, standardized


def query(explain=()):
    params = QueryParams(memory_id="m", explain_gids=list(explain))
    return QueryState(params=params, prompt_len=4, position_offset=0, routing_spans=[(0, 4)])


def select(gids, scores):
    return LayerSelection(gids=gids, scores=scores, memory_k=None, memory_v=None)


def test_standardized_scores():
    z = standardized(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(z, torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(standardized(torch.tensor([5.0, 5.0])), torch.zeros(2))
    torch.testing.assert_close(standardized(torch.tensor([5.0])), torch.zeros(1))


def test_injection_ranks_by_the_z_sum_not_by_votes():
    state = query()
    gids = [10, 11, 12, 13]
    # document 12 is second everywhere by a wide margin; 10 and 11 each win one layer narrowly
    layers = {0: [3.0, 0.0, 2.9, -5.0], 1: [0.0, 3.0, 2.9, -5.0]}
    for layer, scores in layers.items():
        state.record_scores(layer, DocScores(gids, torch.tensor(scores)))
        top = sorted(range(4), key=lambda i: -scores[i])[:1]
        state.selections[layer] = select([gids[i] for i in top], [scores[i] for i in top])
    report = state.report()
    assert report["retrieved_gids"] == [10, 11]  # what attention read: each layer's top-1
    assert report["ranked_gids"][:1] == [12] and report["ranked_gids"][-1] == 13
    expected = standardized(torch.tensor(layers[0])) + standardized(torch.tensor(layers[1]))
    assert report["ranked_gids"] == [gids[i] for i in torch.argsort(expected, descending=True).tolist()]


def test_a_memory_changed_between_layers_adds_by_document():
    state = query()
    state.record_scores(0, DocScores([1, 2, 3], torch.tensor([0.0, 1.0, 2.0])))
    state.record_scores(1, DocScores([1, 3], torch.tensor([5.0, 0.0])))  # document 2 deleted meanwhile
    # z: layer 0 (-1, 0, 1), layer 1 (+0.71 for 1, -0.71 for 3): sums -0.29, 0, +0.29
    assert state.ranked_gids() == [3, 2, 1]


def test_without_every_score_the_union_ranks():
    state = query()
    state.selections[0] = select([4, 5], [1.0, 0.5])
    state.selections[1] = select([5], [2.0])
    assert state.ranked_gids() == [5, 4]


def test_explained_documents_get_rank_score_and_size_per_layer():
    state = query(explain=[3, 9])
    state.record_scores(2, DocScores([1, 2, 3, 4], torch.tensor([0.5, 0.9, 0.7, 0.1])))
    state.record_scores(3, DocScores([1, 2, 3, 4], torch.tensor([0.9, 0.1, 0.2, 0.3])))
    assert state.report()["explain"] == {3: {"2": {"rank": 2, "score": 0.7, "num_documents": 4},
                                             "3": {"rank": 3, "score": 0.2, "num_documents": 4}}}
