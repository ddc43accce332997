"""Seeded generators of memory tasks (RULER-style, not RULER: the data is generated here).

- `niah_task`: document-memory needle-in-a-haystack with RULER's needle template
  "One of the special magic {type} for {key} is: {value}.", keys from the `wonderwords` word
  lists (adjective-noun), noise or pseudo-prose haystack documents; variants single,
  multikey (distractor needles), multivalue (several values for one key) and multiquery
  (several keys asked at once).
- `multihop_task`: fact A in one document, fact B in another, distractors that share names.
- `tenant_tasks`: two memories holding conflicting values for the same keys.

Sizes are in words (about 1.3 tokens each for English BPE tokenizers); the benchmarks report
the token counts the server measured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Literal

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_VARIANTS = ("single", "multikey", "multivalue", "multiquery")


@dataclass(frozen=True)
class MemoryDocument:
    doc_id: str
    text: str


@dataclass(frozen=True)
class MemoryQuestion:
    question: str
    answers: list[str]  # every one must appear in a correct answer
    gold_doc_ids: list[str]  # the documents that hold them
    family: str = ""  # the generator's kind of question (NIAH variant, held-out family)


@dataclass(frozen=True)
class MemoryTask:
    name: str
    documents: list[MemoryDocument]
    questions: list[MemoryQuestion] = field(default_factory=list)

    def num_words(self) -> int:
        return sum(len(doc.text.split()) for doc in self.documents)


@lru_cache(maxsize=None)
def word_list(kind: Literal["noun", "adjective"]) -> tuple[str, ...]:
    text = resources.files("wonderwords").joinpath("assets", f"{kind}list.txt").read_text()
    return tuple(w for w in (line.strip() for line in text.splitlines()) if w.isalpha() and len(w) > 2)


def random_key(rng: random.Random) -> str:
    return f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"


def random_value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def haystack_text(rng: random.Random, num_words: int, style: Literal["noise", "prose"]) -> str:
    """Noise repeats RULER's filler sentences; prose strings word-list words into sentences."""
    sentences: list[str] = []
    count = 0
    while count < num_words:
        if style == "noise":
            sentence = NOISE
        else:
            words = [rng.choice(word_list("adjective" if i % 3 == 0 else "noun")) for i in range(rng.randint(6, 14))]
            sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


