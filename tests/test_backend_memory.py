"""The msa backend's memory path on real SGLang pools, against the reference math.

Documents are ingested as hand-built prefill batches (their K/V pooled by the backend), then a
memory query is prefilled and decoded: the backend's routing selection, shifted positions and
attention outputs must equal `sglang_msa.kernels.reference` on the same tensors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import pytest
import torch

from sglang_msa.config import MSAOptions
from sglang_msa.kernels import reference as ref
from sglang_msa.kernels.routing_scan import quantize_fp8
from sglang_msa.memory_manager import service as service_module
from sglang_msa.memory_manager.requests import IngestParams, IngestState, QueryParams, QueryState
from sglang_msa.server_process import free_port

H, HKV, D = 4, 2, 16
DOC_LENS = [9, 4, 13, 7, 5]  # chunk_size 4: documents of 1..4 chunks, partial last chunks
MEMORY = "tenant-a/mem"


@pytest.fixture(scope="module")
def parts():
    # the imported names are returned through locals()
    from sglang.srt.layers.radix_attention import RadixAttention  # noqa: F401
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: F401
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: F401
    from sglang.srt.plugins import load_plugins

    load_plugins()
    return types.SimpleNamespace(**locals())


class Harness:
    """A one-layer 'model': an msa backend over real pools, driven batch by batch."""

    def __init__(self, parts, options: MSAOptions):
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

        self.parts = parts
        kv = parts.MHATokenToKVPool(size=1024, page_size=1, dtype=torch.float32, head_num=HKV, head_dim=D,
                                    layer_num=1, device="cpu", enable_memory_saver=False)
        r2t = parts.ReqToTokenPool(size=16, max_context_len=256, device="cpu", enable_memory_saver=False)
        runner = types.SimpleNamespace(
            device="cpu", req_to_token_pool=r2t, token_to_kv_pool=kv,
            model_config=types.SimpleNamespace(num_hidden_layers=1, dtype=torch.float32,
                                               hf_config=types.SimpleNamespace(model_type="llama")),
            server_args=types.SimpleNamespace(port=free_port(), chunked_prefill_size=None, model_path="tiny"),
        )
        facts = service_module.ModelFacts(num_layers=1, msa_config=None, max_prefill_tokens=None)
        service_module._service = service_module.MemoryService(options, facts)  # this test's options
        self.backend = ATTENTION_BACKENDS["msa"](runner)
        self.service = self.backend.service
        self.pool, self.r2t = kv, r2t
        self.layer = parts.RadixAttention(num_heads=H, head_dim=D, scaling=D**-0.5, num_kv_heads=HKV, layer_id=0)
        self.next_slot, self.next_row = 1, 1

    def new_request(self, length: int):
        """A request row and KV slots; both wrap around (earlier requests are finished by then)."""
        if self.next_slot + length > self.pool.size:
            self.next_slot = 1
        row, slots = self.next_row, torch.arange(self.next_slot, self.next_slot + length)
        self.r2t.req_to_token[row, :length] = slots.to(torch.int32)
        self.next_row = self.next_row % (self.r2t.size - 1) + 1
        self.next_slot += length
        return row, slots

    def extend(self, rid, row, slots, q, k, v):
        n = k.shape[0]
        batch = self.parts.ForwardBatch(
            forward_mode=self.parts.ForwardMode.EXTEND, batch_size=1, input_ids=torch.zeros(n, dtype=torch.long),
            req_pool_indices=torch.tensor([row]), seq_lens=torch.tensor([n]), out_cache_loc=slots, seq_lens_sum=n,
            extend_seq_lens=torch.tensor([n]), extend_prefix_lens=torch.tensor([0]),
            positions=torch.arange(n), rids=[rid],
        )
        self.backend.init_forward_metadata(batch)
        return self.backend.forward(q, k, v, self.layer, batch), batch.positions

    def extend_batch(self, items, decode_slots: int = 0):
        """One prefill batch of several new requests, (rid, q, k, v) each, each with `decode_slots`
        more KV slots reserved after its prompt. Returns (out, rows, slots)."""
        lengths = [k.shape[0] for _, _, k, _ in items]
        rows, slots = zip(*(self.new_request(n + decode_slots) for n in lengths))
        batch = self.parts.ForwardBatch(
            forward_mode=self.parts.ForwardMode.EXTEND, batch_size=len(items),
            input_ids=torch.zeros(sum(lengths), dtype=torch.long), req_pool_indices=torch.tensor(rows),
            seq_lens=torch.tensor(lengths), out_cache_loc=torch.cat([s[:n] for s, n in zip(slots, lengths)]),
            seq_lens_sum=sum(lengths),
            extend_seq_lens=torch.tensor(lengths), extend_prefix_lens=torch.zeros(len(items), dtype=torch.long),
            positions=torch.cat([torch.arange(n) for n in lengths]), rids=[rid for rid, *_ in items],
        )
        self.backend.init_forward_metadata(batch)
        q, k, v = (torch.cat([item[i] for item in items]) for i in (1, 2, 3))
        return self.backend.forward(q, k, v, self.layer, batch), rows, slots

    def decode(self, rid, row, slot, seq_len, q, k, v):
        batch = self.parts.ForwardBatch(
            forward_mode=self.parts.ForwardMode.DECODE, batch_size=1, input_ids=torch.zeros(1, dtype=torch.long),
            req_pool_indices=torch.tensor([row]), seq_lens=torch.tensor([seq_len]), out_cache_loc=slot.view(1),
            seq_lens_sum=seq_len, positions=torch.tensor([seq_len - 1]), rids=[rid],
        )
        self.backend.init_forward_metadata(batch)
        return self.backend.forward(q, k, v, self.layer, batch), batch.positions


# Both serving paths: the PyTorch reference path, and the Triton kernels (compiled on a GPU, where
# benchmarks/gpu_check.sh checks them; here under Triton's interpreter, which must be on before
# anything imports triton: `test_triton_path_in_an_interpreter_process` runs those cases in a child).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=["torch", "triton"] if INTERPRETED else ["torch"])
def kernels(request):
    return request.param


@pytest.mark.skipif(INTERPRETED, reason="this is the child process itself")
def test_triton_path_in_an_interpreter_process():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton and not interpreter"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert re.search(r"\b8 passed\b", result.stdout), tail  # 4 match-reference cases, empty memory, a batch, fp8, slot reuse


@pytest.mark.parametrize("memory_content", ["full", "pooled"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_ingest_route_attend_match_reference(parts, memory_content, similarity, kernels):
    gen = torch.Generator().manual_seed(hash((memory_content, similarity)) % 2**31)
    options = MSAOptions(top_k_docs=2, chunk_size=4, memory_content=memory_content, similarity=similarity,
                         kernels=kernels)
    harness = Harness(parts, options)
    store = harness.service.store
    assert store.create(MEMORY)

    # ingest: each document is its own prefill request
    doc_k, doc_v = [], []
    for gid, n in enumerate(DOC_LENS):
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        rid = f"ingest-{gid}"
        harness.service.registry.put(rid, IngestState(IngestParams(op="ingest", memory_key=MEMORY, gid=gid, grant="-"), num_tokens=n))
        row, slots = harness.new_request(n)
        harness.extend(rid, row, slots, torch.randn(n, H * D, generator=gen), k, v)
        assert harness.service.take_report(rid)["stored"]
        harness.service.store.publish(MEMORY, [gid])
        doc_k.append(k)
        doc_v.append(v)
    stats = store.stats(MEMORY)
    assert stats == {
        "documents": 5, "tokens": sum(DOC_LENS), "chunks": sum((n + 3) // 4 for n in DOC_LENS),
        "bytes": stats["bytes"], "device_bytes": stats["bytes"], "host_bytes": 0, "placement": "auto",
        "routed_documents": 5,  # one rank: it routes every document
    }

    # query: template of 2 tokens, routing spans = tokens 2, 3, 5, 6 of a 7-token prompt (two disjoint
    # ranges, like a later interleave round), then one decode step
    prompt_len, template, spans = 7, 2, [(2, 4), (5, 7)]
    rid = "query-1"
    harness.service.registry.put(rid, QueryState(
        params=QueryParams(memory_key=MEMORY, routing_spans=spans, template_tokens=template),
        prompt_len=prompt_len, routing_spans=spans, position_offset=40,
    ))
    row, slots = harness.new_request(prompt_len + 1)
    q = torch.randn(prompt_len, H * D, generator=gen)
    k, v = torch.randn(prompt_len + 1, HKV, D, generator=gen), torch.randn(prompt_len + 1, HKV, D, generator=gen)
    out, positions = harness.extend(rid, row, slots[:prompt_len], q, k[:prompt_len], v[:prompt_len])
    assert positions.tolist() == [0, 1, 40, 41, 42, 43, 44]  # template keeps 0..T-1, local starts at the offset

    # the reference selection over pooled router keys (training-free mode: pooled K, each
    # document's first chunk pooled without its sink token)
    pooled_k = [ref.pool_chunks(x, [x.shape[0]], 4) for x in doc_k]
    router_k = [ref.exclude_sink_from_first_chunk(pooled.clone(), x, 4) for pooled, x in zip(pooled_k, doc_k)]
    layout = ref.chunk_layout(DOC_LENS, 4)
    q3 = q.view(prompt_len, H, D)
    routing_q = torch.cat([q3[start:end] for start, end in spans])
    scores = ref.document_scores(ref.chunk_scores(routing_q, torch.cat(router_k), similarity), layout)
    expected_gids = ref.select_top_k(scores, 2).tolist()
    report = harness.service.registry.get(rid).report()
    assert report["layers"]["0"]["doc_gids"] == expected_gids
    torch.testing.assert_close(torch.tensor(report["layers"]["0"]["scores"]), scores[expected_gids], atol=1e-5, rtol=0)

    if memory_content == "full":
        memory_k = torch.cat([doc_k[g] for g in expected_gids])
        memory_v = torch.cat([doc_v[g] for g in expected_gids])
    else:
        memory_k = torch.cat([pooled_k[g] for g in expected_gids])
        memory_v = torch.cat([ref.pool_chunks(doc_v[g], [DOC_LENS[g]], 4) for g in expected_gids])

    def expected_rows(queries, context_len):
        return ref.msa_attention(ref.AttentionInputs(
            q=queries, prefix_k=k[:template], prefix_v=v[:template], memory_k=memory_k, memory_v=memory_v,
            local_k=k[template:context_len], local_v=v[template:context_len], scale=D**-0.5,
        )).reshape(queries.shape[0], H * D)

    torch.testing.assert_close(out[template:], expected_rows(q3[template:], prompt_len), rtol=1e-5, atol=1e-5)
    # template tokens never see memory: plain causal attention among themselves
    template_only = ref.msa_attention(ref.AttentionInputs(
        q=q3[:template], prefix_k=k[:0], prefix_v=v[:0], memory_k=k[:0], memory_v=v[:0],
        local_k=k[:template], local_v=v[:template], scale=D**-0.5,
    )).reshape(template, H * D)
    torch.testing.assert_close(out[:template], template_only, rtol=1e-5, atol=1e-5)

    # decode: the frozen selection, the next position
    q_dec = torch.randn(1, H * D, generator=gen)
    out_dec, positions = harness.decode(rid, row, slots[prompt_len], prompt_len + 1, q_dec,
                                        k[prompt_len:prompt_len + 1], v[prompt_len:prompt_len + 1])
    assert positions.tolist() == [45]
    torch.testing.assert_close(out_dec, expected_rows(q_dec.view(1, H, D), prompt_len + 1), rtol=1e-5, atol=1e-5)

    # a deleted document is never selected again
    store.remove_document(MEMORY, expected_gids[0])
    rid2 = "query-2"
    harness.service.registry.put(rid2, QueryState(
        params=QueryParams(memory_key=MEMORY, routing_spans=spans, template_tokens=template),
        prompt_len=prompt_len, routing_spans=spans, position_offset=40,
    ))
    row2, slots2 = harness.new_request(prompt_len)
    harness.extend(rid2, row2, slots2, q, k[:prompt_len], v[:prompt_len])
    gids_after = harness.service.registry.get(rid2).report()["layers"]["0"]["doc_gids"]
    assert expected_gids[0] not in gids_after and len(gids_after) == 2


def test_query_on_empty_memory_equals_dense(parts, kernels):
    """No documents: the memory part is empty and the output is plain causal attention."""
    harness = Harness(parts, MSAOptions(top_k_docs=4, chunk_size=4, kernels=kernels))
    harness.service.store.create("empty")
    gen = torch.Generator().manual_seed(5)
    n = 6
    rid = "q-empty"
    harness.service.registry.put(rid, QueryState(params=QueryParams(memory_key="empty"), prompt_len=n,
                                                 routing_spans=[(0, n)], position_offset=0))
    row, slots = harness.new_request(n)
    q, k, v = torch.randn(n, H * D, generator=gen), torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
    out, _ = harness.extend(rid, row, slots, q, k, v)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.view(n, H, D).transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True,
    ).transpose(0, 1).reshape(n, H * D)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    assert harness.service.take_report(rid)["layers"]["0"]["doc_gids"] == []


def test_routing_only_sees_the_named_memory(parts):
    """Memory B holds documents built to match the query far better than anything in A; a query
    on A still selects only A's documents (isolation is enforced where the data is)."""
    gen = torch.Generator().manual_seed(9)
    harness = Harness(parts, MSAOptions(top_k_docs=3, chunk_size=4, memory_content="pooled"))
    store = harness.service.store
    store.create("tenant-a")
    store.create("tenant-b")
    q = torch.randn(5, H * D, generator=gen)
    direction = q.view(5, H, D)[:, ::2].mean(0)  # what KV heads 0..HKV-1 would need to match q
    for memory_id, gids, strength in (("tenant-a", range(0, 4), 0.0), ("tenant-b", range(100, 104), 50.0)):
        for gid in gids:
            n = 6
            k = torch.randn(n, HKV, D, generator=gen) + strength * direction
            rid = f"ingest-{memory_id}-{gid}"
            harness.service.registry.put(rid, IngestState(IngestParams(op="ingest", memory_key=memory_id, gid=gid, grant="-"),
                                                          num_tokens=n))
            row, slots = harness.new_request(n)
            harness.extend(rid, row, slots, torch.randn(n, H * D, generator=gen), k, torch.randn(n, HKV, D, generator=gen))
            assert harness.service.take_report(rid)["stored"]
            harness.service.store.publish(memory_id, [gid])
    for memory_id, allowed in (("tenant-a", set(range(0, 4))), ("tenant-b", set(range(100, 104)))):
        rid = f"query-{memory_id}"
        harness.service.registry.put(rid, QueryState(params=QueryParams(memory_key=memory_id), prompt_len=5,
                                                     routing_spans=[(0, 5)], position_offset=6))
        row, slots = harness.new_request(5)
        harness.extend(rid, row, slots, q, torch.randn(5, HKV, D, generator=gen), torch.randn(5, HKV, D, generator=gen))
        selected = harness.service.take_report(rid)["layers"]["0"]["doc_gids"]
        assert len(selected) == 3 and set(selected) <= allowed


