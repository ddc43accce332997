"""Ingestion jobs, the corpus CLI and the plugin's metrics through one real server (tenants with
API keys, an admin key, a memory directory, `--enable-metrics`): 202 at once, progress, failures
per document, idempotent re-submission, cancellation, jobs bound to their memory's incarnation
and invisible to other tenants, a job resumed by the server itself after a hard kill, the
`ingest` / `ask` commands, and the `sglang_msa_*` series on `/metrics` from both processes."""

from __future__ import annotations

import json
import time

import pytest
import requests

from sglang_msa.cli import main as cli
from tenant_server import ADMIN, TenantServer

pytestmark = pytest.mark.server

KEYS = {"key-of-tenant-alpha-0001": "alpha", "key-of-tenant-bravo-0002": "bravo"}
ALPHA, BRAVO = ({"Authorization": f"Bearer {key}"} for key in KEYS)
MAX_DOCUMENT_TOKENS = 256
OPTIONS = {"top_k_docs": 2, "chunk_size": 4, "routed_layers": "all", "max_document_tokens": MAX_DOCUMENT_TOKENS}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    running = TenantServer(tiny_llama, tmp_path_factory.mktemp("ingestion"), KEYS, OPTIONS, ("--enable-metrics",))
    yield running
    running.process.stop()


def call(method, url, headers=None, expect=None, **kwargs):
    response = requests.request(method, url, headers=headers, timeout=120, **kwargs)
    if expect is not None:
        assert response.status_code == expect, response.text
    return response