def niah_task(
    variant: str = "single", memory_words: int = 12_000, doc_words: int = 200,
    style: Literal["noise", "prose"] = "prose", seed: int = 0, num_questions: int = 1,
) -> MemoryTask:
    """A memory of ~memory_words words in documents of ~doc_words words, with needles placed in
    documents at evenly spaced depths, and `num_questions` questions (each with needles of its
    own keys, so one large memory serves several independent questions)."""
    if variant not in NIAH_VARIANTS:
        raise ValueError(f"variant must be one of {NIAH_VARIANTS}, got {variant!r}")
    suffix = "" if num_questions == 1 else f"-{num_questions}q"
    rng = random.Random(f"niah-{variant}-{memory_words}-{doc_words}-{style}-{seed}{suffix}")
    num_docs = max(4, memory_words // doc_words)
    used_keys: set[str] = set()
    groups = [_needle_group(rng, variant, used_keys) for _ in range(num_questions)]
    needles = [needle for group_needles, _ in groups for needle in group_needles]
    if len(needles) > num_docs:
        raise ValueError(f"{len(needles)} needles need at least as many documents, got {num_docs}")
    depths = [round((i + 1) * num_docs / (len(needles) + 1)) % num_docs for i in range(len(needles))]
    rng.shuffle(depths)
    texts = [haystack_text(rng, doc_words, style) for _ in range(num_docs)]
    holders: dict[str, list[str]] = {}
    values: dict[str, list[str]] = {}
    for (key, value), depth in zip(needles, depths):
        sentences = texts[depth].split(". ")
        position = rng.randint(0, len(sentences))
        sentences.insert(position, NEEDLE.format(kind="numbers", key=key, value=value).rstrip("."))
        texts[depth] = ". ".join(sentences)
        holders.setdefault(key, []).append(f"doc-{depth}")
        values.setdefault(key, []).append(value)
    questions = []
    for _, asked in groups:
        if len(asked) == 1:
            question = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
        else:
            question = f"What are all the special magic numbers for {', '.join(asked[:-1])} and {asked[-1]}?"
        answers = [v for key in asked for v in values[key]]
        gold = sorted({doc for key in asked for doc in holders[key]})
        questions.append(MemoryQuestion(question, answers, gold, variant))
    documents = [MemoryDocument(f"doc-{i}", text) for i, text in enumerate(texts)]
    return MemoryTask(f"niah-{variant}", documents, questions)


def _needle_group(rng: random.Random, variant: str, used_keys: set[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """One question's needles (key, value) and the keys it asks; keys never repeat in a task."""
    keys: list[str] = []
    while len(keys) < 4:
        key = random_key(rng)
        if key not in used_keys:
            keys.append(key)
            used_keys.add(key)
    if variant == "single":
        return [(keys[0], random_value(rng))], [keys[0]]
    if variant == "multikey":  # one asked key among distractor keys
        return [(key, random_value(rng)) for key in keys], [keys[0]]
    if variant == "multivalue":  # one key, four values
        return [(keys[0], random_value(rng)) for _ in range(4)], [keys[0]]
    return [(key, random_value(rng)) for key in keys], keys  # multiquery


def multihop_task(num_chains: int = 8, filler_docs: int = 16, seed: int = 0) -> MemoryTask:
    """Chains "X's mentor is Y." (document A) and "Y was born in Z." (document B), with
    distractors that share the names ("X's neighbour is W.", "Y's sister was born in V.")."""
    rng = random.Random(f"multihop-{num_chains}-{filler_docs}-{seed}")
    nouns = word_list("noun")
    people = rng.sample([n.capitalize() for n in nouns], 4 * num_chains)
    places = rng.sample([f"{n.capitalize()}ville" for n in nouns], 2 * num_chains)
    docs, questions = [], []
    for i in range(num_chains):
        x, y, w, s = people[4 * i: 4 * i + 4]
        z, v = places[2 * i: 2 * i + 2]
        a, b = f"chain{i}-a", f"chain{i}-b"
        docs += [MemoryDocument(a, f"{x}'s mentor is {y}. {haystack_text(rng, 40, 'prose')}"),
                 MemoryDocument(b, f"{y} was born in {z}. {haystack_text(rng, 40, 'prose')}"),
                 MemoryDocument(f"chain{i}-d1", f"{x}'s neighbour is {w}. {w} was born in {v}."),
                 MemoryDocument(f"chain{i}-d2", f"{y}'s sister {s} was born in {v}.")]
        questions.append(MemoryQuestion(f"Where was {x}'s mentor born?", [z], [a, b], "multihop"))
    docs += [MemoryDocument(f"filler-{j}", haystack_text(rng, 60, "prose")) for j in range(filler_docs)]
    rng.shuffle(docs)
    return MemoryTask("multihop", docs, questions)


def tenant_tasks(num_facts: int = 12, seed: int = 0) -> tuple[MemoryTask, MemoryTask]:
    """Two memories with the same keys and conflicting values: a query on one must only ever be
    answered from its own memory."""
    rng = random.Random(f"tenants-{num_facts}-{seed}")
    keys = [random_key(rng) for _ in range(num_facts)]
    tasks = []
    for tenant in ("a", "b"):
        docs, questions = [], []
        for i, key in enumerate(keys):
            value = random_value(rng)
            docs.append(MemoryDocument(f"{tenant}-{i}", NEEDLE.format(kind="numbers", key=key, value=value)))
            questions.append(MemoryQuestion(f"What is the special magic number for {key}?", [value], [f"{tenant}-{i}"],
                                            "tenant"))
        tasks.append(MemoryTask(f"tenant-{tenant}", docs, questions))
    return tasks[0], tasks[1]
