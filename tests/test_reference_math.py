"""The MSA reference math against brute-force float64 loops on random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_msa.kernels import reference as ref

F64 = torch.float64


def brute_pool(x: torch.Tensor, doc_lens: list[int], chunk_size: int) -> torch.Tensor:
    rows, start = [], 0
    for n in doc_lens:
        for c in range(0, n, chunk_size):
            end = min(c + chunk_size, n)
            acc = torch.zeros(x.shape[1:], dtype=F64)
            for t in range(start + c, start + end):
                acc += x[t].to(F64)
            rows.append(acc / (end - c))
        start += n
    return torch.stack(rows) if rows else torch.zeros((0, *x.shape[1:]), dtype=F64)


def brute_doc_scores(q, keys, doc_lens, chunk_size, similarity, head_reduce, query_reduce, chunk_reduce):
    """Score every document with explicit loops over tokens, heads and chunks."""
    num_tokens, num_heads, dim = q.shape
    group = num_heads // keys.shape[1]
    doc_of_chunk = []
    for doc, n in enumerate(doc_lens):
        for _ in range(0, n, chunk_size):
            doc_of_chunk.append(doc)
    scores = []
    for doc in range(len(doc_lens)):
        per_chunk = []
        for c, owner in enumerate(doc_of_chunk):
            if owner != doc:
                continue
            per_token = []
            for t in range(num_tokens):
                sims = []
                for h in range(num_heads):
                    qv, kv = q[t, h].to(F64), keys[c, h // group].to(F64)
                    if similarity == "cosine":
                        sims.append(float(qv @ kv / (qv.norm() * kv.norm())))
                    else:
                        sims.append(float(qv @ kv) / math.sqrt(dim))
                per_token.append(sum(sims) / len(sims) if head_reduce == "mean" else max(sims))
            if query_reduce == "max":
                per_chunk.append(max(per_token))
            elif query_reduce == "mean":
                per_chunk.append(sum(per_token) / len(per_token))
            else:
                per_chunk.append(per_token[-1])
        scores.append(max(per_chunk) if chunk_reduce == "max" else sum(per_chunk) / len(per_chunk))
    return torch.tensor(scores, dtype=F64)


def brute_attention(q, prefix_k, prefix_v, mem_k, mem_v, loc_k, loc_v, scale):
    """Explicit per-query, per-head softmax over the keys that query may see."""
    num_q, num_heads, _ = q.shape
    group = num_heads // loc_k.shape[1]
    num_local = loc_k.shape[0]
    out = torch.zeros(num_q, num_heads, loc_v.shape[-1], dtype=F64)
    for t in range(num_q):
        last_visible = num_local - num_q + t
        for h in range(num_heads):
            g = h // group
            keys = [prefix_k[i, g] for i in range(prefix_k.shape[0])]
            vals = [prefix_v[i, g] for i in range(prefix_v.shape[0])]
            keys += [mem_k[i, g] for i in range(mem_k.shape[0])]
            vals += [mem_v[i, g] for i in range(mem_v.shape[0])]
            keys += [loc_k[i, g] for i in range(last_visible + 1)]
            vals += [loc_v[i, g] for i in range(last_visible + 1)]
            logits = torch.tensor([float(q[t, h].to(F64) @ k.to(F64)) * scale for k in keys], dtype=F64)
            weights = torch.softmax(logits, dim=0)
            for w, v in zip(weights, vals):
                out[t, h] += w * v.to(F64)
    return out


# ---------------------------------------------------------------------------- positions
def test_document_positions_restart_per_document():
    assert ref.document_positions([3, 1, 2]).tolist() == [0, 1, 2, 0, 0, 1]
    assert ref.document_positions([]).tolist() == []


def test_query_positions_follow_the_memory_offset():
    assert ref.query_positions(3).tolist() == [19, 20, 21]
    assert ref.query_positions(2, start=5, position_offset=3 + 4).tolist() == [12, 13]


# ---------------------------------------------------------------------------- pooling
@pytest.mark.parametrize(
    "doc_lens,chunk_size",
    [([64], 64), ([1], 64), ([65, 3, 130], 64), ([7, 7, 7], 3), ([5], 1), ([13, 29], 8)],
)
def test_pool_chunks_matches_brute_force(doc_lens, chunk_size):
    x = torch.randn(sum(doc_lens), 3, 5)
    pooled = ref.pool_chunks(x, doc_lens, chunk_size)
    torch.testing.assert_close(pooled.to(F64), brute_pool(x, doc_lens, chunk_size), rtol=1e-6, atol=1e-6)
    layout = ref.chunk_layout(doc_lens, chunk_size)
    assert layout.num_chunks == sum(math.ceil(n / chunk_size) for n in doc_lens)
    # chunks never cross documents: every chunk's tokens come from its own document
    assert layout.chunk_token_count.sum().item() == sum(doc_lens)
    for doc in range(len(doc_lens)):
        lo, hi = layout.doc_chunk_start[doc].item(), layout.doc_chunk_start[doc + 1].item()
        assert (layout.chunk_doc[lo:hi] == doc).all()
        assert layout.chunk_token_count[lo:hi].sum().item() == doc_lens[doc]


def test_pool_chunks_partial_chunk_divides_by_its_own_length():
    x = torch.arange(5, dtype=torch.float32).reshape(5, 1)
    assert ref.pool_chunks(x, [5], 4).flatten().tolist() == [1.5, 4.0]


def test_pool_chunks_bf16_is_accumulated_in_fp32():
    x = torch.randn(200, 2, 8).to(torch.bfloat16)
    pooled = ref.pool_chunks(x, [200], 64)
    assert pooled.dtype == torch.bfloat16
    expected = brute_pool(x, [200], 64).to(torch.bfloat16)
    assert torch.equal(pooled, expected)


def test_pool_chunks_empty_memory_and_bad_input():
    assert ref.pool_chunks(torch.zeros(0, 2, 4), [], 64).shape == (0, 2, 4)
    with pytest.raises(ValueError, match="doc_lens"):
        ref.pool_chunks(torch.zeros(5, 2, 4), [4], 64)
    with pytest.raises(ValueError, match="empty"):
        ref.chunk_layout([3, 0], 64)
    with pytest.raises(ValueError, match="chunk_size"):
        ref.chunk_layout([3], 0)


# ---------------------------------------------------------------------------- routing
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("head_reduce", ["mean", "max"])
@pytest.mark.parametrize("query_reduce", ["max", "mean", "last"])
@pytest.mark.parametrize("chunk_reduce", ["max", "mean"])
def test_document_scores_match_brute_force(similarity, head_reduce, query_reduce, chunk_reduce):
    gen = torch.Generator().manual_seed(hash((similarity, head_reduce, query_reduce, chunk_reduce)) % 2**31)
    doc_lens = [int(n) for n in torch.randint(1, 20, (5,), generator=gen)]
    chunk_size, num_heads, num_kv_heads, dim = 4, 6, 2, 7  # GQA group 3, odd sizes
    tokens = ref.pool_chunks(torch.randn(sum(doc_lens), num_kv_heads, dim, generator=gen), doc_lens, chunk_size)
    q = torch.randn(3, num_heads, dim, generator=gen)
    layout = ref.chunk_layout(doc_lens, chunk_size)
    per_chunk = ref.chunk_scores(q, tokens, similarity, head_reduce, query_reduce)
    got = ref.document_scores(per_chunk, layout, chunk_reduce)
    want = brute_doc_scores(q, tokens, doc_lens, chunk_size, similarity, head_reduce, query_reduce, chunk_reduce)
    torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-5)


def test_route_documents_picks_the_documents_holding_the_query_direction():
    torch.manual_seed(0)
    num_kv_heads, dim, chunk_size = 2, 16, 4
    doc_lens = [9, 4, 17, 3, 8, 12]
    keys = torch.randn(sum(doc_lens), num_kv_heads, dim) * 0.1
    direction = torch.randn(num_kv_heads, dim)
    offsets = [0]
    for n in doc_lens:
        offsets.append(offsets[-1] + n)
    for doc, strength in [(2, 5.0), (4, 3.0)]:  # doc 2 strongest, then doc 4
        keys[offsets[doc] : offsets[doc] + chunk_size] += strength * direction
    pooled = ref.pool_chunks(keys, doc_lens, chunk_size)
    layout = ref.chunk_layout(doc_lens, chunk_size)
    q = direction.repeat_interleave(2, dim=0).unsqueeze(0)  # 4 query heads, 1 routing token
    selected = ref.route_documents(q, pooled, layout, top_k=2)
    assert selected.tolist() == [2, 4]


def test_select_top_k_corner_cases():
    scores = torch.tensor([0.5, 2.0, float("-inf"), 2.0, -1.0])
    assert ref.select_top_k(scores, 2).tolist() == [1, 3]  # tie -> lower index first
    assert ref.select_top_k(scores, 16).tolist() == [1, 3, 0, 4]  # k > docs, -inf never chosen
    assert ref.select_top_k(scores, 0).tolist() == []
    assert ref.select_top_k(torch.zeros(0), 16).tolist() == []
    with pytest.raises(ValueError):
        ref.select_top_k(scores, -1)


def test_route_documents_empty_memory_and_single_document():
    q = torch.randn(2, 4, 8)
    empty = ref.chunk_layout([], 4)
    assert ref.route_documents(q, torch.zeros(0, 2, 8), empty, top_k=16).tolist() == []
    single = ref.chunk_layout([10], 4)
    keys = ref.pool_chunks(torch.randn(10, 2, 8), [10], 4)
    assert ref.route_documents(q, keys, single, top_k=16).tolist() == [0]


def test_selected_chunk_indices_cover_whole_documents():
    layout = ref.chunk_layout([5, 9, 2], 4)  # chunks: doc0 [0,1], doc1 [2,3,4], doc2 [5]
    assert ref.selected_chunk_indices(torch.tensor([2, 0]), layout).tolist() == [5, 0, 1]
    assert ref.selected_chunk_indices(torch.zeros(0, dtype=torch.long), layout).tolist() == []


def test_routing_rejects_bad_configuration():
    q, keys = torch.randn(1, 4, 8), torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="routing-query"):
        ref.chunk_scores(q[:0], keys)
    with pytest.raises(ValueError, match="similarity"):
        ref.chunk_scores(q, keys, similarity="l1")
    with pytest.raises(ValueError, match="multiple"):
        ref.chunk_scores(torch.randn(1, 3, 8), keys)


# ---------------------------------------------------------------------------- attention
def _random_inputs(gen, num_q, num_local, num_prefix, num_memory, num_heads=4, num_kv_heads=2, dim=8, dtype=torch.float32):
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return ref.AttentionInputs(
        q=r(num_q, num_heads, dim),
        prefix_k=r(num_prefix, num_kv_heads, dim),
        prefix_v=r(num_prefix, num_kv_heads, dim),
        memory_k=r(num_memory, num_kv_heads, dim),
        memory_v=r(num_memory, num_kv_heads, dim),
        local_k=r(num_local, num_kv_heads, dim),
        local_v=r(num_local, num_kv_heads, dim),
        scale=dim**-0.5,
    )


@pytest.mark.parametrize(
    "num_q,num_local,num_prefix,num_memory,num_heads,num_kv_heads",
    [
        (5, 5, 3, 7, 4, 2),  # prefill, GQA 2
        (1, 9, 3, 11, 6, 2),  # decode step, GQA 3
        (3, 8, 3, 0, 4, 4),  # empty memory (no selected documents), MHA
        (4, 4, 0, 5, 8, 1),  # no template prefix, MQA
        (1, 1, 3, 1, 2, 1),  # tiniest: one query, one chunk
        (7, 13, 3, 33, 4, 2),  # odd sizes
    ],
)
def test_attention_joint_and_split_match_brute_force(num_q, num_local, num_prefix, num_memory, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_q * 1000 + num_local * 10 + num_memory)
    inputs = _random_inputs(gen, num_q, num_local, num_prefix, num_memory, num_heads, num_kv_heads, dim=8)
    want = brute_attention(
        inputs.q, inputs.prefix_k, inputs.prefix_v, inputs.memory_k, inputs.memory_v,
        inputs.local_k, inputs.local_v, inputs.scale,
    )
    joint = ref.msa_attention(inputs)
    split = ref.msa_attention_split(inputs)
    torch.testing.assert_close(joint.to(F64), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.to(F64), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, joint, rtol=1e-5, atol=1e-6)


def test_attention_with_empty_memory_equals_causal_sdpa():
    gen = torch.Generator().manual_seed(7)
    inputs = _random_inputs(gen, 6, 6, 0, 0, num_heads=4, num_kv_heads=2, dim=16)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        inputs.q.transpose(0, 1), inputs.local_k.transpose(0, 1), inputs.local_v.transpose(0, 1),
        is_causal=True, enable_gqa=True,
    ).transpose(0, 1)
    torch.testing.assert_close(ref.msa_attention_split(inputs), sdpa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.msa_attention(inputs), sdpa, rtol=1e-5, atol=1e-6)


def test_float64_inputs_stay_float64():
    gen = torch.Generator().manual_seed(3)
    inputs = _random_inputs(gen, 2, 4, 3, 5, dtype=F64)
    want = brute_attention(
        inputs.q, inputs.prefix_k, inputs.prefix_v, inputs.memory_k, inputs.memory_v,
        inputs.local_k, inputs.local_v, inputs.scale,
    )
    torch.testing.assert_close(ref.msa_attention_split(inputs), want, rtol=1e-12, atol=1e-12)


def test_merge_with_an_empty_part_is_the_other_part():
    out = torch.randn(2, 3, 4)
    lse = torch.randn(2, 3)
    empty_out, empty_lse = torch.zeros(2, 3, 4), torch.full((2, 3), float("-inf"))
    merged, merged_lse = ref.merge_partial_attentions(out, lse, empty_out, empty_lse)
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    both_empty, both_lse = ref.merge_partial_attentions(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(both_empty, empty_out) and torch.isneginf(both_lse).all()


def test_memory_changes_the_output_only_through_selected_chunks():
    """A query that sees memory differs from one without, and the memory part is order-free."""
    gen = torch.Generator().manual_seed(11)
    inputs = _random_inputs(gen, 3, 5, 3, 6)
    no_memory = ref.AttentionInputs(**{**inputs.__dict__, "memory_k": inputs.memory_k[:0], "memory_v": inputs.memory_v[:0]})
    assert not torch.allclose(ref.msa_attention(inputs), ref.msa_attention(no_memory))
    perm = torch.randperm(6, generator=gen)
    shuffled = ref.AttentionInputs(**{**inputs.__dict__, "memory_k": inputs.memory_k[perm], "memory_v": inputs.memory_v[perm]})
    torch.testing.assert_close(ref.msa_attention(shuffled), ref.msa_attention(inputs), rtol=1e-5, atol=1e-6)
