"""Memory metadata kept by the HTTP server process in SQLite: memories, document ids, texts.

Document tensors live in the scheduler (`sglang_msa.memory_manager.store`); this is the record
of what was acknowledged: a document row is written only after the scheduler committed its
tensors. Global document ids (`gid`) are assigned here in insertion order and never reused.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    memory_id TEXT PRIMARY KEY,
    owner TEXT,
    created_at REAL NOT NULL,
    next_gid INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS documents (
    memory_id TEXT NOT NULL REFERENCES memories(memory_id) ON DELETE CASCADE,
    gid INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    text TEXT NOT NULL,
    num_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (memory_id, gid),
    UNIQUE (memory_id, doc_id)
);
"""


@dataclass(frozen=True)
class DocumentRecord:
    memory_id: str
    gid: int
    doc_id: str
    text: str
    num_tokens: int


class MetadataStore:
    """In memory by default; with a file path, every change is a committed, fsynced transaction
    (WAL journal, synchronous=FULL) that survives a crash of the server."""

    def __init__(self, path: str | Path = ":memory:"):
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA foreign_keys = ON")
        if str(path) != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def create_memory(self, memory_id: str, owner: str | None = None) -> bool:
        with self._lock:
            try:
                self._db.execute("INSERT INTO memories (memory_id, owner, created_at) VALUES (?, ?, ?)",
                                 (memory_id, owner, time.time()))
                return True
            except sqlite3.IntegrityError:
                return False

    def memory_owner(self, memory_id: str) -> tuple[bool, str | None]:
        """(whether the memory exists, its owner tenant)."""
        with self._lock:
            row = self._db.execute("SELECT owner FROM memories WHERE memory_id = ?", (memory_id,)).fetchone()
        return (row is not None, row[0] if row else None)

    def delete_memory(self, memory_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM memories WHERE memory_id = ?", (memory_id,)).rowcount > 0

    def list_memories(self, owner: str | None = None) -> list[dict]:
        """All memories, or with `owner` only that tenant's."""
        with self._lock:
            rows = self._db.execute(
                "SELECT m.memory_id, COUNT(d.gid), COALESCE(SUM(d.num_tokens), 0) FROM memories m "
                "LEFT JOIN documents d ON d.memory_id = m.memory_id WHERE ? IS NULL OR m.owner = ? "
                "GROUP BY m.memory_id ORDER BY m.memory_id", (owner, owner),
            ).fetchall()
        return [{"memory_id": m, "documents": n, "tokens": t} for m, n, t in rows]

    def next_gid(self, memory_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT next_gid FROM memories WHERE memory_id = ?", (memory_id,)).fetchone()
        if row is None:
            raise KeyError(memory_id)
        return row[0]

    def reserve_gids(self, memory_id: str, count: int) -> list[int]:
        """Assign the next `count` document ids of the memory (insertion order, never reused)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT next_gid FROM memories WHERE memory_id = ?", (memory_id,)).fetchone()
                if row is None:
                    raise KeyError(memory_id)
                self._db.execute("UPDATE memories SET next_gid = ? WHERE memory_id = ?", (row[0] + count, memory_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return list(range(row[0], row[0] + count))

    def existing_doc_ids(self, memory_id: str, doc_ids: list[str]) -> list[str]:
        with self._lock:
            placeholders = ",".join("?" * len(doc_ids))
            rows = self._db.execute(
                f"SELECT doc_id FROM documents WHERE memory_id = ? AND doc_id IN ({placeholders})",
                (memory_id, *doc_ids),
            ).fetchall()
        return [row[0] for row in rows]

    def add_document(self, record: DocumentRecord) -> bool:
        """Record an acknowledged document; False if its memory is gone or its doc_id is taken."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO documents (memory_id, gid, doc_id, text, num_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (record.memory_id, record.gid, record.doc_id, record.text, record.num_tokens, time.time()),
                )
                return True
            except sqlite3.IntegrityError:
                return False

    def get_document(self, memory_id: str, doc_id: str) -> DocumentRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT gid, doc_id, text, num_tokens FROM documents WHERE memory_id = ? AND doc_id = ?",
                (memory_id, doc_id),
            ).fetchone()
        return DocumentRecord(memory_id, *row) if row else None

    def documents_by_gid(self, memory_id: str, gids: list[int]) -> dict[int, DocumentRecord]:
        if not gids:
            return {}
        with self._lock:
            placeholders = ",".join("?" * len(gids))
            rows = self._db.execute(
                f"SELECT gid, doc_id, text, num_tokens FROM documents WHERE memory_id = ? AND gid IN ({placeholders})",
                (memory_id, *gids),
            ).fetchall()
        return {row[0]: DocumentRecord(memory_id, *row) for row in rows}

    def list_documents(self, memory_id: str, limit: int, offset: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT doc_id, gid, num_tokens FROM documents WHERE memory_id = ? ORDER BY gid LIMIT ? OFFSET ?",
                (memory_id, limit, offset),
            ).fetchall()
        return [{"doc_id": doc_id, "gid": gid, "num_tokens": n} for doc_id, gid, n in rows]

    def owners(self) -> dict[str, str | None]:
        with self._lock:
            return dict(self._db.execute("SELECT memory_id, owner FROM memories").fetchall())

    def contents(self) -> dict[str, set[int]]:
        """Every memory and the gids of its acknowledged documents."""
        with self._lock:
            memories = {row[0]: set() for row in self._db.execute("SELECT memory_id FROM memories")}
            for memory_id, gid in self._db.execute("SELECT memory_id, gid FROM documents"):
                memories[memory_id].add(gid)
        return memories

    def forget_documents(self, memory_id: str, gids: list[int]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM documents WHERE memory_id = ? AND gid = ?",
                                 [(memory_id, gid) for gid in gids])
            self._db.execute("COMMIT")

    def delete_document(self, memory_id: str, doc_id: str) -> DocumentRecord | None:
        with self._lock:
            row = self._db.execute(
                "DELETE FROM documents WHERE memory_id = ? AND doc_id = ? RETURNING gid, doc_id, text, num_tokens",
                (memory_id, doc_id),
            ).fetchone()
        return DocumentRecord(memory_id, *row) if row else None
