"""Memory Interleave for MSA checkpoints (spec §10): generative retrieval, then the answer.

One user request runs as a sequence of SGLang requests over the same memory, each a new prefill
that routes again in every routed layer:

    round 1   <|im_start|>user\n | [memory] | \nPlease answer ...\n\n{Q}\nPlease return all documents
              related to the question\n | <|im_end|>\n<|im_start|>
              the model generates ids "[4][7]<|object_ref_end|>" (or "<End-of-Retrieve>")
    round r   ... + generated ids + "[4]. {text}\n[7]. {text}\n<|object_ref_end|>"
              routes on the instruction + question and the newest injected block
    answer    ... + "<End-of-Retrieve>" + "<|im_start|>The user's question is: {Q}\n<|object_ref_end|>"
              decodes the answer with the routing of the round that ended retrieval

Ids are parsed with `\\[(\\d+)\\]`, de-duplicated, sorted and filtered to documents of this
memory. Prompts are built from token ids segment by segment, so the model's own tokens are never
re-tokenized and every routing span is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from sglang_msa.models.msa_config import TEMPLATE_HEAD
from sglang_msa.server.prompting import MSA_INSTRUCTION, MemoryPrompt

OBJECT_REF_END = "<|object_ref_end|>"
END_OF_RETRIEVE = "<End-of-Retrieve>"
RETRIEVAL_REQUEST = "\nPlease return all documents related to the question"
ANSWER_INTRO = "<|im_start|>The user's question is: "
ANSWER_MARKER = "The answer to the question is:"
MAX_RETRIEVAL_CHARS = 1000  # a round whose retrieval string grows beyond this ends retrieval
# a retrieval round decodes greedily up to either marker (stop strings match special tokens too)
ROUND_SAMPLING_PARAMS = {"temperature": 0, "max_new_tokens": MAX_RETRIEVAL_CHARS,
                         "stop": [OBJECT_REF_END, END_OF_RETRIEVE]}
ID_PATTERN = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class InterleaveLimits:
    max_rounds: int  # retrieval rounds (requests that may generate ids) before the answer
    max_injected_tokens: int  # original text injected over all rounds


@dataclass
class RoundOutput:
    """What one retrieval round's request produced."""

    output_ids: list[int]
    routing: dict  # the request's routing report: its retrieved documents (and layers on request)


@dataclass
class InterleaveRound:
    generated: str  # the retrieval string the model wrote (markers excluded)
    gids: list[int]  # ids injected in this round (held by the memory, within the token budget)
    unknown_gids: list[int]  # ids the model wrote that this memory does not hold
    routing: dict

    def report(self, doc_ids: dict[int, str]) -> dict:
        return {"generated": self.generated,
                "injected": [{"doc_id": doc_ids[gid], "gid": gid} for gid in self.gids],
                "unknown_gids": self.unknown_gids, "routing": self.routing}


@dataclass
class InterleaveResult:
    answer_prompt: MemoryPrompt
    rounds: list[InterleaveRound]
    # "end_of_retrieve" | "max_rounds" | "max_injected_tokens" | "retrieval_length" (> 1,000
    # characters) | "no_marker" (the round stopped without either marker)
    ended_by: str
    doc_ids: dict[int, str] = field(default_factory=dict)

    def report(self) -> dict:
        return {"ended_by": self.ended_by, "rounds": [r.report(self.doc_ids) for r in self.rounds]}


def parse_ids(retrieval: str) -> list[int]:
    """Distinct ids written as [n], ascending."""
    return sorted({int(match) for match in ID_PATTERN.findall(retrieval)})


def extract_answer(text: str) -> str:
    """The text after the answer marker, or the whole text when the model wrote none."""
    head, marker, tail = text.partition(ANSWER_MARKER)
    return (tail if marker else head).strip()