def test_a_batch_of_queries_each_matches_its_own_reference(parts, kernels):
    """Three queries in one prefill batch, then one decode batch: two memories (one empty),
    different template and prompt lengths. Every request's rows equal the reference over its own
    selection (the Triton path plans the whole batch at once)."""
    gen = torch.Generator().manual_seed(11)
    harness = Harness(parts, MSAOptions(top_k_docs=2, chunk_size=4, memory_content="pooled", kernels=kernels))
    store = harness.service.store
    store.create("full-mem")
    store.create("empty-mem")
    pooled = {}
    for gid, n in enumerate(DOC_LENS):
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        harness.service.registry.put(f"i{gid}", IngestState(IngestParams(op="ingest", memory_key="full-mem", gid=gid, grant="-"),
                                                            num_tokens=n))
        harness.extend_batch([(f"i{gid}", torch.randn(n, H * D, generator=gen), k, v)])
        store.publish("full-mem", [gid])
        pooled[gid] = (ref.pool_chunks(k, [n], 4), ref.pool_chunks(v, [n], 4))
    queries = [("qa", "full-mem", 6, 2), ("qb", "empty-mem", 4, 1), ("qc", "full-mem", 9, 3)]  # rid, memory, len, T
    items, tensors = [], {}
    for rid, memory, n, template in queries:
        harness.service.registry.put(rid, QueryState(
            params=QueryParams(memory_key=memory, template_tokens=template), prompt_len=n,
            routing_spans=[(template, n)], position_offset=30))
        q = torch.randn(n + 1, H * D, generator=gen)
        k, v = torch.randn(n + 1, HKV, D, generator=gen), torch.randn(n + 1, HKV, D, generator=gen)
        tensors[rid] = (q, k, v)
        items.append((rid, q[:n], k[:n], v[:n]))
    out, rows, slots = harness.extend_batch(items, decode_slots=1)

    def expected(rid, memory, n, template, queries, context_len):
        q, k, v = tensors[rid]
        gids = harness.service.registry.get(rid).report()["layers"]["0"]["doc_gids"]
        empty = k[:0]
        return ref.msa_attention(ref.AttentionInputs(
            q=queries, prefix_k=k[:template], prefix_v=v[:template],
            memory_k=torch.cat([pooled[g][0] for g in gids]) if gids else empty,
            memory_v=torch.cat([pooled[g][1] for g in gids]) if gids else empty,
            local_k=k[template:context_len], local_v=v[template:context_len], scale=D**-0.5,
        )).reshape(queries.shape[0], H * D), gids

    start = 0
    for rid, memory, n, template in queries:
        q = tensors[rid][0].view(n + 1, H, D)
        want, gids = expected(rid, memory, n, template, q[template:n], n)
        assert (gids == []) == (memory == "empty-mem") and len(gids) <= 2
        torch.testing.assert_close(out[start + template : start + n], want, rtol=1e-5, atol=1e-5)
        start += n

    # one decode step for all three (the batched path reuses the selections' rows from the prefill)
    decode = harness.parts.ForwardBatch(
        forward_mode=harness.parts.ForwardMode.DECODE, batch_size=3, input_ids=torch.zeros(3, dtype=torch.long),
        req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor([n + 1 for _, _, n, _ in queries]),
        out_cache_loc=torch.stack([s[-1] for s in slots]), seq_lens_sum=sum(n + 1 for _, _, n, _ in queries),
        positions=torch.tensor([n for _, _, n, _ in queries]), rids=[rid for rid, *_ in queries],
    )
    harness.backend.init_forward_metadata(decode)
    q_dec = torch.cat([tensors[rid][0][n : n + 1] for rid, _, n, _ in queries])
    k_dec = torch.cat([tensors[rid][1][n : n + 1] for rid, _, n, _ in queries])
    v_dec = torch.cat([tensors[rid][2][n : n + 1] for rid, _, n, _ in queries])
    out_dec = harness.backend.forward(q_dec, k_dec, v_dec, harness.layer, decode)
    for i, (rid, memory, n, template) in enumerate(queries):
        want, _ = expected(rid, memory, n, template, tensors[rid][0].view(n + 1, H, D)[n : n + 1], n + 1)
        torch.testing.assert_close(out_dec[i : i + 1], want, rtol=1e-5, atol=1e-5)


