"""Tenant isolation where the data is, as a property (hypothesis): random sequences of adds,
deletes and query batches mixing tenants, run through the msa backend on real SGLang pools,
against a plain model of who owns which document. Every query selects exactly the reference
top-k over the live documents of the memory it names, never another tenant's."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_msa.config import MSAOptions
from sglang_msa.kernels import reference as ref
from sglang_msa.memory_manager.requests import IngestParams, IngestState, QueryParams, QueryState
from test_backend_memory import HKV, Harness, D, H, parts  # noqa: F401  (parts: the pools fixture)

TENANTS = ("t0", "t1", "t2")
TOP_K, CHUNK = 2, 4

operation = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(TENANTS), st.integers(1, 9), st.floats(0.0, 3.0)),
    st.tuples(st.just("delete"), st.sampled_from(TENANTS), st.integers(0, 20)),
    st.tuples(st.just("query"), st.lists(st.sampled_from(TENANTS), min_size=1, max_size=4)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(operation, min_size=1, max_size=14), seed=st.integers(0, 2**16))
def test_queries_only_ever_see_their_own_live_documents(parts, operations, seed):  # noqa: F811
    gen = torch.Generator().manual_seed(seed)
    harness = Harness(parts, MSAOptions(top_k_docs=TOP_K, chunk_size=CHUNK, memory_content="pooled"))
    store = harness.service.store
    for tenant in TENANTS:
        store.create(tenant)
    owned: dict[str, dict[int, torch.Tensor]] = {tenant: {} for tenant in TENANTS}  # gid -> pooled keys
    next_gid = 0
    for step, op in enumerate(operations):
        if op[0] == "add":  # gids unique across tenants, so a leak cannot hide behind a shared number
            _, tenant, n, strength = op
            k = torch.randn(n, HKV, D, generator=gen) + strength
            rid = f"ingest-{step}"
            harness.service.registry.put(rid, IngestState(IngestParams(op="ingest", memory_key=tenant, gid=next_gid, grant="-"),
                                                          num_tokens=n))
            harness.extend_batch([(rid, torch.randn(n, H * D, generator=gen), k, torch.randn(n, HKV, D, generator=gen))])
            assert harness.service.take_report(rid)["stored"]
            harness.service.store.publish(tenant, [next_gid])
            # router keys: pooled K, the first chunk without the document's sink token
            owned[tenant][next_gid] = ref.exclude_sink_from_first_chunk(ref.pool_chunks(k, [n], CHUNK), k, CHUNK)
            next_gid += 1
        elif op[0] == "delete":
            _, tenant, index = op
            if owned[tenant]:
                gid = sorted(owned[tenant])[index % len(owned[tenant])]
                assert store.remove_document(tenant, gid)
                del owned[tenant][gid]
        else:
            items, expected = [], {}
            for i, tenant in enumerate(op[1]):
                rid, n = f"query-{step}-{i}", 3
                q = torch.randn(n, H * D, generator=gen)
                harness.service.registry.put(rid, QueryState(params=QueryParams(memory_key=tenant), prompt_len=n,
                                                             routing_spans=[(0, n)], position_offset=16))
                items.append((rid, q, torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)))
                gids = sorted(owned[tenant])
                if gids:
                    layout = ref.chunk_layout([owned[tenant][g].shape[0] * CHUNK for g in gids], CHUNK)
                    scores = ref.document_scores(
                        ref.chunk_scores(q.view(n, H, D), torch.cat([owned[tenant][g] for g in gids]), "dot"), layout)
                    expected[rid] = [gids[j] for j in ref.select_top_k(scores, TOP_K).tolist()]
                else:
                    expected[rid] = []
            harness.extend_batch(items)
            for rid, *_ in items:
                tenant = op[1][int(rid.rsplit("-", 1)[1])]
                selected = harness.service.take_report(rid)["layers"]["0"]["doc_gids"]
                assert set(selected) <= set(owned[tenant]), (tenant, selected)
                assert selected == expected[rid]
