"""The per-request memory operations of the pure-torch MSA path, built on the reference math."""

from __future__ import annotations

import logging

import torch

from sglang_msa.config import MSAOptions
from sglang_msa.kernels import attention_torch, pooling, reference as ref, routing_scan, routing_torch
from sglang_msa.memory_manager.requests import DocScores, IngestState, LayerSelection, SlotRows
from sglang_msa.memory_manager.sharding import MemoryShard
from sglang_msa.memory_manager.store import LayerTensors, MemoryOperationError, MemoryStore, RoutingView, StoredDocument

logger = logging.getLogger(__name__)


def pool_document(
    keys: torch.Tensor, values: torch.Tensor, chunk_size: int, keep_full: bool,
    router_keys: torch.Tensor | None = None, kernels: str = "torch", router_key_format: str = "model",
    shard: MemoryShard | None = None, exclude_sink: bool = False, pooled_router_keys: torch.Tensor | None = None,
) -> LayerTensors:
    """One document's routed-layer tensors from its token K (after RoPE), V and router keys
    (MSA checkpoints, router adapters), K and V [n, Hkv, d], router keys [n, Hr, dr].

    Training-free routing (no router keys) uses the pooled keys as router keys: the same tensor,
    unless `exclude_sink` leaves the document's first token out of its router-key pooling.
    `router_key_format="fp8"` stores router keys as float8 with one scale per (chunk, head). In
    full-resolution mode `keys` and `values` are kept as they are: pass tensors of this document
    alone (the rows gathered from the KV pool are such copies).

    Under tensor parallelism (`shard`) the inputs hold this rank's KV heads: the pooled router
    keys are all-gathered along heads (a collective: every rank pools the same document here).
    Router keys a router adapter computed from the whole hidden state are already whole: pass no
    `shard` for them.

    `pooled_router_keys` [chunks, Hr, dr] are router keys made per chunk (an external router's
    text embeddings): stored as they are, in place of pooled ones.
    """
    n = keys.shape[0]
    if kernels == "triton":
        pooled_k, pooled_v, pooled_router_k = pooling.pool_layer(keys, values, router_keys, [n], chunk_size)
    else:
        pooled_k = ref.pool_chunks(keys, [n], chunk_size)
        pooled_v = ref.pool_chunks(values, [n], chunk_size)
        pooled_router_k = None if router_keys is None else ref.pool_chunks(router_keys, [n], chunk_size)
    if pooled_router_keys is not None:
        pooled_router_k = pooled_router_keys
    elif exclude_sink:
        source = keys if router_keys is None else router_keys
        pooled_router_k = pooled_k.clone() if pooled_router_k is None else pooled_router_k
        ref.exclude_sink_from_first_chunk(pooled_router_k, source, chunk_size)
    if pooled_router_k is None:
        pooled_router_k = pooled_k
    if shard is not None:
        pooled_router_k = shard.gather_heads(pooled_router_k)
    scales = None
    if router_key_format == "fp8":  # a float8 copy even of pooled keys: routing reads only these
        pooled_router_k, scales = routing_scan.quantize_fp8(pooled_router_k)
    return LayerTensors(
        pooled_k=pooled_k, pooled_v=pooled_v, router_k=pooled_router_k,
        full_k=keys if keep_full else None, full_v=values if keep_full else None, router_k_scale=scales,
    )


def stage_ingestion(store: MemoryStore, state: IngestState) -> None:
    """Store the ingested document, staged: routing sees it once the server recorded its
    acknowledgement (`MemoryStore.publish`)."""
    params = state.params
    first = next(iter(state.pooled.values()))
    doc = StoredDocument(
        gid=params.gid, num_tokens=state.num_tokens, num_chunks=first.pooled_k.shape[0], layers=dict(state.pooled)
    )
    state.pooled.clear()
    try:
        store.stage_document(params.memory_key, doc)
        state.stored = True
    except MemoryOperationError as exc:  # memory deleted meanwhile, ingestion discarded, budget
        state.error, state.error_status = str(exc), exc.status
        logger.warning("sglang-msa: document %d not stored: %s", params.gid, exc)
    except OSError as exc:  # the memory directory's disk (full, read-only): a refusal, not a crash
        state.error, state.error_status = f"the document could not be written to the memory directory: {exc}", 507
        logger.error("sglang-msa: document %d not stored: %s", params.gid, exc)


