"""Standardized routing (`query_reduce` "zmax" / "zmean"): the reference equals a float64 loop;
the CPU serving path (`routing_torch`, with the store's key moments or from the scores) equals the
reference, constant scores (one chunk) included; the store's key moments follow publish, remove,
drop and restore; a token with a huge score spread wins a max but not a zmax; and the options that
cannot standardize are refused."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sglang_msa.attention_backend import memory_ops
from sglang_msa.config import MSAOptions
from sglang_msa.kernels import reference as ref, routing_torch
from sglang_msa.kernels.key_moments import KeyMoments, scored_keys
from sglang_msa.kernels.routing_scan import RoutingPlan, RoutingRequest, quantize_fp8
from sglang_msa.memory_manager import store as store_module
from sglang_msa.memory_manager.service import MemoryService, ModelFacts, check_standardized_routing, \
    key_moments_similarity
from sglang_msa.memory_manager.store import ArchivedMemory, LayerTensors, MemoryStore, StoredDocument

SHAPES = [(1, 4, 4, 8, 5), (3, 6, 2, 24, 13), (5, 6, 3, 16, 70), (2, 8, 1, 32, 33)]  # T, H, Hkv, d, C
Z_REDUCTIONS = list(itertools.product(("dot", "cosine"), ("mean", "max"), ref.STANDARDIZED_REDUCTIONS))
HKV, D, CHUNK, LAYERS = 2, 8, 4, (1, 3)


def loop_scores(q: torch.Tensor, keys: torch.Tensor, similarity: str, head_reduce: str, query_reduce: str):
    """Brute force in float64: every (token, chunk) score by loops, each token standardized over the chunks."""
    tokens, heads, dim = q.shape
    chunks, group = keys.shape[0], heads // keys.shape[1]
    rows = []
    for t in range(tokens):
        row = []
        for c in range(chunks):
            per_head = []
            for h in range(heads):
                a, b = q[t, h].double(), keys[c, h // group].double()
                per_head.append(float(a @ b / (a.norm() * b.norm())) if similarity == "cosine"
                                else float(a @ b) / math.sqrt(dim))
            row.append(sum(per_head) / heads if head_reduce == "mean" else max(per_head))
        mean = sum(row) / chunks
        std = math.sqrt(sum((s - mean) ** 2 for s in row) / chunks)
        rows.append([0.0 if std <= 1e-6 * math.sqrt(mean**2 + std**2) else (s - mean) / std for s in row])
    columns = list(zip(*rows))
    return torch.tensor([max(col) if query_reduce == "zmax" else sum(col) / tokens for col in columns],
                        dtype=torch.float64)


@pytest.mark.parametrize("similarity,head_reduce,query_reduce", Z_REDUCTIONS)
def test_reference_equals_a_float64_loop(similarity, head_reduce, query_reduce):
    gen = torch.Generator().manual_seed(7)
    for tokens, heads, kv_heads, dim, chunks in [(3, 4, 2, 8, 6), (1, 3, 1, 5, 9), (4, 2, 2, 4, 1)]:
        q = torch.randn(tokens, heads, dim, generator=gen, dtype=torch.float64)
        keys = torch.randn(chunks, kv_heads, dim, generator=gen, dtype=torch.float64) + 0.5
        got = ref.chunk_scores(q, keys, similarity, head_reduce, query_reduce)
        torch.testing.assert_close(got, loop_scores(q, keys, similarity, head_reduce, query_reduce),
                                   rtol=0, atol=1e-9)


def read_fn(keys: torch.Tensor, fp8: bool):
    """(keys as scored, a tile reader): float8 keys dequantized per tile, as the store reads them."""
    if not fp8:
        return keys, lambda start, end: keys[start:end]
    stored, scales = quantize_fp8(keys)
    dequantized = stored.float() * scales.unsqueeze(-1)
    return dequantized, lambda start, end: stored[start:end].float() * scales[start:end, :, None]


@pytest.mark.parametrize("similarity,head_reduce,query_reduce", Z_REDUCTIONS)
def test_routing_torch_equals_the_reference(similarity, head_reduce, query_reduce):
    gen = torch.Generator().manual_seed(hash((similarity, head_reduce, query_reduce)) % 2**31)
    for (tokens, heads, kv_heads, dim, chunks), tile, fp8, with_moments in itertools.product(
            SHAPES, (7, 32768), (False, True), (False, True)):
        q = torch.randn(tokens, heads, dim, generator=gen)
        keys, read = read_fn(torch.randn(chunks, kv_heads, dim, generator=gen) + 0.3, fp8)
        moments = KeyMoments.of_keys(keys, similarity) if with_moments else None
        want = ref.chunk_scores(q.double(), keys.double(), similarity, head_reduce, query_reduce)
        got = routing_torch.chunk_scores(q, chunks, read, similarity, head_reduce, query_reduce, tile=tile,
                                         key_moments=moments)
        assert got.shape == (chunks,) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("query_reduce", ref.STANDARDIZED_REDUCTIONS)
@pytest.mark.parametrize("head_reduce", ("mean", "max"))
def test_constant_scores_standardize_to_zero_and_an_empty_memory_has_no_scores(head_reduce, query_reduce):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 8, generator=gen)
    for keys in (torch.randn(1, 2, 8, generator=gen), torch.randn(1, 2, 8, generator=gen).expand(5, 2, 8)):
        want = ref.chunk_scores(q, keys, "dot", head_reduce, query_reduce)
        got = routing_torch.chunk_scores(q, keys.shape[0], lambda s, e: keys[s:e], "dot", head_reduce, query_reduce,
                                         key_moments=KeyMoments.of_keys(keys, "dot"))
        assert torch.equal(want, torch.zeros(keys.shape[0])) and torch.equal(got, want)
    empty = torch.zeros(0, 2, 8)
    assert routing_torch.chunk_scores(q, 0, lambda s, e: empty, "dot", head_reduce, query_reduce).shape == (0,)
    assert ref.chunk_scores(q, empty, "dot", head_reduce, query_reduce).shape == (0,)


def test_a_token_with_a_huge_spread_wins_max_but_not_zmax():
    """Token 0's query is large and points along key feature 0; token 1's small, along feature 1.
    Document 0 has the larger feature 0 (token 0's best, by a huge margin in raw score), document 1
    is token 1's clear outlier in standardized terms: max picks document 0, zmax document 1."""
    q = torch.zeros(2, 1, 4)
    q[0, 0, 0], q[1, 0, 1] = 100.0, 1.0
    keys = torch.zeros(6, 1, 4)
    keys[:, 0, 0] = torch.tensor([2.0, 1.5, 1.0, 1.2, 0.8, 1.1])
    keys[:, 0, 1] = torch.tensor([0.0, 3.0, 0.0, 0.1, 0.0, 0.1])
    layout = ref.chunk_layout([CHUNK] * 6, CHUNK)
    assert ref.route_documents(q, keys, layout, 1, query_reduce="max").tolist() == [0]
    assert ref.route_documents(q, keys, layout, 1, query_reduce="zmax").tolist() == [1]
    got = routing_torch.chunk_scores(q, 6, lambda s, e: keys[s:e], query_reduce="zmax",
                                     key_moments=KeyMoments.of_keys(keys, "dot"))
    assert int(got.argmax()) == 1


def document(gid: int, num_tokens: int, gen: torch.Generator, fp8: bool) -> StoredDocument:
    chunks = -(-num_tokens // CHUNK)
    layers = {}
    for layer in LAYERS:
        router_k, scale = torch.randn(chunks, HKV, D, generator=gen) + layer, None
        if fp8:
            router_k, scale = quantize_fp8(router_k)
        pooled = torch.randn(chunks, HKV, D, generator=gen)
        layers[layer] = LayerTensors(pooled_k=pooled, pooled_v=pooled.clone(), router_k=router_k,
                                     router_k_scale=scale)
    return StoredDocument(gid=gid, num_tokens=num_tokens, num_chunks=chunks, layers=layers)


def assert_moments_of_remaining_keys(store: MemoryStore, memory_key: str, similarity: str) -> None:
    for layer in LAYERS:
        view = store.routing_view(memory_key, layer)
        if not view.gids:
            assert view.key_moments is None or view.key_moments.count == 0
            continue
        keys, scales = view.keys_and_scales()
        keys = keys if scales is None else keys.float() * scales.unsqueeze(-1)
        flat = scored_keys(keys, similarity)
        got = view.key_moments
        assert got.count == flat.shape[0]
        torch.testing.assert_close(got.key_sum, flat.sum(dim=0), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got.outer_sum, flat.T @ flat, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("similarity,fp8", [("dot", False), ("cosine", True)])
def test_store_moments_follow_publish_remove_drop_and_restore(similarity, fp8, monkeypatch):
    monkeypatch.setattr(store_module, "MOMENTS_BLOCK_CHUNKS", 3)  # keys read back in several blocks
    gen = torch.Generator().manual_seed(11)
    key_format = "fp8" if fp8 else None
    store = MemoryStore(1 << 24, CHUNK, router_key_format=key_format, key_moments_similarity=similarity)
    store.create("m")
    docs = [document(gid, n, gen, fp8) for gid, n in enumerate((9, 4, 1, 17, 6))]
    for doc in docs[:3]:
        store.commit_document("m", doc)
    store.stage_document("m", docs[3])  # staged: not routed, not counted
    assert_moments_of_remaining_keys(store, "m", similarity)
    before = store.routing_view("m", LAYERS[0]).key_moments
    store.publish("m", [3])
    assert store.routing_view("m", LAYERS[0]).key_moments.count == before.count + docs[3].num_chunks
    assert before.count == sum(doc.num_chunks for doc in docs[:3])  # a view keeps its version's moments
    store.remove_document("m", 1)
    store.stage_document("m", docs[4])
    store.discard("m", [4])
    assert_moments_of_remaining_keys(store, "m", similarity)
    for gid in (0, 2, 3):
        store.remove_document("m", gid)
    assert store.routing_view("m", LAYERS[0]).key_moments.count == 0
    assert_moments_of_remaining_keys(store, "m", similarity)
    store.commit_document("m", document(9, 5, gen, fp8))
    assert_moments_of_remaining_keys(store, "m", similarity)
    assert store.drop("m") and not store.exists("m")

    restored = MemoryStore(1 << 24, CHUNK, router_key_format=key_format, key_moments_similarity=similarity)
    restored.restore({"r": ArchivedMemory(owner=None, documents=[docs[0], docs[3]])})
    assert_moments_of_remaining_keys(restored, "r", similarity)
    assert restored.routing_view("r", LAYERS[1]).key_moments.count == docs[0].num_chunks + docs[3].num_chunks
    plain = MemoryStore(1 << 24, CHUNK)
    plain.create("p")
    plain.commit_document("p", docs[0])
    assert plain.routing_view("p", LAYERS[0]).key_moments is None


@pytest.mark.parametrize("query_reduce,head_reduce", [("zmax", "mean"), ("zmean", "mean"), ("zmax", "max")])
def test_top_documents_through_the_store_equal_the_reference(query_reduce, head_reduce):
    gen = torch.Generator().manual_seed(5)
    options = MSAOptions(query_reduce=query_reduce, head_reduce=head_reduce, top_k_docs=3)
    store = MemoryStore(1 << 24, CHUNK, key_moments_similarity=key_moments_similarity(options))
    store.create("m")
    for gid, n in enumerate((9, 4, 1, 17, 6, 12)):
        store.commit_document("m", document(gid, n, gen, False))
    store.remove_document("m", 2)
    q = torch.randn(4, 6, D, generator=gen)
    view = store.routing_view("m", LAYERS[1])
    assert (view.key_moments is not None) == (head_reduce == "mean")
    gids, scores, every = memory_ops.top_documents(view, q, options, "torch")
    want = ref.document_scores(ref.chunk_scores(q.double(), view.router_keys.double(), "dot", head_reduce,
                                                query_reduce), view.layout)
    torch.testing.assert_close(every.double(), want, rtol=0, atol=2e-5)
    assert gids == [view.gids[i] for i in ref.select_top_k(want, 3).tolist()]


class TwoRanks:
    size = 2


def test_standardized_routing_is_refused_where_it_is_not_implemented():
    assert MSAOptions(query_reduce="zmean").query_reduce == "zmean"
    with pytest.raises(ValueError, match="query_reduce 'zmax' needs kernels 'torch'"):
        check_standardized_routing(MSAOptions(query_reduce="zmax"), "cuda:0", None)
    with pytest.raises(ValueError, match="query_reduce 'zmean' needs kernels 'torch'"):
        check_standardized_routing(MSAOptions(query_reduce="zmean", kernels="triton"), "cpu", None)
    with pytest.raises(ValueError, match="query_reduce 'zmax' is not supported under --tp > 1"):
        check_standardized_routing(MSAOptions(query_reduce="zmax"), "cpu", TwoRanks())
    check_standardized_routing(MSAOptions(query_reduce="zmax", kernels="torch"), "cuda:0", None)
    check_standardized_routing(MSAOptions(query_reduce="max"), "cuda:0", TwoRanks())
    request = RoutingRequest(router_q=torch.randn(2, 4, 8), chunk_start=0, chunk_end=3, num_docs=1)
    with pytest.raises(ValueError, match="query_reduce 'zmax'"):
        RoutingPlan.build([request], "cpu", query_reduce="zmax")
    assert key_moments_similarity(MSAOptions(query_reduce="zmax", similarity="cosine")) == "cosine"
    assert key_moments_similarity(MSAOptions(query_reduce="zmax")) == "dot"
    assert key_moments_similarity(MSAOptions(query_reduce="zmax", head_reduce="max")) is None
    assert key_moments_similarity(MSAOptions()) is None
    facts = ModelFacts(num_layers=4, msa_config=None, max_prefill_tokens=None)
    assert MemoryService(MSAOptions(query_reduce="zmax"), facts).store.key_moments_similarity == "dot"
    with pytest.raises(ValueError, match="needs kernels 'torch'"):
        MemoryService(MSAOptions(query_reduce="zmax", kernels="triton"), facts)
