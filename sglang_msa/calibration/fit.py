"""Fitting a router adapter on extracted features (`features.Features`).

Per routed layer, with x the attention input, μ its mean over the calibration chunks:
  router_q = Wq (x − μ),  router_k = Wk (x − μ),  [heads · head_dim] each,
scored as the server scores an adapter's routers: dot products averaged over heads
(÷ heads·√head_dim), the mean over the query's routing tokens, the max over a document's chunks.

1. Closed form, no labels: Wq = Wk = the top-`dims` PCA whitening Λ^{-1/2}Uᵀ of the chunk
   features' covariance.
2. MSA's InfoNCE (τ = 0.1, on scores divided by the initial scores' spread, so τ means the same
   for every layer and model): each training query against every calibration document, the
   positive its own; AdamW, weight decay toward the closed form. The held-out queries
   (documents never trained on as positives) are scored before and after.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from sglang_msa.calibration.features import Features

TAU = 0.1


@dataclass
class LayerFit:
    q_proj: torch.Tensor  # [dims, hidden]
    k_proj: torch.Tensor
    center: torch.Tensor  # [hidden]
    losses: list[float]
    heldout_before: dict[str, float]
    heldout_after: dict[str, float]


def whitening(chunks: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(center [hidden], W [dims, hidden]): the top-`dims` principal directions, each scaled to
    unit variance."""
    x = chunks.double()
    center = x.mean(0)
    covariance = torch.cov((x - center).T)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    top = torch.argsort(eigenvalues, descending=True)[:dims]
    scale = eigenvalues[top].clamp_min(eigenvalues[top].max() * 1e-6).rsqrt()
    return center.float(), (eigenvectors[:, top] * scale).T.contiguous().float()


def document_scores(q_proj: torch.Tensor, k_proj: torch.Tensor, center: torch.Tensor, queries: torch.Tensor,
                    chunks: torch.Tensor, chunk_doc: torch.Tensor, num_documents: int, heads: int) -> torch.Tensor:
    """[Q, D] routing scores as the server computes them (dot, head mean, chunk max)."""
    head_dim = q_proj.shape[0] // heads
    q = (queries - center) @ q_proj.T
    k = (chunks - center) @ k_proj.T
    per_chunk = q @ k.T / (heads * math.sqrt(head_dim))
    out = per_chunk.new_full((queries.shape[0], num_documents), float("-inf"))
    return out.scatter_reduce(1, chunk_doc.expand(queries.shape[0], -1), per_chunk, "amax")


def retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor) -> dict[str, float]:
    """R@1, R@16 and MRR of the positive documents."""
    if scores.shape[0] == 0:
        return {"recall@1": 0.0, "recall@16": 0.0, "mrr": 0.0}
    positive = scores.gather(1, positives[:, None])
    rank = (scores > positive).sum(1) + 1
    return {"recall@1": float((rank <= 1).float().mean()), "recall@16": float((rank <= 16).float().mean()),
            "mrr": float((1.0 / rank.float()).mean())}


def fit_layer(chunks: torch.Tensor, chunk_doc: torch.Tensor, queries: torch.Tensor, positives: torch.Tensor,
              train: torch.Tensor, heldout: torch.Tensor, num_documents: int, dims: int, heads: int, steps: int,
              lr: float = 2e-3, batch: int = 256, negatives: int = 1024, decay: float = 1e-2,
              seed: int = 0) -> LayerFit:
    """One layer: whitening, then `steps` InfoNCE steps of `batch` training queries against their
    positives and `negatives` random other documents."""
    center, w0 = whitening(chunks, dims)

    def all_scores(wq, wk, rows):
        return document_scores(wq, wk, center, queries[rows], chunks, chunk_doc, num_documents, heads)

    with torch.no_grad():
        before = retrieval_metrics(all_scores(w0, w0, heldout), positives[heldout])
        spread = float(all_scores(w0, w0, train[:batch]).std().clamp_min(1e-6))
    wq, wk = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([wq, wk], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = train[torch.randint(len(train), (min(batch, len(train)),), generator=generator)]
        docs = torch.unique(torch.cat([positives[rows], torch.randperm(num_documents, generator=generator)[:negatives]]))
        remap = torch.full((num_documents,), -1, dtype=torch.long)
        remap[docs] = torch.arange(len(docs))
        kept = remap[chunk_doc] >= 0
        logits = document_scores(wq, wk, center, queries[rows], chunks[kept], remap[chunk_doc[kept]], len(docs),
                                 heads) / (spread * TAU)
        loss = torch.nn.functional.cross_entropy(logits, remap[positives[rows]])
        penalty = decay * (((wq - w0) ** 2).sum() + ((wk - w0) ** 2).sum()) / w0.numel()
        optimizer.zero_grad()
        (loss + penalty).backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        after = retrieval_metrics(all_scores(wq, wk, heldout), positives[heldout])
    return LayerFit(wq.detach(), wk.detach(), center, losses, before, after)


def split_queries(positives: torch.Tensor, num_documents: int, heldout_fraction: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query indices for training and held out, split by document: a held-out query's document
    is never a training positive."""
    generator = torch.Generator().manual_seed(seed)
    heldout_docs = torch.randperm(num_documents, generator=generator)[: max(1, int(num_documents * heldout_fraction))]
    is_heldout = torch.isin(positives, heldout_docs)
    return torch.nonzero(~is_heldout).flatten(), torch.nonzero(is_heldout).flatten()


def fit_adapter_layers(features: Features, positives: torch.Tensor, dims: int, heads: int, steps: int,
                       heldout_fraction: float = 0.15, seed: int = 0, log=print) -> dict[int, LayerFit]:
    train, heldout = split_queries(positives, features.num_documents, heldout_fraction, seed)
    fits = {}
    for layer in sorted(features.chunks):
        started = time.perf_counter()
        fits[layer] = fit_layer(features.chunks[layer], features.chunk_doc, features.queries[layer], positives,
                                train, heldout, features.num_documents, dims, heads, steps, seed=seed)
        fit = fits[layer]
        log(f"layer {layer}: loss {fit.losses[0] if fit.losses else float('nan'):.3f} -> "
            f"{fit.losses[-1] if fit.losses else float('nan'):.3f}; held-out R@16 "
            f"{fit.heldout_before['recall@16']:.3f} -> {fit.heldout_after['recall@16']:.3f}, MRR "
            f"{fit.heldout_before['mrr']:.3f} -> {fit.heldout_after['mrr']:.3f} ({time.perf_counter() - started:.1f} s)")
    return fits
