"""Scoring: router recall@k and answer exact match (contains-match: no LLM judge offline)."""

from __future__ import annotations

import re


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