def test_fp8_router_keys_route_on_their_dequantized_values(parts, kernels):
    """router_key_format="fp8": router keys are stored as float8 with per-(chunk, KV head) scales
    (a quarter of these float32 keys' bytes) and routing selects exactly the reference top-k over
    the dequantized keys."""
    gen = torch.Generator().manual_seed(21)
    harness = Harness(parts, MSAOptions(top_k_docs=2, chunk_size=4, memory_content="pooled",
                                        router_key_format="fp8", kernels=kernels))
    store = harness.service.store
    store.create("m")
    dequantized = []
    for gid, n in enumerate(DOC_LENS):
        k = torch.randn(n, HKV, D, generator=gen)
        harness.service.registry.put(f"i{gid}", IngestState(IngestParams(op="ingest", memory_key="m", gid=gid, grant="-"),
                                                            num_tokens=n))
        harness.extend_batch([(f"i{gid}", torch.randn(n, H * D, generator=gen), k, torch.randn(n, HKV, D, generator=gen))])
        store.publish("m", [gid])
        quantized, scales = quantize_fp8(ref.exclude_sink_from_first_chunk(ref.pool_chunks(k, [n], 4), k, 4))
        dequantized.append(quantized.float() * scales.unsqueeze(-1))
    stored = store.document_tensors("m", 0).layers[0]
    assert stored.router_k.dtype == torch.float8_e4m3fn and stored.router_k_scale.shape == (3, HKV)
    assert stored.router_k.nbytes * 4 == stored.pooled_k.nbytes
    n = 5
    q = torch.randn(n, H * D, generator=gen)
    harness.service.registry.put("q", QueryState(params=QueryParams(memory_key="m"), prompt_len=n,
                                                 routing_spans=[(0, n)], position_offset=20))
    harness.extend_batch([("q", q, torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen))])
    scores = ref.document_scores(ref.chunk_scores(q.view(n, H, D), torch.cat(dequantized)),
                                 ref.chunk_layout(DOC_LENS, 4))
    report = harness.service.take_report("q")["layers"]["0"]
    assert report["doc_gids"] == ref.select_top_k(scores, 2).tolist()
    torch.testing.assert_close(torch.tensor(report["scores"]), scores[report["doc_gids"]], atol=1e-4, rtol=1e-4)