def empty_selection(like: torch.Tensor) -> LayerSelection:
    empty = like.new_zeros((0, *like.shape[1:]))
    return LayerSelection(gids=[], scores=[], memory_k=empty, memory_v=empty)


def route(
    store: MemoryStore, memory_key: str, layer_id: int, router_q: torch.Tensor, options: MSAOptions,
    like: torch.Tensor, kernels: str = "torch",
) -> LayerSelection:
    """Score the memory's documents for this request in this layer and keep the top-k.

    `like` ([*, Hkv, d], the layer's KV buffer) gives the shape of an empty selection. `kernels`
    "triton" scores with the fused routing scan, "torch" with the reference.
    """
    try:
        view = store.routing_view(memory_key, layer_id)
    except MemoryOperationError:  # the memory was deleted after the request was admitted
        return empty_selection(like)
    gids, scores, every_score = top_documents(view, router_q, options, kernels)
    selection = read_selection(store, memory_key, layer_id, gids, scores, options, like, kernels)
    if every_score is not None:
        selection.doc_scores = DocScores(list(view.gids), every_score)
    return selection


def route_sharded(
    store: MemoryStore, memory_key: str, layer_id: int, router_q: torch.Tensor, options: MSAOptions,
    like: torch.Tensor, kernels: str, shard: MemoryShard, queries_whole: bool = False,
) -> LayerSelection:
    """`route` under tensor parallelism: `router_q` holds this rank's query heads (or, with
    `queries_whole`, every head: a router adapter's); the queries are gathered along heads, this
    rank's shard of router keys is scored, and the ranks agree on the global top-k
    (`sharding.MemoryShard`). Every rank calls it for the same request and layer."""
    if not queries_whole:
        router_q = shard.gather_heads(router_q)
    try:
        view = store.routing_view(memory_key, layer_id)
        gids, scores, _ = top_documents(view, router_q, options, kernels)
    except MemoryOperationError:  # deleted after admission: on every rank alike (same control step)
        gids, scores = [], []
    gids, scores = shard.global_top_k(gids, scores, options.top_k_docs)
    return read_selection(store, memory_key, layer_id, gids, scores, options, like, kernels)


def top_documents(view: RoutingView, router_q: torch.Tensor, options: MSAOptions,
                  kernels: str) -> tuple[list[int], list[float], torch.Tensor | None]:
    """The view's best `top_k_docs` documents for `router_q` [T, H, d], best first, with their
    scores; and every document's score (float32, CPU, in the view's order)."""
    if not view.gids:
        return [], [], None
    similarity = "dot" if options.similarity == "auto" else options.similarity
    reductions = (similarity, options.head_reduce, options.query_reduce, options.chunk_reduce)
    if kernels == "triton":
        request = routing_scan.RoutingRequest(router_q=router_q, chunk_start=0, chunk_end=view.layout.num_chunks,
                                              num_docs=len(view.gids))
        plan = routing_scan.RoutingPlan.build([request], router_q.device, *reductions)
        doc_scores = routing_scan.scan_layer(plan, [router_q], view.key_table())
        chosen, scores = routing_scan.best_documents(doc_scores, options.top_k_docs)
        return [view.gids[i] for i in chosen], scores, doc_scores.float().cpu()
    per_chunk = routing_torch.chunk_scores(router_q, view.layout.num_chunks, view.read_keys, *reductions[:3],
                                           key_moments=view.key_moments)
    doc_scores = ref.document_scores(per_chunk, view.layout, options.chunk_reduce)
    chosen = ref.select_top_k(doc_scores, options.top_k_docs).tolist()
    return [view.gids[i] for i in chosen], [float(doc_scores[i]) for i in chosen], doc_scores.float().cpu()


