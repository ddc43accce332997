"""Memory metadata kept by the HTTP server process in SQLite: memories, document ids, texts.

A memory is named by its tenant (its owner: "" without API keys) and its `memory_id`, unique
within that tenant's namespace, so two tenants may both own `notes`. Each creation is an
*incarnation* with a key of its own (`memory_key`, never reused): the scheduler, the memory
directory and every document row know a memory by that key alone, so a write aimed at a memory
that was deleted (and perhaps created again under the same name) can only miss.

Document tensors live in the scheduler (`sglang_msa.memory_manager.store`); this is the record
of what was acknowledged: a document row is written only after the scheduler staged its
tensors, and only while its incarnation exists. Document ids (`gid`) are assigned here in
insertion order and never reused within an incarnation.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sglang_msa.server.job_records import JOB_SCHEMA, JobTables

SCHEMA = """
CREATE TABLE IF NOT EXISTS memory_incarnations (
    memory_key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    memory_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_gid INTEGER NOT NULL DEFAULT 0,
    UNIQUE (owner, memory_id)
);
CREATE TABLE IF NOT EXISTS memory_documents (
    memory_key TEXT NOT NULL REFERENCES memory_incarnations(memory_key) ON DELETE CASCADE,
    gid INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    text TEXT NOT NULL,
    num_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (memory_key, gid),
    UNIQUE (memory_key, doc_id)
);
"""

# the first schema (one global namespace of memory ids, which were also the scheduler's keys)
LEGACY_MIGRATION = """
INSERT INTO memory_incarnations (memory_key, owner, memory_id, created_at, next_gid)
    SELECT memory_id, COALESCE(owner, ''), memory_id, created_at, next_gid FROM memories;
INSERT INTO memory_documents (memory_key, gid, doc_id, text, num_tokens, created_at)
    SELECT memory_id, gid, doc_id, text, num_tokens, created_at FROM documents;
DROP TABLE documents;
DROP TABLE memories;
"""

NO_TENANT = ""  # the owner of memories created without API keys


@dataclass(frozen=True)
class MemoryRecord:
    memory_key: str
    owner: str
    memory_id: str


@dataclass(frozen=True)
class DocumentRecord:
    memory_key: str
    gid: int
    doc_id: str
    text: str
    num_tokens: int


def text_sha256(text: str) -> str:
    """The hash clients compare to know whether a stored document holds their text."""
    return hashlib.sha256(text.encode()).hexdigest()


def new_memory_key() -> str:
    """An incarnation's key: unguessable, and a valid directory name."""
    return uuid.uuid4().hex


