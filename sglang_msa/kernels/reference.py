"""Pure-PyTorch reference of the MSA math (see docs/architecture.md and the MSA spec).

Every function here is written for clarity, not speed: it defines what the fast kernels and the
serving path must compute. Shapes use these names:

    n      tokens of one document (or of several documents packed back to back)
    C      pooled chunks (all documents of a memory, in document order)
    D      documents of a memory
    T      routing-query tokens of one request
    H      query heads, Hkv key/value heads (GQA: query head h reads KV head h // (H // Hkv))
    d      head dimension

The pipeline per routed layer is: pool (`pool_chunks`) at ingestion, route (`route_documents`)
at query prefill, then attend over [template prefix ; pooled chunks of the selected documents ;
local causal context] (`msa_attention` / `msa_attention_split`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

HeadReduce = Literal["mean", "max"]
QueryReduce = Literal["max", "mean", "last", "zmax", "zmean"]
ChunkReduce = Literal["max", "mean"]
Similarity = Literal["cosine", "dot"]


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------
def document_positions(doc_lens: Sequence[int]) -> torch.Tensor:
    """RoPE positions of documents packed back to back: 0..n_i-1 for every document i."""
    if len(doc_lens) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(int(n), dtype=torch.long) for n in doc_lens])


def query_positions(num_tokens: int, start: int = 0, position_offset: int = 19) -> torch.Tensor:
    """Positions of local tokens `start .. start+num_tokens-1`: shifted after the memory.

    The offset is fixed (3 template tokens + top_k documents, 19 for MSA-4B): it does not
    depend on how many documents or chunks a request actually selected.
    """
    return torch.arange(start, start + num_tokens, dtype=torch.long) + position_offset


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkLayout:
    """Where each pooled chunk comes from.

    chunk_doc[c]       index of the document chunk c belongs to
    doc_chunk_start[i] first chunk of document i (length D + 1: the last entry is C)
    chunk_token_count  tokens averaged into each chunk (P, or fewer for a partial last chunk)
    """

    chunk_doc: torch.Tensor
    doc_chunk_start: torch.Tensor
    chunk_token_count: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_doc.numel())

    @property
    def num_docs(self) -> int:
        return int(self.doc_chunk_start.numel()) - 1


def chunk_layout(doc_lens: Sequence[int], chunk_size: int) -> ChunkLayout:
    """Cut every document into ceil(n_i / chunk_size) chunks; chunks never cross documents."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk_doc, starts, counts = [], [0], []
    for doc, n in enumerate(doc_lens):
        n = int(n)
        if n <= 0:
            raise ValueError(f"document {doc} has length {n}; documents must not be empty")
        full, rest = divmod(n, chunk_size)
        sizes = [chunk_size] * full + ([rest] if rest else [])
        chunk_doc += [doc] * len(sizes)
        counts += sizes
        starts.append(starts[-1] + len(sizes))
    return ChunkLayout(
        chunk_doc=torch.tensor(chunk_doc, dtype=torch.long),
        doc_chunk_start=torch.tensor(starts, dtype=torch.long),
        chunk_token_count=torch.tensor(counts, dtype=torch.long),
    )


def pool_chunks(x: torch.Tensor, doc_lens: Sequence[int], chunk_size: int) -> torch.Tensor:
    """Mean of `x` over each chunk of each document.

    x: [sum(doc_lens), ...] per-token tensors (K after RoPE, V, or router keys) of documents
    packed back to back. Returns [C, ...] in x's dtype; the mean is taken in (at least) float32 over the
    tokens actually present, so a partial last chunk divides by its own length.
    """
    if x.shape[0] != sum(int(n) for n in doc_lens):
        raise ValueError(f"x has {x.shape[0]} tokens but doc_lens sum to {sum(doc_lens)}")
    layout = chunk_layout(doc_lens, chunk_size)
    pooled = []
    token = 0
    for count in layout.chunk_token_count.tolist():
        pooled.append(x[token : token + count].to(accumulation_dtype(x)).mean(dim=0))
        token += count
    if not pooled:
        return x.new_zeros((0, *x.shape[1:]))
    return torch.stack(pooled).to(x.dtype)


