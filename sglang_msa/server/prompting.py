"""Prompts of memory queries: token ids and the token span of the routing query."""

from __future__ import annotations

from dataclasses import dataclass

from sglang_msa.server.errors import APIError


class PromptError(APIError):
    """A prompt that cannot be built from the request: 422 naming the field."""

    def __init__(self, message: str, param: str):
        super().__init__(422, message, param)


@dataclass(frozen=True)
class MemoryPrompt:
    input_ids: list[int]
    routing_spans: tuple[tuple[int, int], ...]  # token index ranges [start, end) that route
    template_tokens: int = 0  # leading tokens that precede the memory (MSA checkpoints: the template head)


MSA_INSTRUCTION = "\nPlease answer the question based on the above historical document information\n\n"


def char_span_to_token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """Tokens whose characters overlap [start, end)."""
    inside = [i for i, (lo, hi) in enumerate(offsets) if hi > start and lo < end and hi > lo]
    return (inside[0], inside[-1] + 1) if inside else None


def build_prompt(tokenizer, prompt_text: str, routing_text: str, param: str) -> MemoryPrompt:
    """Tokenize `prompt_text` and find the tokens of its last occurrence of `routing_text`."""
    start = prompt_text.rfind(routing_text)
    if start < 0:
        raise PromptError("the routing text does not occur in the prompt", param)
    encoded = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
    span = char_span_to_token_span(encoded["offset_mapping"], start, start + len(routing_text))
    if span is None:
        raise PromptError("the routing text covers no token of the prompt", param)
    return MemoryPrompt(input_ids=list(encoded["input_ids"]), routing_spans=(span,))


def document_token_ids(tokenizer, gid: int, text: str, msa_checkpoint: bool) -> list[int]:
    """The token ids document `gid` is encoded with: its text, wrapped with its id for MSA
    checkpoints (spec §3). Ingestion and `GET .../documents/{doc_id}?tokens=true` both use this."""
    from sglang_msa.models.msa_config import wrap_document

    encoded = wrap_document(gid, text) if msa_checkpoint else text
    return list(tokenizer(encoded, add_special_tokens=False).input_ids)


def last_user_turn(messages: list[dict]) -> int:
    """Index of the last non-empty user message: the question of a memory query."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"].strip()]
    if not turns:
        raise PromptError("a memory query needs a non-empty user message", "messages")
    return turns[-1]


def build_chat_prompt(tokenizer, messages: list[dict], routing_text: str | None) -> MemoryPrompt:
    """Apply the model's chat template; route on `routing_text` or the last user message."""
    if routing_text is None:
        routing_text, param = messages[last_user_turn(messages)]["content"], "messages"
    else:
        param = "msa.routing_text"
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return build_prompt(tokenizer, prompt_text, routing_text, param)


def build_msa_chat_prompt(tokenizer, messages: list[dict], routing_text: str | None) -> MemoryPrompt:
    """The spec's query prompt (§10, round 1) for the last user message {Q}:

        <|im_start|>user\n | [memory] | \nPlease answer ...\n\n{Q}\nPlease return all ... question\n | <|im_end|>\n<|im_start|>
        template                        routing: instruction + question + request, and the newline

    built from token ids segment by segment (`InterleavePrompts.first_round`), so no token merges
    across the template boundary. `routing_text`, when given, must occur in the routed text; its
    tokens alone route.
    """
    from sglang_msa.server.interleave import RETRIEVAL_REQUEST, InterleavePrompts

    question = messages[last_user_turn(messages)]["content"]
    prompt, question_span = InterleavePrompts(tokenizer).first_round(question)
    if routing_text is None:
        return prompt
    routed_text = MSA_INSTRUCTION + question + RETRIEVAL_REQUEST
    start = routed_text.rfind(routing_text)
    if start < 0:
        raise PromptError("the routing text does not occur in the question", "msa.routing_text")
    encoded = tokenizer(routed_text, add_special_tokens=False, return_offsets_mapping=True)
    span = char_span_to_token_span(encoded["offset_mapping"], start, start + len(routing_text))
    if span is None:
        raise PromptError("the routing text covers no token of the prompt", "msa.routing_text")
    first = question_span[0]
    return MemoryPrompt(prompt.input_ids, ((first + span[0], first + span[1]),), prompt.template_tokens)


def injected_question(older: list[str], newest: list[str], question: str) -> tuple[str, str]:
    """The user message with documents' original text before the question, and the routing text
    of the next round: the newest documents together with the question (contiguous)."""
    newest_block = "\n".join(newest)
    routed = (newest_block + "\n\n" if newest_block else "") + "Question: " + question
    header = "Relevant documents:\n" + ("\n".join(older) + "\n" if older else "")
    return header + routed, routed
