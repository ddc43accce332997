"""Chat prompts of MSA checkpoints, in-process: with a tokenizer that merges "\\n\\n" into one token
(as Qwen's does), the prompt still equals, token for token, the spec's query prompt (§10), whose
segments are tokenized separately, and its routing span starts right after the template."""

from __future__ import annotations

import pytest

from msa_checkpoints import MSA_MARKERS
from sglang_msa.server.prompting import PromptError, build_msa_chat_prompt
from tiny_models import build_tokenizer

TEMPLATE = "<|im_start|>user\n"
INSTRUCTION = "\nPlease answer the question based on the above historical document information\n\n"
RETRIEVAL = "\nPlease return all documents related to the question"
QUESTION = "Where is Paris?"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(extra_special_tokens=MSA_MARKERS, qwen_newlines=True)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def spec_query(tokenizer, question: str) -> tuple[list[int], int, int]:
    """Spec §10, round 1: template head (role −2) | instruction + question + retrieval request and
    the newline (role 0) | <|im_end|>\\n (role −2) | <|im_start|> (role −1); with where routing
    starts and ends."""
    template = encode(tokenizer, TEMPLATE)
    routed = encode(tokenizer, INSTRUCTION + question + RETRIEVAL) + encode(tokenizer, "\n")
    ids = template + routed + encode(tokenizer, "<|im_end|>\n<|im_start|>")
    return ids, len(template), len(template) + len(routed)


def test_the_tokenizer_merges_the_template_newline_with_the_instruction(tokenizer):
    assert len(encode(tokenizer, "\n\n")) == 1
    as_text = encode(tokenizer, TEMPLATE + INSTRUCTION)
    assert as_text[: len(encode(tokenizer, TEMPLATE))] != encode(tokenizer, TEMPLATE)


def test_msa_chat_prompt_is_the_spec_query_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": QUESTION}]
    prompt = build_msa_chat_prompt(tokenizer, messages, None)
    ids, start, end = spec_query(tokenizer, QUESTION)
    assert prompt.input_ids == ids
    assert prompt.template_tokens == start and prompt.routing_spans == ((start, end),)


def test_routing_text_narrows_the_span_inside_the_routed_segment(tokenizer):
    prompt = build_msa_chat_prompt(tokenizer, [{"role": "user", "content": QUESTION}], "Paris")
    assert prompt.input_ids == spec_query(tokenizer, QUESTION)[0]
    (start, end), = prompt.routing_spans
    assert start > prompt.template_tokens and "Paris" in tokenizer.decode(prompt.input_ids[start:end])
    assert "Where" not in tokenizer.decode(prompt.input_ids[start:end])
    with pytest.raises(PromptError) as refused:
        build_msa_chat_prompt(tokenizer, [{"role": "user", "content": QUESTION}], "London")
    assert refused.value.status == 422 and refused.value.param == "msa.routing_text"
