"""Memory Interleave loop mechanics with a scripted decode (no server): prompts, routing spans,
id parsing, unknown ids, limits and the end marker, checked token by token against spec §10."""

from __future__ import annotations

import asyncio

import pytest

from sglang_msa.server.interleave import (
    END_OF_RETRIEVE,
    OBJECT_REF_END,
    InterleaveLimits,
    InterleavePrompts,
    RoundOutput,
    extract_answer,
    parse_ids,
    run_interleave,
)
from tiny_models import build_tokenizer

QUESTION = "Where did the blue fox go?"
DOCUMENTS = {0: ("alpha", "The fox is blue."), 1: ("beta", "The blue fox went home."), 2: ("gamma", "Home is far.")}
INSTRUCTION = "\nPlease answer the question based on the above historical document information\n\n"
RETRIEVAL = "\nPlease return all documents related to the question"
ROUND_1 = "<|im_start|>user\n" + INSTRUCTION + QUESTION + RETRIEVAL + "\n<|im_end|>\n<|im_start|>"


@pytest.fixture(scope="module")
def prompts():
    return InterleavePrompts(build_tokenizer(extra_special_tokens=(OBJECT_REF_END, END_OF_RETRIEVE)))


class ScriptedModel:
    """Answers each round request with the next scripted text; records the prompts it got."""

    def __init__(self, prompts: InterleavePrompts, script: list[str]):
        self.prompts, self.script, self.calls = prompts, list(script), []

    async def __call__(self, prompt):
        self.calls.append(prompt)
        text = self.script[len(self.calls) - 1]
        return RoundOutput(self.prompts.encode(text), {"round": len(self.calls)})


def documents(gids):
    return {gid: DOCUMENTS[gid] for gid in gids if gid in DOCUMENTS}


def run(prompts, script, max_rounds=8, max_injected_tokens=4096):
    model = ScriptedModel(prompts, script)
    result = asyncio.run(run_interleave(prompts, QUESTION, InterleaveLimits(max_rounds, max_injected_tokens),
                                        model, documents))
    return model, result


def spans_text(prompts, prompt) -> list[str]:
    return [prompts.decode(prompt.input_ids[start:end]) for start, end in prompt.routing_spans]


def test_rounds_inject_parse_and_reroute(prompts):
    model, result = run(prompts, [
        "[2][0][2][9]" + OBJECT_REF_END,  # duplicate and unknown ids
        "[1]" + OBJECT_REF_END,
        END_OF_RETRIEVE,
    ])
    assert len(model.calls) == 3 and result.ended_by == "end_of_retrieve"
    first, second, third = model.calls
    template = len(prompts.encode("<|im_start|>user\n"))
    assert all(call.template_tokens == template for call in (first, second, third, result.answer_prompt))

    # round 1: the published prompt; the instruction, question and the newline after them route
    assert prompts.decode(first.input_ids) == ROUND_1
    assert spans_text(prompts, first) == [INSTRUCTION + QUESTION + RETRIEVAL + "\n"]

    # round 2: generated ids, then the original text of the known ids, ascending, de-duplicated
    injected_1 = "[0]. The fox is blue.\n[2]. Home is far.\n"
    assert prompts.decode(second.input_ids) == ROUND_1 + "[2][0][2][9]" + OBJECT_REF_END + injected_1 + OBJECT_REF_END
    assert spans_text(prompts, second) == [INSTRUCTION + QUESTION + RETRIEVAL, injected_1]
    assert second.input_ids[: len(first.input_ids)] == first.input_ids  # never re-tokenized

    # round 3 routes on the newest block only (with the question)
    injected_2 = "[1]. The blue fox went home.\n"
    assert prompts.decode(third.input_ids) == prompts.decode(second.input_ids) + "[1]" + OBJECT_REF_END + \
        injected_2 + OBJECT_REF_END
    assert spans_text(prompts, third) == [INSTRUCTION + QUESTION + RETRIEVAL, injected_2]

    # answer: the question after the end marker, routed like the round that ended retrieval
    answer = result.answer_prompt
    assert prompts.decode(answer.input_ids) == prompts.decode(third.input_ids) + END_OF_RETRIEVE + \
        "<|im_start|>The user's question is: " + QUESTION + "\n" + OBJECT_REF_END
    assert answer.routing_spans == third.routing_spans

    report = result.report()
    assert [r["generated"] for r in report["rounds"]] == ["[2][0][2][9]", "[1]", ""]
    assert [[d["doc_id"] for d in r["injected"]] for r in report["rounds"]] == [["alpha", "gamma"], ["beta"], []]
    assert [r["unknown_gids"] for r in report["rounds"]] == [[9], [], []]
    assert [r["routing"] for r in report["rounds"]] == [{"round": 1}, {"round": 2}, {"round": 3}]


def test_end_of_retrieval_in_round_one_keeps_round_one_routing(prompts):
    model, result = run(prompts, [END_OF_RETRIEVE])
    assert result.ended_by == "end_of_retrieve" and len(model.calls) == 1
    assert result.answer_prompt.routing_spans == model.calls[0].routing_spans
    assert prompts.decode(result.answer_prompt.input_ids) == ROUND_1 + END_OF_RETRIEVE + \
        "<|im_start|>The user's question is: " + QUESTION + "\n" + OBJECT_REF_END


def test_round_limit_ends_retrieval_with_the_marker(prompts):
    model, result = run(prompts, ["[1]" + OBJECT_REF_END] * 5, max_rounds=2)
    assert len(model.calls) == 2 and result.ended_by == "max_rounds"
    text = prompts.decode(result.answer_prompt.input_ids)
    assert text.count("[1]. The blue fox went home.\n") == 2  # the spec de-duplicates within a round only
    assert (OBJECT_REF_END + END_OF_RETRIEVE + "<|im_start|>The user's question is:") in text
    assert spans_text(prompts, result.answer_prompt)[1] == "[1]. The blue fox went home.\n"


def test_injected_token_budget(prompts):
    first_entry = len(prompts.encode("[0]. The fox is blue.\n"))
    model, result = run(prompts, ["[0][1]" + OBJECT_REF_END] * 3, max_injected_tokens=first_entry + 1)
    assert result.ended_by == "max_injected_tokens" and len(model.calls) == 1
    assert result.rounds[0].gids == [0]
    assert spans_text(prompts, result.answer_prompt)[1] == "[0]. The fox is blue.\n"


def test_unknown_ids_only_inject_nothing(prompts):
    model, result = run(prompts, ["[7][8]" + OBJECT_REF_END, END_OF_RETRIEVE])
    assert result.rounds[0].gids == [] and result.rounds[0].unknown_gids == [7, 8]
    assert spans_text(prompts, model.calls[1]) == [INSTRUCTION + QUESTION + RETRIEVAL]


def test_rounds_without_marker_or_too_long(prompts):
    model, result = run(prompts, ["[1]<|im_end|>"])
    assert result.ended_by == "no_marker" and result.rounds[0].gids == []
    assert prompts.decode(result.answer_prompt.input_ids).startswith(ROUND_1 + "[1]<|im_end|>" + END_OF_RETRIEVE)
    model, result = run(prompts, ["[1]" * 400 + OBJECT_REF_END])
    assert result.ended_by == "retrieval_length" and result.rounds[0].gids == []


def test_parse_ids_and_extract_answer():
    assert parse_ids("[12] and [3][12] [x] [-1] [007]") == [3, 7, 12]
    assert parse_ids("no ids") == []
    assert extract_answer("Reasoning. The answer to the question is: Paris ") == "Paris"
    assert extract_answer(" Paris\n") == "Paris"
