"""Scoring: router recall@k, answer exact match (contains-match: no LLM judge offline) and the
fraction of haystack documents a router ranks above a gold one."""

from __future__ import annotations

import re
import statistics


def recall_at_k(retrieved: list[str], gold: list[str], k: int) -> float:
    """Fraction of the gold documents among the first k retrieved."""
    if not gold:
        raise ValueError("recall needs at least one gold document")
    return len(set(retrieved[:k]) & set(gold)) / len(set(gold))


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def exact_match(answer: str, expected: list[str]) -> bool:
    """Every expected value appears in the answer (case- and whitespace-insensitive)."""
    normalized = normalize(answer)
    return all(normalize(value) in normalized for value in expected)


def haystack_above(rank: int, num_documents: int) -> float:
    """The fraction of the other documents that rank above a gold one (rank 1 = best)."""
    if not 1 <= rank <= num_documents:
        raise ValueError(f"rank {rank} out of 1..{num_documents}")
    return (rank - 1) / (num_documents - 1) if num_documents > 1 else 0.0


def explained_above(explain: dict, gold: list[str]) -> float:
    """Median haystack-above fraction over routed layers and gold documents, from a memory chat's
    `msa.explain` report ({doc_id: {layer: {"rank", "score", "num_documents"}}})."""
    fractions = [haystack_above(entry["rank"], entry["num_documents"])
                 for doc_id in gold for entry in explain[doc_id].values()]
    if not fractions:
        raise ValueError("the explain report names no routed layer for the gold documents")
    return statistics.median(fractions)
