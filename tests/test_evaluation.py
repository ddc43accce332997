"""Generators are seeded and well-formed; the metrics score what they claim."""

from __future__ import annotations

import pytest

from sglang_msa.evaluation import generators as gen
from sglang_msa.evaluation.metrics import exact_match, recall_at_k


@pytest.mark.parametrize("variant", gen.NIAH_VARIANTS)
@pytest.mark.parametrize("style", ["noise", "prose"])
def test_niah_needles_are_where_the_gold_says(variant, style):
    task = gen.niah_task(variant, memory_words=3000, doc_words=150, style=style, seed=1)
    assert task == gen.niah_task(variant, memory_words=3000, doc_words=150, style=style, seed=1)  # seeded
    assert task != gen.niah_task(variant, memory_words=3000, doc_words=150, style=style, seed=2)
    texts = {doc.doc_id: doc.text for doc in task.documents}
    assert len(texts) == len(task.documents) == 20
    (question,) = task.questions
    assert question.family == variant
    assert len(question.answers) == (4 if variant in ("multivalue", "multiquery") else 1)
    for value in question.answers:
        holders = [doc_id for doc_id, text in texts.items() if value in text]
        assert len(holders) == 1 and holders[0] in question.gold_doc_ids
    assert all("special magic numbers for" in texts[d] for d in question.gold_doc_ids)
    needles = sum(text.count("special magic numbers for") for text in texts.values())
    assert needles == (1 if variant == "single" else 4)
    assert 2500 < task.num_words() < 4000


@pytest.mark.parametrize("variant", gen.NIAH_VARIANTS)
def test_niah_questions_in_one_memory_are_independent(variant):
    task = gen.niah_task(variant, memory_words=6000, doc_words=150, seed=4, num_questions=5)
    assert task == gen.niah_task(variant, memory_words=6000, doc_words=150, seed=4, num_questions=5)
    texts = {doc.doc_id: doc.text for doc in task.documents}
    assert len(task.questions) == 5 and len({q.question for q in task.questions}) == 5
    per_question = 4 if variant in ("multivalue", "multiquery") else 1
    for question in task.questions:
        assert len(question.answers) == per_question
        for value in question.answers:
            holders = [doc_id for doc_id, text in texts.items() if value in text]
            assert len(holders) == 1 and holders[0] in question.gold_doc_ids
    needles = sum(text.count("special magic numbers for") for text in texts.values())
    assert needles == 5 * (1 if variant == "single" else 4)
    with pytest.raises(ValueError, match="needles need"):
        gen.niah_task(variant, memory_words=600, doc_words=150, num_questions=5 if variant != "single" else 9)


def test_multihop_chains_need_two_documents():
    task = gen.multihop_task(num_chains=3, filler_docs=4, seed=0)
    texts = {doc.doc_id: doc.text for doc in task.documents}
    assert len(texts) == 3 * 4 + 4
    for question in task.questions:
        a, b = question.gold_doc_ids
        person = question.question.split("Where was ")[1].split("'s mentor")[0]
        mentor = texts[a].split("'s mentor is ")[1].split(".")[0]
        assert texts[a].startswith(f"{person}'s mentor is") and texts[b].startswith(f"{mentor} was born in")
        assert question.answers[0] in texts[b] and question.answers[0] not in texts[a]


def test_tenants_conflict_on_every_key():
    a, b = gen.tenant_tasks(num_facts=5, seed=3)
    for qa, qb in zip(a.questions, b.questions):
        assert qa.question == qb.question and qa.answers != qb.answers


def test_metrics():
    assert recall_at_k(["d3", "d1", "d7"], ["d1", "d9"], k=2) == 0.5
    assert recall_at_k(["d3", "d1"], ["d1"], k=1) == 0.0
    with pytest.raises(ValueError):
        recall_at_k(["d1"], [], 1)
    assert exact_match("The numbers are 123 and  456.", ["456", "123"])
    assert not exact_match("The number is 123.", ["123", "456"])
    assert exact_match("It is in PARIS", ["paris"])
    with pytest.raises(ValueError):
        gen.niah_task("nope")


def test_minilm_retriever_finds_the_matching_document():
    from sglang_msa.evaluation.rag import MiniLMRetriever

    retriever = MiniLMRetriever()
    retriever.index(["cat", "paris", "physics"], ["The cat sat on the mat.", "Paris is the capital of France.",
                                                 "Quantum physics studies small particles."])
    assert retriever.search("Which city is the capital of France?", 1) == ["paris"]
    assert retriever.search("Where did the cat sit?", 3)[0] == "cat"