def exclude_sink_from_first_chunk(pooled: torch.Tensor, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """One document's pooled router keys `pooled` [C, ...] with its first chunk re-pooled without
    the document's first token (the attention sink every document shares), from its per-token
    `x` [n, ...]. A one-token document keeps its only token. Returns `pooled`, changed in place."""
    n = x.shape[0]
    if n > 1:
        pooled[0] = x[1 : min(n, chunk_size)].to(accumulation_dtype(x)).mean(dim=0).to(pooled.dtype)
    return pooled


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------
def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference computes in: float32, or float64 when given float64."""
    return torch.promote_types(x.dtype, torch.float32)


def expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[..., Hkv, d] -> [..., H, d]: repeat each KV head for its group of query heads."""
    num_kv_heads = x.shape[-2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return x.repeat_interleave(num_q_heads // num_kv_heads, dim=-2)


STANDARDIZED_REDUCTIONS = ("zmax", "zmean")
CONSTANT_SCORE_TOLERANCE = 1e-6


def standardized_scores(per_token: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """z = (s - mean) / std of each routing token's scores `per_token` [T, n], given the mean and
    standard deviation [T] of that token's scores over all the memory's chunks. A token whose scores
    are constant over the memory (std <= 1e-6 x the root mean square of its scores, e.g. a
    one-chunk memory) standardizes to 0. Returns float64."""
    mean, std = mean.double(), std.double()
    constant = std <= CONSTANT_SCORE_TOLERANCE * torch.sqrt(mean**2 + std**2)
    inverse_std = torch.where(constant, 0.0, 1.0 / std.clamp_min(torch.finfo(torch.float64).tiny))
    return (per_token.double() - mean[:, None]) * inverse_std[:, None]


def chunk_scores(
    router_q: torch.Tensor,
    chunk_keys: torch.Tensor,
    similarity: Similarity = "dot",
    head_reduce: HeadReduce = "mean",
    query_reduce: QueryReduce = "max",
) -> torch.Tensor:
    """Score of every chunk for one request: S_c = reduce_u reduce_h sim(q_{u,h}, k_{c,g(h)}).

    router_q:   [T, H, d] router queries of the routing tokens (T >= 1)
    chunk_keys: [C, Hkv, d] pooled router keys
    similarity: "dot" is <q, k> / sqrt(d); "cosine" L2-normalises q and k per head first.
    query_reduce: "zmax" / "zmean" standardize each token's scores over all C chunks first
    (`standardized_scores`), then take the max / mean over tokens.
    Returns [C] in the accumulation dtype.
    """
    if router_q.shape[0] == 0:
        raise ValueError("routing needs at least one routing-query token")
    dtype = accumulation_dtype(router_q)
    q = router_q.to(dtype)
    k = expand_kv_heads(chunk_keys.to(dtype), q.shape[1])  # [C, H, d]
    if similarity == "cosine":
        q = torch.nn.functional.normalize(q, dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
        scale = 1.0
    elif similarity == "dot":
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        raise ValueError(f"unknown similarity {similarity!r}")
    sim = torch.einsum("thd,chd->tch", q, k) * scale  # [T, C, H]
    if head_reduce == "mean":
        per_token = sim.mean(dim=-1)
    elif head_reduce == "max":
        per_token = sim.amax(dim=-1)
    else:
        raise ValueError(f"unknown head_reduce {head_reduce!r}")
    if query_reduce in STANDARDIZED_REDUCTIONS:
        rows = per_token.double()
        mean = rows.mean(dim=1)
        z = standardized_scores(rows, mean, ((rows - mean[:, None]) ** 2).mean(dim=1).sqrt())
        return (z.amax(dim=0) if query_reduce == "zmax" else z.mean(dim=0)).to(dtype)
    if query_reduce == "max":
        return per_token.amax(dim=0)
    if query_reduce == "mean":
        return per_token.mean(dim=0)
    if query_reduce == "last":
        return per_token[-1]
    raise ValueError(f"unknown query_reduce {query_reduce!r}")


def document_scores(
    scores_per_chunk: torch.Tensor, layout: ChunkLayout, chunk_reduce: ChunkReduce = "max"
) -> torch.Tensor:
    """Reduce chunk scores [C] to document scores [D] (max or mean over each document's chunks)."""
    out = scores_per_chunk.new_empty(layout.num_docs)
    starts = layout.doc_chunk_start.tolist()
    for doc in range(layout.num_docs):
        chunk_scores_of_doc = scores_per_chunk[starts[doc] : starts[doc + 1]]
        if chunk_reduce == "max":
            out[doc] = chunk_scores_of_doc.amax()
        elif chunk_reduce == "mean":
            out[doc] = chunk_scores_of_doc.mean()
        else:
            raise ValueError(f"unknown chunk_reduce {chunk_reduce!r}")
    return out


def select_top_k(doc_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best documents, best first; ties go to the lower document index.

    Documents scored -inf (deleted or masked out) are never selected, so fewer than k indices
    come back when the memory holds fewer than k valid documents (empty memory: none).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    valid = torch.nonzero(doc_scores > float("-inf")).flatten().tolist()
    valid.sort(key=lambda doc: (-float(doc_scores[doc]), doc))
    return torch.tensor(valid[:k], dtype=torch.long)


def route_documents(
    router_q: torch.Tensor,
    chunk_keys: torch.Tensor,
    layout: ChunkLayout,
    top_k: int,
    similarity: Similarity = "dot",
    head_reduce: HeadReduce = "mean",
    query_reduce: QueryReduce = "max",
    chunk_reduce: ChunkReduce = "max",
) -> torch.Tensor:
    """One routed layer's selection for one request: the top-k document indices, best first."""
    if layout.num_docs == 0:
        return torch.zeros(0, dtype=torch.long)
    per_chunk = chunk_scores(router_q, chunk_keys, similarity, head_reduce, query_reduce)
    return select_top_k(document_scores(per_chunk, layout, chunk_reduce), top_k)


def selected_chunk_indices(selected_docs: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """All chunks of the selected documents, document by document in selection order."""
    starts = layout.doc_chunk_start
    parts = [torch.arange(int(starts[d]), int(starts[d + 1])) for d in selected_docs.tolist()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Attention over [template prefix ; selected memory ; local causal context]
# --------------------------------------------------------------------------------------------
def visibility_mask(num_q: int, num_prefix: int, num_memory: int, num_local: int) -> torch.Tensor:
    """[num_q, prefix + memory + local] bool mask.

    The queries are the last num_q of the num_local local tokens. Every query sees the whole
    prefix and memory, and the local tokens up to and including itself.
    """
    if num_q > num_local:
        raise ValueError(f"{num_q} queries but only {num_local} local tokens")
    q_index = torch.arange(num_q).unsqueeze(1) + (num_local - num_q)
    local_visible = torch.arange(num_local).unsqueeze(0) <= q_index
    always = torch.ones(num_q, num_prefix + num_memory, dtype=torch.bool)
    return torch.cat([always, local_visible], dim=1)


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to the keys `mask` allows, with its log-sum-exp.

    q [T, H, d], k/v [S, Hkv, d(v)], mask [T, S] bool. Returns (out [T, H, dv], lse [T, H]),
    both in the accumulation dtype. A query with no visible key gets out = 0 and lse = -inf, so that merging it
    with another partial attention leaves the other one unchanged.
    """
    dtype = accumulation_dtype(q)
    k = expand_kv_heads(k.to(dtype), q.shape[1])
    v = expand_kv_heads(v.to(dtype), q.shape[1])
    logits = torch.einsum("thd,shd->ths", q.to(dtype), k) * scale
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [T, H]
    # A fully masked row has lse = -inf; clamping keeps exp(-inf - lse) at 0 instead of NaN.
    weights = torch.exp(logits - lse.unsqueeze(-1).clamp_min(torch.finfo(logits.dtype).min))
    out = torch.einsum("ths,shd->thd", weights, v)
    return out, lse


def merge_partial_attentions(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of two disjoint key sets from their partial results."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe_lse = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe_lse), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe_lse), torch.zeros_like(lse))
    return out_a * w_a.unsqueeze(-1) + out_b * w_b.unsqueeze(-1), lse


@dataclass(frozen=True)
class AttentionInputs:
    """One request in one layer.

    q:        [T, H, d]   queries: the last T local tokens (after RoPE at their offset positions)
    prefix_*: [P, Hkv, d] template prefix K/V (P = 3 for the MSA chat template, 0 allowed)
    memory_*: [M, Hkv, d] pooled chunks of the selected documents (M = 0: no memory)
    local_*:  [L, Hkv, d] local context K/V, L >= T, causal
    """

    q: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    memory_k: torch.Tensor
    memory_v: torch.Tensor
    local_k: torch.Tensor
    local_v: torch.Tensor
    scale: float


def msa_attention(inputs: AttentionInputs) -> torch.Tensor:
    """One joint softmax over [prefix ; memory ; local(causal)]. Returns [T, H, dv]."""
    k = torch.cat([inputs.prefix_k, inputs.memory_k, inputs.local_k])
    v = torch.cat([inputs.prefix_v, inputs.memory_v, inputs.local_v])
    mask = visibility_mask(
        inputs.q.shape[0], inputs.prefix_k.shape[0], inputs.memory_k.shape[0], inputs.local_k.shape[0]
    )
    out, _ = partial_attention(inputs.q, k, v, mask, inputs.scale)
    return out


def msa_attention_split(inputs: AttentionInputs) -> torch.Tensor:
    """The same result as `msa_attention`, as the fast path computes it.

    Part 1 attends over the selected memory chunks only (no mask: every query sees all of them);
    part 2 over [prefix ; local] with the causal mask; the two are merged by log-sum-exp.
    """
    num_q = inputs.q.shape[0]
    memory_mask = torch.ones(num_q, inputs.memory_k.shape[0], dtype=torch.bool)
    out_mem, lse_mem = partial_attention(
        inputs.q, inputs.memory_k, inputs.memory_v, memory_mask, inputs.scale
    )
    context_mask = visibility_mask(num_q, inputs.prefix_k.shape[0], 0, inputs.local_k.shape[0])
    out_ctx, lse_ctx = partial_attention(
        inputs.q,
        torch.cat([inputs.prefix_k, inputs.local_k]),
        torch.cat([inputs.prefix_v, inputs.local_v]),
        context_mask,
        inputs.scale,
    )
    out, _ = merge_partial_attentions(out_mem, lse_mem, out_ctx, lse_ctx)
    return out