def test_a_selection_survives_deletion_and_slot_reuse(parts, kernels):
    """A query's frozen selection is read in place from the slot pool on the Triton path: deleting
    its documents and storing new ones meanwhile (which take the lowest free slots) must not change
    what its decode steps attend to; the slots are reused once the request's state is gone."""
    gen = torch.Generator().manual_seed(31)
    harness = Harness(parts, MSAOptions(top_k_docs=2, chunk_size=4, memory_content="full", kernels=kernels))
    store = harness.service.store
    store.create("m")

    def ingest(gid):
        n = DOC_LENS[gid % len(DOC_LENS)]
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        harness.service.registry.put(f"i{gid}", IngestState(IngestParams(op="ingest", memory_key="m", gid=gid, grant="-"),
                                                            num_tokens=n))
        harness.extend_batch([(f"i{gid}", torch.randn(n, H * D, generator=gen), k, v)])
        assert harness.service.take_report(f"i{gid}")["stored"]
        harness.service.store.publish("m", [gid])
        return k, v

    docs = {gid: ingest(gid) for gid in range(len(DOC_LENS))}
    n = 5
    q, k, v = torch.randn(n + 1, H * D, generator=gen), torch.randn(n + 1, HKV, D, generator=gen), \
        torch.randn(n + 1, HKV, D, generator=gen)
    harness.service.registry.put("q", QueryState(params=QueryParams(memory_key="m"), prompt_len=n,
                                                 routing_spans=[(0, n)], position_offset=30))
    _, rows, slots = harness.extend_batch([("q", q[:n], k[:n], v[:n])], decode_slots=1)
    selection = harness.service.registry.get("q").selections[0]
    assert (selection.in_place is not None) == (kernels == "triton")
    chosen = selection.gids
    memory_k = torch.cat([docs[g][0] for g in chosen])
    memory_v = torch.cat([docs[g][1] for g in chosen])
    held = store.used_bytes()
    for gid in chosen:
        assert store.remove_document("m", gid)
    for gid in range(100, 100 + len(DOC_LENS)):  # enough new documents to take every freed slot
        ingest(gid)
    out, _ = harness.decode("q", rows[0], slots[0][n], n + 1, q[n:], k[n:], v[n:])
    expected = ref.msa_attention(ref.AttentionInputs(
        q=q[n:].view(1, H, D), prefix_k=k[:0], prefix_v=v[:0], memory_k=memory_k, memory_v=memory_v,
        local_k=k, local_v=v, scale=D**-0.5,
    )).reshape(1, H * D)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    live = store.used_bytes()
    harness.service.take_report("q")  # the request's state leaves: its documents' slots are free
    if kernels == "triton":
        assert store.used_bytes() < live and store.used_bytes() > held  # the deleted ones went, the new stayed
    else:
        assert store.used_bytes() == live