def documents(prefix: str, count: int, words: int = 30) -> list[dict]:
    return [{"doc_id": f"{prefix}-{i}", "text": f"{prefix} note {i}: " + "the quick brown fox " * (words // 4)}
            for i in range(count)]


def submit(url, memory_id, headers, docs, **extra) -> dict:
    started = time.monotonic()
    job = call("POST", f"{url}/v1/memories/{memory_id}/documents", headers, 202, params={"wait": "false"},
               json={"documents": docs, **extra}).json()
    assert time.monotonic() - started < 5  # answered at once, not after encoding
    assert job["state"] in ("queued", "running") and job["documents"]["total"] == len(docs)
    return job


def job_status(url, memory_id, headers, job_id) -> dict:
    return call("GET", f"{url}/v1/memories/{memory_id}/jobs/{job_id}", headers, 200).json()


def wait_for(url, memory_id, headers, job_id, until=lambda s: s["state"] in ("done", "failed", "cancelled"),
             timeout_s=300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job_status(url, memory_id, headers, job_id)
        if until(status):
            return status
        assert status["state"] in ("queued", "running"), status  # ended without getting there
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {status}")


def listed(url, memory_id, headers) -> dict[str, dict]:
    rows = call("GET", f"{url}/v1/memories/{memory_id}/documents", headers, 200,
                params={"limit": 10_000, "hashes": "true"}).json()["documents"]
    return {row["doc_id"]: row for row in rows}


def test_job_progress_failures_and_idempotent_resubmission(server):
    url = server.url
    call("POST", f"{url}/v1/memories", ALPHA, 201, json={"memory_id": "notes"})
    docs = documents("note", 120)
    docs[7]["text"] = "word " * (MAX_DOCUMENT_TOKENS * 2)  # too long once tokenized: fails alone
    job = submit(url, "notes", ALPHA, docs)
    final = wait_for(url, "notes", ALPHA, job["job_id"])
    assert final["state"] == "done", final
    assert final["documents"] == {"total": 120, "stored": 119, "existing": 0, "failed": 1, "pending": 0}
    assert [(f["index"], f["doc_id"], f["status"]) for f in final["failures"]] == [(7, "note-7", 413)]
    stored = listed(url, "notes", ALPHA)
    assert len(stored) == 119 and "note-7" not in stored
    assert final["tokens"]["done"] == sum(row["num_tokens"] for row in stored.values())
    assert final["tokens"]["total"] > 0 and final["tokens_per_s"] > 0 and final["eta_s"] is None
    assert call("GET", f"{url}/v1/memories/notes", ALPHA, 200).json()["documents"] == 119

    # the same documents again: nothing encoded twice, synchronous or as a job
    again = call("POST", f"{url}/v1/memories/notes/documents", ALPHA, 201, json={"documents": docs[:7]}).json()
    assert [(d["doc_id"], d["existing"]) for d in again["documents"]] == [(f"note-{i}", True) for i in range(7)]
    rerun = wait_for(url, "notes", ALPHA, submit(url, "notes", ALPHA, docs[8:40])["job_id"])
    assert rerun["documents"]["existing"] == 32 and rerun["documents"]["stored"] == 0
    assert len(listed(url, "notes", ALPHA)) == 119

    # another text under a stored doc_id: 409 naming the field, or replaced when asked
    changed = [{"doc_id": "note-3", "text": "note 3 was rewritten"}]
    refused = call("POST", f"{url}/v1/memories/notes/documents", ALPHA, 409, params={"wait": "false"},
                   json={"documents": changed}).json()
    assert refused["error"]["param"] == "documents[0].doc_id"
    replaced = call("POST", f"{url}/v1/memories/notes/documents", ALPHA, 201,
                    json={"documents": changed, "replace": True}).json()["documents"][0]
    assert replaced["replaced"] and replaced["gid"] != stored["note-3"]["gid"]
    assert call("GET", f"{url}/v1/memories/notes/documents/note-3", ALPHA, 200).json()["text"] == changed[0]["text"]
    assert call("GET", f"{url}/v1/memories/notes", ALPHA, 200).json()["documents"] == 119


@pytest.mark.parametrize("params,body,status,field", [
    ({"wait": "false"}, {"documents": []}, 422, "documents"),
    ({"wait": "false"}, {"documents": [{"text": "a", "doc_id": "bad id"}]}, 422, "documents[0].doc_id"),
    ({"wait": "maybe"}, {"documents": [{"text": "a"}]}, 422, "wait"),
    ({"wait": "false"}, {"documents": [{"text": "x" * 10**6}]}, 413, "documents[0].text"),
    ({"wait": "false"}, {"documents": [{"text": "a", "doc_id": "d"}, {"text": "b", "doc_id": "d"}]}, 409, "documents"),
])
def test_bad_submissions_name_the_field(server, params, body, status, field):
    call("POST", f"{server.url}/v1/memories", ALPHA, None, json={"memory_id": "checks"})
    response = call("POST", f"{server.url}/v1/memories/checks/documents", ALPHA, status, params=params, json=body)
    assert response.json()["error"]["param"] == field
    assert call("GET", f"{server.url}/v1/memories/checks/jobs", ALPHA, 200).json()["jobs"] == []


def test_jobs_are_invisible_to_other_tenants_and_bound_to_their_incarnation(server):
    url = server.url
    call("POST", f"{url}/v1/memories", ALPHA, 201, json={"memory_id": "shared-name"})
    call("POST", f"{url}/v1/memories", BRAVO, 201, json={"memory_id": "shared-name"})
    job = submit(url, "shared-name", ALPHA, documents("alpha", 300, words=60))
    job_url = f"/v1/memories/shared-name/jobs/{job['job_id']}"
    for method in ("GET", "DELETE"):  # bravo's memory of the same name does not have it: 404, like a missing job
        assert call(method, url + job_url, BRAVO, 404).json()["error"]["param"] == "job_id"
        assert call(method, f"{url}/v1/memories/shared-name/jobs/{'0' * 20}", ALPHA, 404).json()["error"][
            "param"] == "job_id"
    call("GET", f"{url}/v1/memories/nobody/jobs/{job['job_id']}", ALPHA, 404)
    assert call("GET", f"{url}/v1/memories/shared-name/jobs", BRAVO, 200).json()["jobs"] == []
    assert job_status(url, "shared-name", ALPHA, job["job_id"])["state"] in ("queued", "running", "done")

    # delete alpha's memory while the job runs, create it again: the job never writes into the new one
    wait_for(url, "shared-name", ALPHA, job["job_id"], until=lambda s: s["documents"]["stored"] > 0)
    call("DELETE", f"{url}/v1/memories/shared-name", ALPHA, 200)
    call("POST", f"{url}/v1/memories", ALPHA, 201, json={"memory_id": "shared-name"})
    call("GET", url + job_url, ALPHA, 404)
    time.sleep(3)
    assert call("GET", f"{url}/v1/memories/shared-name", ALPHA, 200).json()["documents"] == 0
    assert listed(url, "shared-name", ALPHA) == {} and listed(url, "shared-name", BRAVO) == {}


def test_cancel_stops_between_batches(server):
    url = server.url
    call("POST", f"{url}/v1/memories", ALPHA, 201, json={"memory_id": "cancelled"})
    job = submit(url, "cancelled", ALPHA, documents("c", 600, words=60))
    wait_for(url, "cancelled", ALPHA, job["job_id"], until=lambda s: s["documents"]["stored"] > 0)
    assert call("DELETE", f"{url}/v1/memories/cancelled/jobs/{job['job_id']}", ALPHA, 200).json()["state"] == "cancelled"
    time.sleep(3)  # the batch under way ends, and nothing after it
    final = job_status(url, "cancelled", ALPHA, job["job_id"])
    assert final["state"] == "cancelled" and final["documents"]["pending"] > 0
    stored = listed(url, "cancelled", ALPHA)
    assert len(stored) == final["documents"]["stored"]  # every document fully stored and listed, or absent
    assert call("GET", f"{url}/v1/memories/cancelled", ALPHA, 200).json()["documents"] == len(stored)


def test_server_resumes_an_unfinished_job_after_a_hard_kill(server):
    url = server.url
    call("POST", f"{url}/v1/memories", ALPHA, 201, json={"memory_id": "resumed"})
    docs = documents("r", 300, words=60)
    job = submit(url, "resumed", ALPHA, docs)
    before = wait_for(url, "resumed", ALPHA, job["job_id"], until=lambda s: s["documents"]["stored"] >= 40)
    server.restart()
    assert before["state"] == "running" and before["documents"]["pending"] > 0
    url = server.url
    final = wait_for(url, "resumed", ALPHA, job["job_id"])  # nobody resubmits: the server picks it up
    assert final["state"] == "done" and final["documents"]["failed"] == 0
    assert final["documents"]["stored"] + final["documents"]["existing"] == 300
    stored = listed(url, "resumed", ALPHA)
    assert sorted(stored) == sorted(d["doc_id"] for d in docs)  # each exactly once
    assert call("GET", f"{url}/v1/memories/resumed", ALPHA, 200).json()["documents"] == 300


def test_ingest_and_ask_commands(server, tmp_path, capsys):
    url = server.url
    corpus = tmp_path / "notes"
    (corpus / "team").mkdir(parents=True)
    (corpus / "team" / "standup.md").write_text("The standup is at 9:30 in room Blue.")
    (corpus / "long.txt").write_text("\n\n".join(f"Paragraph {n}: " + "memory sparse attention " * 40
                                                 for n in range(8)))
    (corpus / "broken.txt").write_bytes(b"caf\xe9")
    (corpus / "facts.jsonl").write_text(json.dumps({"text": "Parking is on level -2.", "doc_id": "parking"}) + "\n")
    base = ["ingest", "--url", url, "--memory", "cli-notes", "--api-key", next(iter(KEYS)), str(corpus)]
    with pytest.raises(SystemExit) as exit_code:
        cli(base)
    out = capsys.readouterr().out
    assert exit_code.value.code == 0, out
    stored = listed(url, "cli-notes", ALPHA)
    parts = sorted(doc_id for doc_id in stored if doc_id.startswith("long.txt:part-"))
    assert len(parts) >= 2 and {"team:standup.md", "parking"} <= set(stored) and len(stored) == len(parts) + 2
    assert all(row["num_tokens"] <= MAX_DOCUMENT_TOKENS for row in stored.values())
    assert "skipped broken.txt: not UTF-8" in out and f"stored {len(stored)} documents" in out

    with pytest.raises(SystemExit) as exit_code:  # again: resumes, nothing left to send
        cli(base)
    out = capsys.readouterr().out
    assert exit_code.value.code == 0 and f"{len(stored)} already stored, 0 to send" in out
    assert listed(url, "cli-notes", ALPHA) == stored

    with pytest.raises(SystemExit) as exit_code:
        cli(["ask", "--url", url, "--memory", "cli-notes", "--api-key", next(iter(KEYS)), "--max-tokens", "4",
             "When is the standup?"])
    out = capsys.readouterr().out
    assert exit_code.value.code == 0 and "documents used" in out
    assert any(f"  {doc_id}" in out for doc_id in stored)


def test_metrics_from_both_processes_without_tenant_labels(server):
    url = server.url
    call("POST", f"{url}/v1/memories", ALPHA, None, json={"memory_id": "metered"})
    call("POST", f"{url}/v1/memories/metered/documents", ALPHA, 201, json={"documents": documents("m", 5)})
    call("POST", f"{url}/v1/memories/metered/chat/completions", ALPHA, 200, json={
        "messages": [{"role": "user", "content": "the quick fox?"}], "max_tokens": 2, "temperature": 0,
        "msa": {"inject_documents": 1}})
    call("POST", f"{url}/v1/memories/missing/documents", ALPHA, 404, json={"documents": [{"text": "x"}]})
    text = call("GET", f"{url}/metrics", None, 200).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("sglang_msa_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    held = call("GET", f"{url}/v1/memories/-/stats", ADMIN, 200).json()
    # the scheduler process: store sizes, routing time per layer
    assert samples['sglang_msa_memory_documents{tier="device"}'] == held["documents"]
    assert samples['sglang_msa_memory_tokens{tier="device"}'] == held["tokens"]
    assert samples['sglang_msa_memory_bytes{tier="device"}'] == held["device_bytes"]
    assert samples['sglang_msa_routing_seconds_count{layer="0"}'] >= 2  # the injection round and the answer
    # the HTTP process: ingestion, selections, injection rounds, refusals
    assert samples["sglang_msa_ingested_documents_total"] >= 5
    assert samples["sglang_msa_ingested_tokens_total"] > 0 and samples["sglang_msa_ingestion_tokens_per_second"] > 0
    assert samples["sglang_msa_selected_documents_count"] >= 1 and samples["sglang_msa_selected_documents_sum"] >= 1
    assert samples['sglang_msa_injection_rounds_bucket{le="1.0"}'] >= 1
    assert samples['sglang_msa_refusals_total{field="memory_id",status="404"}'] >= 1
    # no tenant or memory names on the open /metrics (SGLang's own HTTP series label by route template)
    assert [line for line in text.splitlines() if "alpha" in line or "metered" in line] == []
    assert 'endpoint="/v1/memories/{memory_id}/documents"' in text
    # per-tenant numbers: the admin's statistics only
    assert held["tenants"]["alpha"]["documents"] >= 5
    assert "tenants" not in call("GET", f"{url}/v1/memories/-/stats", ALPHA, 200).json()