def read_selection(
    store: MemoryStore, memory_key: str, layer_id: int, gids: list[int], scores: list[float], options: MSAOptions,
    like: torch.Tensor, kernels: str,
) -> LayerSelection:
    """The selection of documents `gids` (best first): their content, read in place on the
    Triton path when it is on the device, else gathered."""
    try:
        docs = store.documents(memory_key, gids)
    except MemoryOperationError:  # the memory was deleted while this request routed
        return empty_selection(like)
    # a document deleted while this request routed is dropped from its selection
    present = {doc.gid for doc in docs}
    kept = [(gid, score) for gid, score in zip(gids, scores) if gid in present]
    if not kept:
        return empty_selection(like)
    gids, scores = [gid for gid, _ in kept], [score for _, score in kept]
    if kernels == "triton":  # the attention kernel reads device-tier rows where they are
        in_place = store.content_in_place(docs, layer_id, options.memory_content)
        if in_place is not None and in_place[0].dtype == like.dtype:
            key_buffer, value_buffer, slots = in_place
            rows = SlotRows(key_buffer, value_buffer, slots.to(device=like.device, dtype=torch.int32))
            store.pin(docs)  # released with the request's state (service._release_state)
            return LayerSelection(gids=gids, scores=scores, memory_k=None, memory_v=None, in_place=rows, pinned=docs)
    if like.device.type != "cuda":
        memory_k, memory_v = store.content(docs, layer_id, options.memory_content, like.device)
        return LayerSelection(gids=gids, scores=scores, memory_k=memory_k.to(like.dtype),
                              memory_v=memory_v.to(like.dtype))
    # On a GPU the rows are gathered (host-tier ones copied from pinned memory) on a side stream,
    # so the copy runs while the layer's dense attention does; readers wait on `ready`.
    reader, side = torch.cuda.current_stream(like.device), _gather_stream(like.device)
    side.wait_stream(reader)  # device-tier rows written by commits queued before this read
    with torch.cuda.stream(side):
        memory_k, memory_v = store.content(docs, layer_id, options.memory_content, like.device)
        memory_k, memory_v = memory_k.to(like.dtype), memory_v.to(like.dtype)
        ready = torch.cuda.Event()
        ready.record(side)
    memory_k.record_stream(reader)  # freed rows are not reused before the reader is done
    memory_v.record_stream(reader)
    return LayerSelection(gids=gids, scores=scores, memory_k=memory_k, memory_v=memory_v, ready=ready)


_gather_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def _gather_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream that gathers selected rows on `device` (one per device)."""
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device not in _gather_streams:
        _gather_streams[device] = torch.cuda.Stream(device)
    return _gather_streams[device]


def attend(
    q: torch.Tensor, context_k: torch.Tensor, context_v: torch.Tensor, selection: LayerSelection,
    template_tokens: int, scale: float,
) -> torch.Tensor | None:
    """Attention of the request's new tokens that come after the template.

    q: [num_new, H, d], the last num_new tokens of the request's context_k/v [seq_len, Hkv, d].
    Returns [num_local_new, H, dv] for the last num_local_new rows of q (tokens at index >= T),
    or None when every new token is a template token (those never see memory).
    """
    seq_len = context_k.shape[0]
    num_local_new = min(q.shape[0], seq_len - template_tokens)
    if num_local_new <= 0:
        return None
    memory_k, memory_v = selection.gathered()
    inputs = ref.AttentionInputs(
        q=q[q.shape[0] - num_local_new :],
        prefix_k=context_k[:template_tokens], prefix_v=context_v[:template_tokens],
        memory_k=memory_k, memory_v=memory_v,
        local_k=context_k[template_tokens:], local_v=context_v[template_tokens:],
        scale=scale,
    )
    return attention_torch.msa_attention_split(inputs)
