"""Does one tenant's oversized upload stall the others? A bounded, loopback-only probe.

One msa server (a tiny random Llama unless --model) with two tenants' keys and an admin key.
Tenant B reads its memory's listing and document every --interval seconds (requests the event
loop serves alone: their latency is the event loop's) and asks one short chat per round; tenant A
meanwhile posts, round after round for --load-s seconds: a 6 MB document, a 50 MB body, and a legal
document (just under max_document_tokens). Prints B's latency (p50 / p99 / max) quiet and under A's
uploads, and A's statuses and times per kind of upload; writes <out>/tenant_latency.json.

    SGLANG_USE_CPU_ENGINE=1 .venv/bin/python benchmarks/tenant_latency.py [--quiet-s 20] [--load-s 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from sglang_msa.server_process import start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import build_tiny_model  # noqa: E402

MAX_DOCUMENT_TOKENS = 4096


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(values: list[float]) -> dict:
    return {"count": len(values), "p50_s": statistics.median(values) if values else float("nan"),
            "p99_s": percentile(values, 0.99), "max_s": max(values, default=float("nan"))}


class Reader(threading.Thread):
    """Tenant B: timed listing + document reads, and a short chat every `chat_every` rounds."""

    def __init__(self, url: str, key: str, interval_s: float, chat_every: int = 10):
        super().__init__(daemon=True)
        self.url, self.headers, self.interval_s, self.chat_every = url, {"Authorization": f"Bearer {key}"}, \
            interval_s, chat_every
        self.samples: list[tuple[float, str, float]] = []  # (start, kind, latency)
        self.stopped = threading.Event()

    def timed(self, kind: str, method: str, path: str, **body) -> None:
        began = time.monotonic()
        response = requests.request(method, self.url + path, headers=self.headers, timeout=600,
                                    **({"json": body} if body else {}))
        response.raise_for_status()
        self.samples.append((began, kind, time.monotonic() - began))

    def run(self) -> None:
        rounds = 0
        while not self.stopped.is_set():
            self.timed("read", "GET", "/v1/memories/notes/documents")
            self.timed("read", "GET", "/v1/memories/notes/documents/fact")
            if rounds % self.chat_every == 0:
                self.timed("chat", "POST", "/v1/memories/notes/chat/completions", max_tokens=2,
                           messages=[{"role": "user", "content": "Where is the meeting?"}])
            rounds += 1
            time.sleep(self.interval_s)

    def between(self, start: float, end: float, kind: str) -> list[float]:
        return [latency for began, k, latency in self.samples if k == kind and start <= began < end]


def uploads(url: str, key: str, load_s: float) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """Tenant A's uploads, round after round for `load_s` seconds: kind -> [(status, seconds)], and
    kind -> the first refusal's message."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    legal = ("the quick brown fox jumps over the lazy dog " * 200)[:2400]  # ~1,500 tokens of the tiny model
    bodies = {
        "6 MB document": json.dumps({"documents": [{"text": "word " * (6 * 2**20 // 5)}]}).encode(),
        "50 MB body": json.dumps({"documents": [{"text": "x" * (50 * 2**20)}]}).encode(),
        f"legal document ({len(legal)} chars)": json.dumps({"documents": [{"text": legal}]}).encode(),
    }
    results: dict[str, list[tuple[int, float]]] = {what: [] for what in bodies}
    refusals: dict[str, str] = {}
    deadline = time.monotonic() + load_s
    while time.monotonic() < deadline:
        for what, body in bodies.items():
            began = time.monotonic()
            response = requests.post(f"{url}/v1/memories/uploads/documents", data=body, headers=headers, timeout=900)
            results[what].append((response.status_code, time.monotonic() - began))
            if response.status_code >= 400:
                refusals.setdefault(what, response.text[:300])
    return results, refusals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--quiet-s", type=float, default=20.0)
    parser.add_argument("--load-s", type=float, default=30.0)
    parser.add_argument("--interval-s", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tenant-latency-"))
    model = args.model or build_tiny_model("llama", work / "model", seed=0)
    keys = {secrets.token_hex(16): "tenant-a", secrets.token_hex(16): "tenant-b"}
    (work / "keys.json").write_text(json.dumps({"keys": keys}))
    key_a, key_b = list(keys)
    options = {"top_k_docs": 2, "chunk_size": 16, "max_document_tokens": MAX_DOCUMENT_TOKENS,
               "api_keys_file": str(work / "keys.json")}
    server_args = ["--max-total-tokens", "16384", "--log-level", "warning", "--msa-config", json.dumps(options),
                   "--admin-api-key", secrets.token_hex(16)]
    with start_server(model, "msa", extra_args=server_args, log_path=work / "server.log") as server:
        url = server.base_url
        for key, memory in ((key_b, "notes"), (key_a, "uploads")):
            requests.post(f"{url}/v1/memories", json={"memory_id": memory}, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}).raise_for_status()
        requests.post(f"{url}/v1/memories/notes/documents", timeout=60, headers={"Authorization": f"Bearer {key_b}"},
                      json={"documents": [{"doc_id": "fact", "text": "The meeting is in room 4."}]}).raise_for_status()
        reader = Reader(url, key_b, args.interval_s)
        reader.start()
        quiet_start = time.monotonic()
        time.sleep(args.quiet_s)
        loaded_start = time.monotonic()
        results, refusals = uploads(url, key_a, args.load_s)
        loaded_end = time.monotonic()
        reader.stopped.set()
        reader.join()
    report = {
        "command": " ".join(sys.argv),
        "reader_quiet": {kind: summary(reader.between(quiet_start, loaded_start, kind)) for kind in ("read", "chat")},
        "reader_during_uploads": {kind: summary(reader.between(loaded_start, loaded_end, kind))
                                  for kind in ("read", "chat")},
        "uploads": {what: {"statuses": sorted({status for status, _ in rows}), **summary([s for _, s in rows])}
                    for what, rows in results.items()},
        "refusals": refusals,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tenant_latency.json").write_text(json.dumps(report, indent=2))
    print(f"{'tenant B':<28}{'count':>7}{'p50 s':>9}{'p99 s':>9}{'max s':>9}")
    for phase in ("reader_quiet", "reader_during_uploads"):
        for kind, row in report[phase].items():
            print(f"{phase.removeprefix('reader_') + ' ' + kind:<28}{row['count']:>7}{row['p50_s']:>9.3f}"
                  f"{row['p99_s']:>9.3f}{row['max_s']:>9.3f}")
    print(f"\n{'tenant A upload':<36}{'statuses':>10}{'count':>7}{'p50 s':>9}{'max s':>9}")
    for what, row in report["uploads"].items():
        print(f"{what:<36}{str(row['statuses']):>10}{row['count']:>7}{row['p50_s']:>9.3f}{row['max_s']:>9.3f}")
    for what, message in refusals.items():
        print(f"  {what}: {message}")


if __name__ == "__main__":
    main()