class InterleavePrompts:
    """Token ids of the protocol's fixed strings for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = self.encode(TEMPLATE_HEAD)
        self.newline = self.encode("\n")
        self.round_tail = self.encode("<|im_end|>\n<|im_start|>")
        self.object_ref_end = self.encode(OBJECT_REF_END)
        self.end_of_retrieve = self.encode(END_OF_RETRIEVE)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def first_round(self, question: str) -> tuple[MemoryPrompt, tuple[int, int]]:
        """Round 1's prompt, and the span of the instruction + question (role 0 in every round)."""
        routed = self.encode(MSA_INSTRUCTION + question + RETRIEVAL_REQUEST)
        start = len(self.template)
        question_span = (start, start + len(routed))
        ids = self.template + routed + self.newline + self.round_tail
        # round 1 also routes on the newline that ends the instruction
        return MemoryPrompt(ids, ((start, question_span[1] + len(self.newline)),), start), question_span


async def run_interleave(
    prompts: InterleavePrompts,
    question: str,
    limits: InterleaveLimits,
    generate_round: Callable[[MemoryPrompt], Awaitable[RoundOutput]],
    documents: Callable[[list[int]], dict[int, tuple[str, str]]],
) -> InterleaveResult:
    """Run retrieval rounds until the model ends them (or a limit does); return the answer prompt.

    `generate_round(prompt)` runs one greedy round request (stopping at either marker) and returns
    its output ids; `documents(gids)` returns {gid: (doc_id, original text)} for the gids this
    memory holds.
    """
    prompt, question_span = prompts.first_round(question)
    template = prompt.template_tokens
    rounds: list[InterleaveRound] = []
    doc_ids: dict[int, str] = {}
    budget = limits.max_injected_tokens
    ended_by = "max_rounds"
    ids, spans = list(prompt.input_ids), prompt.routing_spans
    for _ in range(limits.max_rounds):
        output = await generate_round(MemoryPrompt(ids, spans, template))
        text = prompts.decode(output.output_ids)
        retrieval, marker = _split_at_marker(text)
        if marker != OBJECT_REF_END or len(retrieval) > MAX_RETRIEVAL_CHARS:
            rounds.append(InterleaveRound(retrieval, [], [], output.routing))
            if marker == END_OF_RETRIEVE:
                ended_by = "end_of_retrieve"
            else:
                ended_by = "no_marker" if marker is None else "retrieval_length"
            ids = ids + output.output_ids
            if marker != END_OF_RETRIEVE:
                ids = ids + prompts.end_of_retrieve
            return _answer(prompts, ids, spans, template, question, rounds, ended_by, doc_ids)
        wanted = parse_ids(retrieval)
        held = documents(wanted)
        chosen, block_ids = [], []
        for gid in wanted:
            if gid not in held:
                continue
            doc_id, doc_text = held[gid]
            entry = prompts.encode(f"[{gid}]. {doc_text}\n")
            if len(entry) > budget:
                ended_by = "max_injected_tokens"
                break
            budget -= len(entry)
            chosen.append(gid)
            doc_ids[gid] = doc_id
            block_ids += entry
        rounds.append(InterleaveRound(retrieval, chosen, [gid for gid in wanted if gid not in held], output.routing))
        ids = ids + output.output_ids
        newest = (len(ids), len(ids) + len(block_ids))
        ids = ids + block_ids + prompts.object_ref_end
        spans = (question_span, newest) if block_ids else (question_span,)
        if ended_by == "max_injected_tokens":
            break
    ids = ids + prompts.end_of_retrieve
    return _answer(prompts, ids, spans, template, question, rounds, ended_by, doc_ids)


def _split_at_marker(text: str) -> tuple[str, str | None]:
    """The retrieval string before the first marker, and that marker (None: no marker)."""
    positions = {m: text.find(m) for m in (OBJECT_REF_END, END_OF_RETRIEVE) if m in text}
    if not positions:
        return text, None
    marker = min(positions, key=positions.get)
    return text[: positions[marker]], marker


def _answer(prompts: InterleavePrompts, ids: list[int], spans, template: int, question: str,
            rounds: list[InterleaveRound], ended_by: str, doc_ids: dict[int, str]) -> InterleaveResult:
    """Append the question for the answer; the answer routes like the round that ended retrieval
    (the routing tokens precede everything appended, spec §10)."""
    ids = ids + prompts.encode(ANSWER_INTRO + question + "\n") + prompts.object_ref_end
    return InterleaveResult(MemoryPrompt(ids, tuple(spans), template), rounds, ended_by, doc_ids)
