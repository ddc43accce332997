"""The held-out generator is seeded, puts each needle exactly where the gold says, shares no
template vocabulary with the NIAH generator or the calibration corpus, and sizes in tokens."""

from __future__ import annotations

import re

import pytest

from sglang_msa.calibration import corpus
from sglang_msa.evaluation import generators, heldout

NEEDLE_MARKERS = ("access code of the", "observatory first opened", "Replacement orders for the", "reports to",
                  "keeps an office in the", "signed the safety log")
# The templates the held-out needles and questions must not share a content word with: the NIAH
# generator's, and the calibration corpus's entity facts and inverse-cloze questions.
OTHER_TEMPLATES = (
    generators.NEEDLE, "What are all the special magic numbers for {key} mentioned in the provided text?",
    "What is the special magic number for {key}?",
    *corpus.CLOZE_TEMPLATES, *corpus.WORD_TEMPLATES, *(t for pair in corpus.FACT_TEMPLATES.values() for t in pair),
)
# function words and interrogatives every question shares
STOPWORDS = {"the", "a", "an", "of", "for", "is", "to", "in", "at", "as", "on", "and", "was", "does", "which", "who",
             "what", "where", "when"}


def words(template: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", template.lower())) if w not in STOPWORDS}


def test_same_seed_same_task_other_seed_other_task():
    make = lambda seed: heldout.heldout_task(8000, 150, seed, heldout.FAMILIES, 3)  # noqa: E731
    assert make(1) == make(1)
    other = make(2)
    assert other.documents != make(1).documents and other.questions != make(1).questions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_needles_sit_exactly_in_the_gold_documents(seed):
    task = heldout.heldout_task(16000, 150, seed, heldout.FAMILIES, 9)
    texts = {doc.doc_id: doc.text for doc in task.documents}
    assert [q.family for q in task.questions] == list(heldout.FAMILIES) * 3
    assert [len(q.gold_doc_ids) for q in task.questions[1::3]] == [2, 2, 2]  # chain: two documents
    assert all(len(q.gold_doc_ids) in (2, 3) for q in task.questions[2::3])  # aggregate: 2-3
    for question in task.questions:
        for answer in question.answers:
            holders = [doc_id for doc_id, text in texts.items() if answer in text]
            assert len(holders) == 1 and holders[0] in question.gold_doc_ids, (answer, holders)
        if question in task.questions[1::3]:  # chain: the asked person is in one gold doc, the answer in the other
            person = question.question.split("the person ")[1].split(" reports")[0]
            (asked,) = [d for d in question.gold_doc_ids if f"{person} reports to" in texts[d]]
            assert not any(answer in texts[asked] for answer in question.answers)
    gold = sorted(d for q in task.questions for d in q.gold_doc_ids)
    with_needle = sorted(d for d, text in texts.items() for m in NEEDLE_MARKERS if m in text)
    assert gold == with_needle and len(set(gold)) == len(gold)  # one needle sentence per document


def test_no_template_word_is_shared_with_the_other_generators():
    held_out = [t for pair in heldout.SINGLE_FORMS.values() for t in pair]
    held_out += [*heldout.CHAIN_NEEDLES, heldout.CHAIN_QUESTION, heldout.AGGREGATE_NEEDLE, heldout.AGGREGATE_QUESTION]
    ours = set().union(*map(words, held_out))
    theirs = set().union(*map(words, OTHER_TEMPLATES))
    assert ours and not ours & theirs, ours & theirs
    task = heldout.heldout_task(8000, 150, 0, heldout.FAMILIES, 6)
    listed = {w.lower() for kind in ("noun", "adjective") for w in generators.word_list(kind)}
    asked = {w.lower() for q in task.questions for w in re.findall(r"[A-Z][a-z]+", q.question)} - {"which", "who", "on", "in"}
    assert asked and not asked & listed  # invented names, not NIAH's word lists


def test_sizes_are_in_tokens_of_the_embedded_tokenizer():
    from transformers import AutoTokenizer

    from sglang_msa.models.embedded import prepare_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded_model())
    for requested in (4000, 16000):
        task = heldout.heldout_task(requested, 150, 3, heldout.FAMILIES, 3)
        tokens = sum(len(tokenizer(d.text, add_special_tokens=False).input_ids) for d in task.documents)
        assert 0.9 * requested < tokens < 1.1 * requested, (requested, tokens)
        assert all(len(d.text.split()) < 150 + 80 for d in task.documents)


def test_numbers_in_words_and_refusals():
    assert heldout.number_words(4821) == "four thousand eight hundred twenty-one"
    assert heldout.number_words(9019) == "nine thousand nineteen"
    assert heldout.number_words(7340) == "seven thousand three hundred forty"
    with pytest.raises(ValueError):
        heldout.number_words(10000)
    with pytest.raises(ValueError, match="family"):
        heldout.heldout_task(4000, families=("magic",))
    with pytest.raises(ValueError, match="need at least"):
        heldout.heldout_task(1000, 150, 0, ("aggregate",), 8)
