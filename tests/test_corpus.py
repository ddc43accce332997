"""The corpus side of `sglang-msa ingest`, without a server: files to documents, splitting on
paragraph boundaries, stable ids that record the source, non-UTF-8 files skipped whole, and the
resume rule (only what the server does not hold with the same text is sent again)."""

from __future__ import annotations

import json

from sglang_msa.corpus import batches, doc_id_for, pending, read_corpus, split_text


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def paragraph(label: str, n: int) -> str:
    return " ".join(f"{label}{i}" for i in range(n))


def test_split_keeps_paragraphs_whole_and_within_the_limit():
    text = "\n\n".join([paragraph("a", 30), paragraph("b", 30), paragraph("c", 30), paragraph("d", 5)])
    parts = split_text(text, 64, words)
    assert parts == ["\n\n".join([paragraph("a", 30), paragraph("b", 30)]),
                     "\n\n".join([paragraph("c", 30), paragraph("d", 5)])]
    assert split_text("short text", 64, words) == ["short text"]
    # a paragraph longer than a part: split on lines, then words; nothing is lost, every part fits
    long_paragraph = "\n".join(paragraph(f"l{n}-", 20) for n in range(10)) + "\n" + paragraph("w", 150)
    parts = split_text(long_paragraph, 50, words)
    assert all(words(part) <= 50 for part in parts)
    assert " ".join(parts).split() == long_paragraph.split()


def test_folder_to_documents_with_sources_parts_and_skips(tmp_path):
    notes = tmp_path / "notes"
    (notes / "2024").mkdir(parents=True)
    (notes / "2024" / "standup.md").write_text("The standup moved to 9:30.")
    (notes / "long.txt").write_text("\n\n".join(paragraph(f"p{n}-", 40) for n in range(5)))
    (notes / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (notes / "ignored.pdf").write_bytes(b"%PDF")
    (notes / "facts.jsonl").write_text("\n".join([
        json.dumps({"text": "The office is in Lyon.", "doc_id": "office"}),
        json.dumps({"text": "Parking is on level -2."}),
        "not json",
        json.dumps({"doc_id": "no-text"}),
        json.dumps({"text": "Same id again.", "doc_id": "office"}),
    ]))
    documents, skipped = read_corpus([notes], max_tokens=116, count_tokens=words)
    ids = [d.doc_id for d in documents]
    assert ids == ["2024:standup.md", "office", "facts.jsonl:line-2", "long.txt:part-1", "long.txt:part-2",
                   "long.txt:part-3"]
    long_parts = [d for d in documents if d.doc_id.startswith("long.txt")]
    assert all(d.tokens <= 100 for d in long_parts)  # max_tokens less the server's wrap margin
    assert [d.source for d in long_parts][0] == "long.txt (part 1 of 3)"
    assert "\n\n".join(d.text for d in long_parts) == (notes / "long.txt").read_text()
    reasons = {item.source: item.reason for item in skipped}
    assert set(reasons) == {"latin1.txt", "facts.jsonl:3", "facts.jsonl:4", "facts.jsonl:5"}
    assert "not UTF-8" in reasons["latin1.txt"] and "already used" in reasons["facts.jsonl:5"]


def test_doc_ids_are_valid_and_distinct():
    assert doc_id_for("a b/c?.md") == "a_b:c_.md"
    assert doc_id_for(".hidden") == "d.hidden"
    long = doc_id_for("x/" * 300 + "end.md")
    assert len(long) <= 256 and long.endswith("end.md") and long != doc_id_for("y/" * 300 + "end.md")


def test_resume_sends_only_what_the_server_lacks(tmp_path):
    for name, text in (("a.txt", "alpha"), ("b.txt", "bravo"), ("c.txt", "charlie")):
        (tmp_path / name).write_text(text)
    documents, _ = read_corpus([tmp_path], 100, words)
    by_id = {d.doc_id: d for d in documents}
    stored = {"a.txt": by_id["a.txt"].sha256, "b.txt": "0" * 64}  # b's text changed since it was stored
    assert [d.doc_id for d in pending(documents, stored)] == ["b.txt", "c.txt"]
    assert pending(documents, {d.doc_id: d.sha256 for d in documents}) == []


def test_batches_respect_document_and_byte_limits(tmp_path):
    for n in range(10):
        (tmp_path / f"{n}.txt").write_text("x" * 100)
    documents, _ = read_corpus([tmp_path], 1000, words)
    assert [len(b) for b in batches(documents, 4, 10**6)] == [4, 4, 2]
    assert [len(b) for b in batches(documents, 100, 300)] == [2] * 5