class MetadataStore(JobTables):
    """In memory by default; with a file path, every change is a committed, fsynced transaction
    (WAL journal, synchronous=FULL) that survives a crash of the server. Ingestion jobs' tables
    come from `job_records.JobTables`."""

    def __init__(self, path: str | Path = ":memory:"):
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        if str(path) != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(SCHEMA + JOB_SCHEMA)
        self._migrate_legacy()
        self._db.execute("PRAGMA foreign_keys = ON")
        self._lock = threading.Lock()

    def _migrate_legacy(self) -> None:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "memories" in tables:
            self._db.executescript(f"BEGIN IMMEDIATE; {LEGACY_MIGRATION} COMMIT;")

    def _transaction(self, statements):
        """Run `statements(db)` in one immediate transaction under the lock; its result."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = statements(self._db)
                self._db.execute("COMMIT")
                return result
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ memories
    def create_memory(self, owner: str, memory_id: str) -> MemoryRecord | None:
        """A new incarnation of `memory_id` in `owner`'s namespace; None if the name is taken there."""
        record = MemoryRecord(new_memory_key(), owner, memory_id)
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO memory_incarnations (memory_key, owner, memory_id, created_at) VALUES (?, ?, ?, ?)",
                    (record.memory_key, owner, memory_id, time.time()))
            except sqlite3.IntegrityError:
                return None
        return record

    def find_memory(self, owner: str, memory_id: str) -> MemoryRecord | None:
        with self._lock:
            row = self._db.execute("SELECT memory_key FROM memory_incarnations WHERE owner = ? AND memory_id = ?",
                                   (owner, memory_id)).fetchone()
        return MemoryRecord(row[0], owner, memory_id) if row else None

    def delete_memory(self, memory_key: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM memory_incarnations WHERE memory_key = ?",
                                    (memory_key,)).rowcount > 0

    def list_memories(self, owner: str) -> list[dict]:
        """The memories of `owner`'s namespace."""
        with self._lock:
            rows = self._db.execute(
                "SELECT m.memory_id, COUNT(d.gid), COALESCE(SUM(d.num_tokens), 0) FROM memory_incarnations m "
                "LEFT JOIN memory_documents d ON d.memory_key = m.memory_key WHERE m.owner = ? "
                "GROUP BY m.memory_key ORDER BY m.memory_id", (owner,),
            ).fetchall()
        return [{"memory_id": m, "documents": n, "tokens": t} for m, n, t in rows]

    def memories(self) -> dict[str, MemoryRecord]:
        """Every incarnation, by key."""
        with self._lock:
            rows = self._db.execute("SELECT memory_key, owner, memory_id FROM memory_incarnations").fetchall()
        return {key: MemoryRecord(key, owner, memory_id) for key, owner, memory_id in rows}

    # ------------------------------------------------------------------ documents
    def next_gid(self, memory_key: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT next_gid FROM memory_incarnations WHERE memory_key = ?",
                                   (memory_key,)).fetchone()
        if row is None:
            raise KeyError(memory_key)
        return row[0]

    def reserve_gids(self, memory_key: str, count: int) -> list[int]:
        """Assign the next `count` document ids of the incarnation (insertion order, never reused)."""
        def reserve(db):
            row = db.execute("SELECT next_gid FROM memory_incarnations WHERE memory_key = ?", (memory_key,)).fetchone()
            if row is None:
                raise KeyError(memory_key)
            db.execute("UPDATE memory_incarnations SET next_gid = ? WHERE memory_key = ?", (row[0] + count, memory_key))
            return row[0]

        first = self._transaction(reserve)
        return list(range(first, first + count))

    def documents_by_doc_id(self, memory_key: str, doc_ids: list[str]) -> dict[str, DocumentRecord]:
        if not doc_ids:
            return {}
        with self._lock:
            placeholders = ",".join("?" * len(doc_ids))
            rows = self._db.execute(
                f"SELECT gid, doc_id, text, num_tokens FROM memory_documents WHERE memory_key = ? "
                f"AND doc_id IN ({placeholders})", (memory_key, *doc_ids),
            ).fetchall()
        return {row[1]: DocumentRecord(memory_key, *row) for row in rows}

    def add_document(self, record: DocumentRecord) -> bool:
        """Record an acknowledged document; False if its incarnation is gone or its doc_id is taken."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO memory_documents (memory_key, gid, doc_id, text, num_tokens, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (record.memory_key, record.gid, record.doc_id, record.text, record.num_tokens, time.time()),
                )
                return True
            except sqlite3.IntegrityError:
                return False

    def replace_document(self, old_gid: int, record: DocumentRecord) -> bool:
        """Swap the row of document `old_gid` for `record` (same doc_id) in one transaction;
        False (nothing changed) if the old row or the incarnation is gone."""
        def swap(db):
            if db.execute("DELETE FROM memory_documents WHERE memory_key = ? AND gid = ? AND doc_id = ?",
                          (record.memory_key, old_gid, record.doc_id)).rowcount == 0:
                return False
            db.execute("INSERT INTO memory_documents (memory_key, gid, doc_id, text, num_tokens, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (record.memory_key, record.gid, record.doc_id, record.text, record.num_tokens, time.time()))
            return True

        try:
            return self._transaction(swap)
        except sqlite3.IntegrityError:
            return False

    def get_document(self, memory_key: str, doc_id: str) -> DocumentRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT gid, doc_id, text, num_tokens FROM memory_documents WHERE memory_key = ? AND doc_id = ?",
                (memory_key, doc_id),
            ).fetchone()
        return DocumentRecord(memory_key, *row) if row else None

    def documents_by_gid(self, memory_key: str, gids: list[int]) -> dict[int, DocumentRecord]:
        if not gids:
            return {}
        with self._lock:
            placeholders = ",".join("?" * len(gids))
            rows = self._db.execute(
                f"SELECT gid, doc_id, text, num_tokens FROM memory_documents WHERE memory_key = ? "
                f"AND gid IN ({placeholders})", (memory_key, *gids),
            ).fetchall()
        return {row[0]: DocumentRecord(memory_key, *row) for row in rows}

    def list_documents(self, memory_key: str, limit: int, offset: int, hashes: bool = False) -> list[dict]:
        """Documents in insertion order; with `hashes`, each text's SHA-256 (`text_sha256`)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT doc_id, gid, num_tokens{', text' if hashes else ''} FROM memory_documents "
                "WHERE memory_key = ? ORDER BY gid LIMIT ? OFFSET ?", (memory_key, limit, offset),
            ).fetchall()
        listed = [{"doc_id": row[0], "gid": row[1], "num_tokens": row[2]} for row in rows]
        if hashes:
            for item, row in zip(listed, rows):
                item["text_sha256"] = text_sha256(row[3])
        return listed

    def contents(self) -> dict[str, set[int]]:
        """Every incarnation and the gids of its acknowledged documents."""
        with self._lock:
            memories = {row[0]: set() for row in self._db.execute("SELECT memory_key FROM memory_incarnations")}
            for memory_key, gid in self._db.execute("SELECT memory_key, gid FROM memory_documents"):
                memories[memory_key].add(gid)
        return memories

    def forget_documents(self, memory_key: str, gids: list[int]) -> None:
        self._transaction(lambda db: db.executemany(
            "DELETE FROM memory_documents WHERE memory_key = ? AND gid = ?", [(memory_key, gid) for gid in gids]))

    def delete_document(self, memory_key: str, doc_id: str) -> DocumentRecord | None:
        with self._lock:
            row = self._db.execute(
                "DELETE FROM memory_documents WHERE memory_key = ? AND doc_id = ? RETURNING gid, doc_id, text, "
                "num_tokens", (memory_key, doc_id),
            ).fetchone()
        return DocumentRecord(memory_key, *row) if row else None
