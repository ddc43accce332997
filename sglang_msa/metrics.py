"""The plugin's Prometheus series, on SGLang's own `/metrics` (served with `--enable-metrics`).

SGLang runs prometheus_client in multiprocess mode: the launcher sets `PROMETHEUS_MULTIPROC_DIR`
before it starts the scheduler, and `/metrics` (HTTP process) merges the files every process
writes there. So the series below are simply created in the process that observes them — the
store's sizes and routing times in the scheduler, ingestion and queries in the HTTP process —
and all appear on the same `/metrics`. Without that directory (metrics off, an in-process
Engine) every call here is a no-op and prometheus_client is never imported.

No series carries a tenant or memory label: `/metrics` has no authentication. Per-tenant
numbers are in `GET /v1/memories/-/stats` for the admin key.
"""

from __future__ import annotations

import functools
import os
import re
from types import SimpleNamespace

TIERS = ("device", "host")


def enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


@functools.cache
def _series() -> SimpleNamespace:
    # imported only now: prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is imported
    from prometheus_client import Counter, Gauge, Histogram

    def store_gauge(name: str, what: str) -> Gauge:  # every tensor-parallel rank holds every document: max
        return Gauge(f"sglang_msa_memory_{name}", f"{what} held by the scheduler's memories, by the tier holding "
                     "their content", ["tier"], multiprocess_mode="livemax")

    return SimpleNamespace(
        documents=store_gauge("documents", "Documents"),
        tokens=store_gauge("tokens", "Tokens of documents"),
        chunks=store_gauge("chunks", "Pooled chunks of documents"),
        bytes=Gauge("sglang_msa_memory_bytes", "Bytes of the memories per tier, summed over tensor-parallel ranks "
                    "(router keys count on the device)", ["tier"], multiprocess_mode="livesum"),
        routing=Histogram("sglang_msa_routing_seconds", "Routing time of one query in one routed layer", ["layer"],
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)),
        ingested_documents=Counter("sglang_msa_ingested_documents", "Documents stored (acknowledged)"),
        ingested_tokens=Counter("sglang_msa_ingested_tokens", "Tokens of the documents stored"),
        ingestion_rate=Gauge("sglang_msa_ingestion_tokens_per_second",
                             "Tokens per second of the latest ingestion batch", multiprocess_mode="mostrecent"),
        selected=Histogram("sglang_msa_selected_documents", "Documents a query's routing selected (over layers)",
                           buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128)),
        injection_rounds=Histogram("sglang_msa_injection_rounds", "Injection or interleave rounds of a query",
                                   buckets=(0, 1, 2, 3, 4, 6, 8, 16)),
        refusals=Counter("sglang_msa_refusals", "Memory API requests refused, by status and field", ["status", "field"]),
    )


def observe_store(store) -> None:
    """The store's totals per tier (`MemoryStore.tier_totals`, counted only with metrics on)."""
    if not enabled():
        return
    totals = store.tier_totals()
    series = _series()
    for tier in TIERS:
        for name in ("documents", "tokens", "chunks", "bytes"):
            getattr(series, name).labels(tier=tier).set(totals[tier][name])


def observe_routing(layer: int, seconds: float) -> None:
    if enabled():
        _series().routing.labels(layer=str(layer)).observe(seconds)


def observe_ingestion(documents: int, tokens: int, seconds: float) -> None:
    if not enabled() or not documents:
        return
    series = _series()
    series.ingested_documents.inc(documents)
    series.ingested_tokens.inc(tokens)
    if seconds > 0:
        series.ingestion_rate.set(tokens / seconds)


def observe_selected(documents: int) -> None:
    """The documents one memory request's routing selected (the union over its layers)."""
    if enabled():
        _series().selected.observe(documents)


def observe_injection_rounds(rounds: int) -> None:
    if enabled():
        _series().injection_rounds.observe(rounds)


def observe_refusal(status: int, field: str | None) -> None:
    """`field` without its indices (`documents[].text`), so the label's values stay few."""
    if enabled():
        _series().refusals.labels(status=str(status), field=re.sub(r"\[\d+\]", "[]", field or "")).inc()
