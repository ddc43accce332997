"""What a router adapter projects, extracted once from the frozen model (HF transformers, fp32).

For a routed layer i the adapter reads the attention input: the residual stream entering layer i
after its `input_layernorm`, as the server's pre-hook captures it. Pooling and the query
reduction the adapter is trained for are means, and its projections are linear, so the features
are means too:
- per document chunk (64 tokens; the document's first token left out of its first chunk), the
  mean attention input — the router key of the chunk is the projection of this mean;
- per query, the mean attention input over its routing span (the question's tokens inside the
  chat template, encoded after the memory's positions as the server does) — with
  `query_reduce: mean` and dot scores, the routing score is the projection of this mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from sglang_msa.server.prompting import build_chat_prompt


@dataclass
class Features:
    chunks: dict[int, torch.Tensor]  # layer -> [num_chunks, hidden] float32
    chunk_doc: torch.Tensor  # [num_chunks] the document of each chunk (int64)
    queries: dict[int, torch.Tensor]  # layer -> [num_queries, hidden] float32
    num_documents: int
    num_tokens: int  # document tokens encoded


def _layer_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  layers: list[int]) -> dict[int, torch.Tensor]:
    """[B, L, hidden] attention input of each of `layers`."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True)
    return {i: model.model.layers[i].input_layernorm(out.hidden_states[i]) for i in layers}


def _batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length, at most `max_tokens` padded tokens per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for index in order:
        if current and lengths[index] * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def extract_features(model, tokenizer, documents: list[str], queries: list[str], layers: list[int],
                     chunk_size: int = 64, max_document_tokens: int = 512, batch_tokens: int = 4096,
                     progress: bool = True) -> Features:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    doc_ids = [tokenizer(text, add_special_tokens=False).input_ids[:max_document_tokens] for text in documents]
    doc_ids = [ids if ids else [pad_id] for ids in doc_ids]
    position_offset = max(len(ids) for ids in doc_ids)  # the server's offset: the memory's longest document
    chunk_rows: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in layers}
    chunk_docs: list[tuple[int, list[int]]] = []
    for batch in tqdm(_batches([len(x) for x in doc_ids], batch_tokens), desc="documents", disable=not progress):
        ids, mask = _pad([doc_ids[i] for i in batch], pad_id)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        inputs = _layer_inputs(model, ids, mask, positions, layers)
        for row, doc in enumerate(batch):
            n = len(doc_ids[doc])
            starts = list(range(0, n, chunk_size))
            chunk_docs.append((doc, [doc] * len(starts)))
            for layer in layers:
                h = inputs[layer][row, :n].float()
                means = [h[max(start, 1) if n > 1 else 0 : start + chunk_size].mean(0) for start in starts]
                chunk_rows[layer].append((doc, torch.stack(means)))
    # chunks in document order
    order = sorted(range(len(chunk_docs)), key=lambda k: chunk_docs[k][0])
    chunk_doc = torch.tensor([d for k in order for d in chunk_docs[k][1]], dtype=torch.long)
    chunks = {layer: torch.cat([chunk_rows[layer][k][1] for k in order]) for layer in layers}

    prompts = [build_chat_prompt(tokenizer, [{"role": "user", "content": q}], None) for q in queries]
    query_rows: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in layers}
    for batch in tqdm(_batches([len(p.input_ids) for p in prompts], batch_tokens), desc="queries",
                      disable=not progress):
        ids, mask = _pad([prompts[i].input_ids for i in batch], pad_id)
        positions = position_offset + torch.arange(ids.shape[1]).expand_as(ids)
        inputs = _layer_inputs(model, ids, mask, positions, layers)
        for row, query in enumerate(batch):
            start, end = prompts[query].routing_spans[0]
            for layer in layers:
                query_rows[layer].append((query, inputs[layer][row, start:end].float().mean(0)))
    queries_out = {layer: torch.stack([v for _, v in sorted(query_rows[layer], key=lambda x: x[0])])
                   for layer in layers}
    return Features(chunks=chunks, chunk_doc=chunk_doc, queries=queries_out, num_documents=len(documents),
                    num_tokens=sum(len(x) for x in doc_ids))
