"""A corpus on disk as memory documents, for `sglang-msa ingest` (no server needed here).

Files: `.txt` and `.md` are one document each; `.jsonl` has one document per line, an object
with `text` and optionally `doc_id`. A document longer than the server's `max_document_tokens`
is split on paragraph boundaries (blank lines; a longer paragraph on lines, then on words) into
numbered parts. Each document's id says where it came from: the file's path relative to the
folder given, `/` written `:` (`notes:2024:standup.md`), `:line-N` for a JSONL line without an
id, `:part-N` for a part. A file that is not UTF-8 is reported and skipped whole, never loaded
in part.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

SUFFIXES = (".txt", ".md", ".jsonl")
WRAP_MARGIN = 16  # tokens the server may add around a document (MSA checkpoints wrap it with its id)
_NOT_IN_DOC_ID = re.compile(r"[^A-Za-z0-9._:-]")
MAX_DOC_ID = 256

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class CorpusDocument:
    doc_id: str
    text: str
    source: str  # the file (and line) it came from
    tokens: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


def corpus_files(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """(file, its name in doc ids): the supported files under each folder, sorted, and each
    file given by name (its name without folders)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += [(file, file.relative_to(path).as_posix()) for file in sorted(path.rglob("*"))
                      if file.is_file() and file.suffix.lower() in SUFFIXES]
        else:
            found.append((path, path.name))
    return found


def doc_id_for(name: str) -> str:
    """A valid doc_id naming `name`: folders as `:`, other characters outside the id alphabet
    as `_`; a name too long keeps its end and a hash of the whole."""
    doc_id = _NOT_IN_DOC_ID.sub("_", name.replace("/", ":"))
    if not doc_id[:1].isalnum():
        doc_id = "d" + doc_id
    if len(doc_id) > MAX_DOC_ID:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        doc_id = f"{digest}:{doc_id[-(MAX_DOC_ID - 17):]}"
    return doc_id


def split_text(text: str, max_tokens: int, count_tokens: TokenCounter) -> list[str]:
    """`text` as parts of at most `max_tokens` tokens, cut between paragraphs where possible."""
    if count_tokens(text) <= max_tokens:
        return [text]
    return _pack(re.split(r"\n\s*\n", text), "\n\n", max_tokens, count_tokens,
                 lambda unit: _pack(unit.split("\n"), "\n", max_tokens, count_tokens,
                                    lambda line: _pack(line.split(" "), " ", max_tokens, count_tokens, None)))


def _pack(units: list[str], separator: str, max_tokens: int, count_tokens: TokenCounter, split_unit) -> list[str]:
    """Greedily join consecutive units while the part fits; a unit that fits no part alone is
    split by `split_unit` (a single word longer than a part is cut by characters)."""
    parts, current = [], []
    for unit in (u for u in units if u.strip()):
        if count_tokens(unit) > max_tokens:
            if current:
                parts.append(separator.join(current))
                current = []
            parts += split_unit(unit) if split_unit else _cut(unit, max_tokens, count_tokens)
            continue
        if current and count_tokens(separator.join([*current, unit])) > max_tokens:
            parts.append(separator.join(current))
            current = []
        current.append(unit)
    if current:
        parts.append(separator.join(current))
    return parts


def _cut(word: str, max_tokens: int, count_tokens: TokenCounter) -> list[str]:
    size = max(1, len(word) * max_tokens // (2 * count_tokens(word)))
    return [word[start:start + size] for start in range(0, len(word), size)]


def file_documents(file: Path, name: str, max_tokens: int,
                   count_tokens: TokenCounter) -> tuple[list[CorpusDocument], list[Skipped]]:
    """The documents of one file (parts numbered when split), and what was skipped in it."""
    try:
        content = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [Skipped(name, f"not UTF-8 (byte {exc.start}); file skipped")]
    except OSError as exc:
        return [], [Skipped(name, f"unreadable: {exc.strerror}")]
    if file.suffix.lower() != ".jsonl":
        entries = [(doc_id_for(name), content, name)]
        skipped = []
    else:
        entries, skipped = _jsonl_entries(content, name)
    documents = []
    for doc_id, text, source in entries:
        if not text.strip():
            skipped.append(Skipped(source, "empty"))
            continue
        parts = split_text(text, max_tokens - WRAP_MARGIN, count_tokens)
        for number, part in enumerate(parts, 1):
            part_id = doc_id if len(parts) == 1 else f"{doc_id[:MAX_DOC_ID - 12]}:part-{number}"
            part_source = source if len(parts) == 1 else f"{source} (part {number} of {len(parts)})"
            documents.append(CorpusDocument(part_id, part, part_source, count_tokens(part)))
    return documents, skipped


def _jsonl_entries(content: str, name: str) -> tuple[list[tuple[str, str, str]], list[Skipped]]:
    entries, skipped = [], []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        source = f"{name}:{number}"
        try:
            item = json.loads(line)
            text, doc_id = item["text"], item.get("doc_id")
            if not isinstance(text, str) or not (doc_id is None or isinstance(doc_id, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped.append(Skipped(source, "not a JSON object with a string `text` (and optional string `doc_id`)"))
            continue
        entries.append((doc_id_for(doc_id) if doc_id else doc_id_for(f"{name}:line-{number}"), text, source))
    return entries, skipped


def read_corpus(paths: Iterable[Path], max_tokens: int,
                count_tokens: TokenCounter) -> tuple[list[CorpusDocument], list[Skipped]]:
    """Every document under `paths`, and what was skipped; a doc_id met twice is skipped the
    second time."""
    documents, skipped, seen = [], [], {}
    for file, name in corpus_files(paths):
        found, file_skipped = file_documents(file, name, max_tokens, count_tokens)
        skipped += file_skipped
        for document in found:
            if document.doc_id in seen:
                skipped.append(Skipped(document.source, f"doc_id {document.doc_id!r} already used by "
                                                        f"{seen[document.doc_id]}"))
                continue
            seen[document.doc_id] = document.source
            documents.append(document)
    return documents, skipped


def pending(documents: list[CorpusDocument], stored: dict[str, str]) -> list[CorpusDocument]:
    """The documents a load still has to send: those not stored under their doc_id with the same
    text (`stored`: doc_id → SHA-256 of the stored text). A changed text is sent again (the
    server answers 409 for it, or replaces it when asked)."""
    return [document for document in documents if stored.get(document.doc_id) != document.sha256]


def batches(documents: list[CorpusDocument], max_documents: int, max_bytes: int) -> list[list[CorpusDocument]]:
    """Consecutive submissions within the server's limits (documents and body bytes)."""
    result, current, size = [], [], 0
    for document in documents:
        cost = len(json.dumps({"text": document.text, "doc_id": document.doc_id})) + 2
        if current and (len(current) >= max_documents or size + cost > max_bytes):
            result.append(current)
            current, size = [], 0
        current.append(document)
        size += cost
    if current:
        result.append(current)
    return result
