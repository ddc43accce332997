"""Ingestion jobs in the metadata database (`metadata.MetadataStore` mixes these tables in).

A job belongs to one memory *incarnation* (`memory_key`), never to a name: when its memory is
deleted the job's rows go with it (ON DELETE CASCADE), so a job can neither write into nor be
seen through a memory created again under the same name. Each submitted document is a row
`pending` until its outcome (`stored`, `existing`, `failed`) is recorded; its text is kept only
while it is pending (a stored document's text lives in `memory_documents`). With a memory
directory the rows are in the same durable SQLite file, so a restarted server resumes the
pending documents of unfinished jobs; without one they live in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

JOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS ingestion_jobs (
    job_id TEXT PRIMARY KEY,
    memory_key TEXT NOT NULL REFERENCES memory_incarnations(memory_key) ON DELETE CASCADE,
    replace_existing INTEGER NOT NULL,
    state TEXT NOT NULL,
    tokens_total INTEGER,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS ingestion_job_documents (
    job_id TEXT NOT NULL REFERENCES ingestion_jobs(job_id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    text TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    num_tokens INTEGER NOT NULL DEFAULT 0,
    status INTEGER,
    error TEXT,
    PRIMARY KEY (job_id, position)
);
"""

UNFINISHED = ("queued", "running")


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    memory_key: str
    replace_existing: bool
    state: str
    tokens_total: int | None
    created_at: float
    finished_at: float | None


@dataclass(frozen=True)
class JobDocument:
    position: int
    doc_id: str
    text: str


@dataclass(frozen=True)
class JobOutcome:
    """What became of one document: `stored`, `existing` (same doc_id and text already stored)
    or `failed` (with the HTTP status and message it would have had)."""

    position: int
    state: str
    num_tokens: int = 0
    status: int | None = None
    error: str | None = None


class JobTables:
    """Job rows; mixed into MetadataStore (same connection, lock and transactions)."""

    def add_job(self, job_id: str, memory_key: str, replace_existing: bool, docs: list[tuple[str, str]]) -> bool:
        """Record a queued job and its documents (doc_id, text) in one transaction; False if the
        incarnation is gone."""
        def insert(db):
            if db.execute("SELECT 1 FROM memory_incarnations WHERE memory_key = ?", (memory_key,)).fetchone() is None:
                return False
            db.execute("INSERT INTO ingestion_jobs (job_id, memory_key, replace_existing, state, created_at) "
                       "VALUES (?, ?, ?, 'queued', ?)", (job_id, memory_key, int(replace_existing), time.time()))
            db.executemany("INSERT INTO ingestion_job_documents (job_id, position, doc_id, text) VALUES (?, ?, ?, ?)",
                           [(job_id, position, doc_id, text) for position, (doc_id, text) in enumerate(docs)])
            return True

        return self._transaction(insert)

    def find_job(self, memory_key: str, job_id: str) -> JobRecord | None:
        """The job, only if it belongs to this incarnation."""
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, memory_key, replace_existing, state, tokens_total, created_at, finished_at "
                "FROM ingestion_jobs WHERE job_id = ? AND memory_key = ?", (job_id, memory_key)).fetchone()
        return JobRecord(row[0], row[1], bool(row[2]), *row[3:]) if row else None

    def list_jobs(self, memory_key: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT job_id FROM ingestion_jobs WHERE memory_key = ? ORDER BY created_at",
                                    (memory_key,)).fetchall()
        return [row[0] for row in rows]

    def unfinished_jobs(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, memory_key, replace_existing, state, tokens_total, created_at, finished_at "
                f"FROM ingestion_jobs WHERE state IN {UNFINISHED} ORDER BY created_at").fetchall()
        return [JobRecord(row[0], row[1], bool(row[2]), *row[3:]) for row in rows]

    def set_job_state(self, job_id: str, state: str) -> bool:
        """Move an unfinished job to `state` (`finished_at` set for a final one); False if it is
        gone or already final."""
        finished = None if state in UNFINISHED else time.time()
        with self._lock:
            return self._db.execute(f"UPDATE ingestion_jobs SET state = ?, finished_at = ? WHERE job_id = ? "
                                    f"AND state IN {UNFINISHED}", (state, finished, job_id)).rowcount > 0

    def set_job_tokens_total(self, job_id: str, tokens: int) -> None:
        with self._lock:
            self._db.execute("UPDATE ingestion_jobs SET tokens_total = ? WHERE job_id = ?", (tokens, job_id))

    def job_texts(self, job_id: str) -> list[str]:
        """The texts of the job's pending documents."""
        with self._lock:
            rows = self._db.execute("SELECT text FROM ingestion_job_documents WHERE job_id = ? AND state = 'pending'",
                                    (job_id,)).fetchall()
        return [row[0] for row in rows]

    def pending_job_documents(self, job_id: str, limit: int) -> list[JobDocument]:
        with self._lock:
            rows = self._db.execute(
                "SELECT position, doc_id, text FROM ingestion_job_documents WHERE job_id = ? AND state = 'pending' "
                "ORDER BY position LIMIT ?", (job_id, limit)).fetchall()
        return [JobDocument(*row) for row in rows]

    def record_job_outcomes(self, job_id: str, outcomes: list[JobOutcome]) -> None:
        """The documents' outcomes, in one transaction; their texts are dropped."""
        self._transaction(lambda db: db.executemany(
            "UPDATE ingestion_job_documents SET state = ?, num_tokens = ?, status = ?, error = ?, text = '' "
            "WHERE job_id = ? AND position = ?",
            [(o.state, o.num_tokens, o.status, o.error, job_id, o.position) for o in outcomes]))

    def job_progress(self, job_id: str) -> dict[str, tuple[int, int]]:
        """Per document state: (documents, tokens)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*), SUM(num_tokens) FROM ingestion_job_documents "
                                    "WHERE job_id = ? GROUP BY state", (job_id,)).fetchall()
        return {state: (count, tokens or 0) for state, count, tokens in rows}

    def job_failures(self, job_id: str, limit: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT position, doc_id, status, error FROM ingestion_job_documents WHERE job_id = ? "
                "AND state = 'failed' ORDER BY position LIMIT ?", (job_id, limit)).fetchall()
        return [{"index": position, "doc_id": doc_id, "status": status, "error": error}
                for position, doc_id, status, error in rows]
