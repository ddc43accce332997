"""Ingestion jobs' rows in the metadata database, without a server: bound to one incarnation and
gone with it, outcomes recorded with the texts dropped, final states final, and a document's
replacement swapped in one transaction."""

from __future__ import annotations

import hashlib

from sglang_msa.server.job_records import JobOutcome
from sglang_msa.server.metadata import DocumentRecord, MetadataStore


def test_a_job_belongs_to_one_incarnation_and_goes_with_it(tmp_path):
    metadata = MetadataStore(tmp_path / "metadata.sqlite3")
    first = metadata.create_memory("alpha", "notes")
    assert not metadata.add_job("job1", "no-such-key", False, [("a", "text")])
    assert metadata.add_job("job1", first.memory_key, False, [("a", "alpha text"), ("b", "bravo text")])
    assert metadata.find_job(first.memory_key, "job1").state == "queued"
    metadata.delete_memory(first.memory_key)
    again = metadata.create_memory("alpha", "notes")  # the same name, another incarnation
    assert metadata.find_job(again.memory_key, "job1") is None and metadata.find_job(first.memory_key, "job1") is None
    assert metadata.unfinished_jobs() == [] and metadata.job_progress("job1") == {}


def test_outcomes_progress_and_final_states(tmp_path):
    path = tmp_path / "metadata.sqlite3"
    metadata = MetadataStore(path)
    memory = metadata.create_memory("", "notes")
    metadata.add_job("job1", memory.memory_key, False, [(f"d{i}", f"text {i}") for i in range(4)])
    assert metadata.set_job_state("job1", "running")
    metadata.record_job_outcomes("job1", [JobOutcome(0, "stored", 5), JobOutcome(1, "existing", 6),
                                          JobOutcome(2, "failed", status=413, error="too long")])
    assert metadata.job_progress("job1") == {"stored": (1, 5), "existing": (1, 6), "failed": (1, 0), "pending": (1, 0)}
    assert metadata.job_failures("job1", 10) == [{"index": 2, "doc_id": "d2", "status": 413, "error": "too long"}]
    assert [d.doc_id for d in metadata.pending_job_documents("job1", 10)] == ["d3"]
    assert metadata.job_texts("job1") == ["text 3"]  # the others' texts are dropped
    reopened = MetadataStore(path)  # durable: a restarted server finds the job unfinished
    assert [job.job_id for job in reopened.unfinished_jobs()] == ["job1"]
    assert reopened.set_job_state("job1", "cancelled") and not reopened.set_job_state("job1", "running")
    assert reopened.find_job(memory.memory_key, "job1").finished_at is not None


def test_replace_document_swaps_rows_in_one_transaction():
    metadata = MetadataStore()
    key = metadata.create_memory("", "notes").memory_key
    assert metadata.add_document(DocumentRecord(key, 0, "doc", "old text", 3))
    assert metadata.replace_document(0, DocumentRecord(key, 1, "doc", "new text", 4))
    assert metadata.get_document(key, "doc") == DocumentRecord(key, 1, "doc", "new text", 4)
    assert not metadata.replace_document(0, DocumentRecord(key, 2, "doc", "newer", 1))  # the old row is gone
    assert metadata.documents_by_gid(key, [0, 1, 2]).keys() == {1}
    listed = metadata.list_documents(key, 10, 0, hashes=True)
    assert listed[0]["text_sha256"] == hashlib.sha256(b"new text").hexdigest()
