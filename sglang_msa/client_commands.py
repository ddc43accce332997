"""`sglang-msa ingest` and `sglang-msa ask`: a corpus into a running server's memory, and a
question over it, through the memory API's HTTP endpoints.

`ingest` reads the corpus (`corpus.py`), asks the server which documents it already holds
(`?hashes=true`: doc_id and text hash), waits for the memory's ingestion jobs still running
(a previous load whose client went away), and sends the rest as ingestion jobs
(`?wait=false`), showing progress from the jobs' status with tqdm. Run again after an
interruption, it sends only what is not stored yet.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import requests

from sglang_msa.corpus import CorpusDocument, batches, pending, read_corpus

POLL_S = 0.5
FINAL = ("done", "failed", "cancelled")


class MemoryClient:
    def __init__(self, url: str, memory: str, api_key: str | None = None):
        self.base = url.rstrip("/")
        self.memory = memory
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs) -> dict:
        response = self.session.request(method, f"{self.base}{path}", timeout=600, **kwargs)
        if response.status_code not in expect:
            try:
                error = response.json()["error"]
                detail = f"{error['message']} ({error.get('param') or 'no field'})"
            except (ValueError, KeyError, TypeError):
                detail = response.text[:500]
            raise SystemExit(f"sglang-msa: {method} {path} answered {response.status_code}: {detail}")
        return response.json()

    @property
    def memory_path(self) -> str:
        return f"/v1/memories/{self.memory}"

    def stored_hashes(self) -> dict[str, str]:
        """doc_id → SHA-256 of the text of every document the memory holds."""
        stored, offset, page = {}, 0, 10_000
        while True:
            listed = self.call("GET", f"{self.memory_path}/documents",
                               params={"limit": page, "offset": offset, "hashes": "true"})["documents"]
            stored.update({doc["doc_id"]: doc["text_sha256"] for doc in listed})
            if len(listed) < page:
                return stored
            offset += page

    def job(self, job_id: str) -> dict:
        return self.call("GET", f"{self.memory_path}/jobs/{job_id}")


def token_counter(client: MemoryClient):
    """The server model's tokenizer when this machine can load it, else an overestimate (bytes / 2)."""
    try:
        info = client.call("GET", "/get_model_info")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(info.get("tokenizer_path") or info["model_path"])
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    except (SystemExit, OSError, KeyError, ValueError):
        print("sglang-msa: the server's tokenizer is not available here; estimating tokens as bytes / 2",
              file=sys.stderr)
        return lambda text: len(text.encode()) // 2 + 1


def follow(client: MemoryClient, job_id: str, bar, documents_total: int, documents_before: int) -> dict:
    """Poll a job until it ends, moving the bar by its tokens done; its last status."""
    counted = 0
    while True:
        status = client.job(job_id)
        done = status["tokens"]["done"]
        bar.update(max(0, done - counted))
        counted = max(counted, done)
        counts = status["documents"]
        bar.set_postfix_str(f"docs {documents_before + counts['stored'] + counts['existing'] + counts['failed']}"
                            f"/{documents_total}", refresh=False)
        if status["state"] in FINAL:
            return status
        time.sleep(POLL_S)


def ingest(url: str, memory: str, paths: list[Path], api_key: str | None = None, replace: bool = False,
           placement: str = "auto", part_tokens: int | None = None) -> int:
    """Load `paths` into `memory` (created if missing); prints a summary; exit status 1 when a
    document failed. Documents are split into parts of at most `part_tokens` (default and cap:
    the server's max_document_tokens)."""
    from tqdm import tqdm

    started = time.monotonic()
    client = MemoryClient(url, memory, api_key)
    limits = client.call("GET", "/v1/memories/-/limits")
    created = client.call("POST", "/v1/memories", expect=(201, 409), json={"memory_id": memory, "placement": placement})
    if created.get("created"):
        print(f"created memory {memory!r}")
    count_tokens = token_counter(client)
    max_tokens = min(part_tokens or limits["max_document_tokens"], limits["max_document_tokens"])
    documents, skipped = read_corpus(paths, max_tokens, count_tokens)
    running = [job for job in client.call("GET", f"{client.memory_path}/jobs")["jobs"] if job["state"] not in FINAL]
    for job in running:  # an earlier load still running on the server: let it finish first
        with tqdm(total=job["tokens"]["total"] or 0, unit="tok", unit_scale=True, desc=f"job {job['job_id']}") as bar:
            follow(client, job["job_id"], bar, job["documents"]["total"], 0)
    todo = pending(documents, client.stored_hashes())
    split = sum(1 for document in documents if ":part-" in document.doc_id)
    print(f"{len(documents)} documents ({sum(d.tokens for d in documents):,} tokens, {split} parts of split files), "
          f"{len(documents) - len(todo)} already stored, {len(todo)} to send; {len(skipped)} skipped")
    for item in skipped:
        print(f"  skipped {item.source}: {item.reason}")
    failures, stored, existing = [], 0, 0
    sent_tokens = sum(d.tokens for d in todo)
    with tqdm(total=sent_tokens, unit="tok", unit_scale=True, desc=f"ingest {memory}") as bar:
        before = 0
        for batch in batches(todo, limits["max_documents_per_request"], limits["max_request_body_bytes"] // 2):
            status = submit(client, batch, replace, bar, len(todo), before)
            before += len(batch)
            stored += status["documents"]["stored"]
            existing += status["documents"]["existing"]
            failures += [(batch[f["index"]], f) for f in status["failures"]]
            if status["state"] != "done":
                failures.append((None, {"error": f"job {status['job_id']} ended {status['state']}"}))
                break
        bar.update(max(0, bar.total - bar.n))
    elapsed = time.monotonic() - started
    print(f"stored {stored} documents, {existing} were already there, {len(failures)} failed, {len(skipped)} skipped "
          f"in {elapsed:.1f} s ({sent_tokens / elapsed:,.0f} tokens/s)")
    for document, failure in failures:
        print(f"  failed {document.source if document else ''}: {failure.get('status') or ''} {failure['error']}")
    return 1 if failures else 0


def submit(client: MemoryClient, batch: list[CorpusDocument], replace: bool, bar, total: int, before: int) -> dict:
    job = client.call("POST", f"{client.memory_path}/documents", expect=(202,), params={"wait": "false"},
                      json={"documents": [{"text": d.text, "doc_id": d.doc_id} for d in batch], "replace": replace})
    return follow(client, job["job_id"], bar, total, before)


def ask(url: str, memory: str, question: str, api_key: str | None = None, max_tokens: int = 128,
        inject_documents: int = 0) -> int:
    """Print the answer to `question` over `memory` and the documents it used."""
    client = MemoryClient(url, memory, api_key)
    reply = client.call("POST", f"{client.memory_path}/chat/completions", json={
        "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens,
        "msa": {"inject_documents": inject_documents}})
    print(reply["choices"][0]["message"]["content"].strip())
    msa = reply["msa"]
    if msa.get("injected"):
        print("\ninjected: " + ", ".join(doc["doc_id"] for doc in msa["injected"]))
    print("\ndocuments used (routing, most layers first):")
    for doc in msa["retrieved"]:
        print(f"  {doc['doc_id']}")
    return 0
