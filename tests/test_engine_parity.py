"""sglang.Engine(attention_backend="msa") == torch_native == HF transformers, greedy, no memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import ARCHITECTURES, hf_greedy

pytestmark = pytest.mark.server

MAX_NEW_TOKENS = 12
PROMPTS = ["The capital of France is", "One of the special magic numbers for", "Memory"]


def engine_greedy(model_dir: Path, backend: str, input_ids: list[list[int]]) -> dict:
    runner = Path(__file__).with_name("engine_runner.py")
    result = subprocess.run(
        [sys.executable, str(runner), str(model_dir), backend, str(MAX_NEW_TOKENS), json.dumps(input_ids)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_engine_msa_matches_torch_native_and_hf(tiny_models, arch):
    from transformers import AutoTokenizer

    model_dir = tiny_models[arch]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = [tokenizer(prompt).input_ids for prompt in PROMPTS]

    msa = engine_greedy(model_dir, "msa", input_ids)
    native = engine_greedy(model_dir, "torch_native", input_ids)
    assert msa["attention_backend"] == "msa"
    assert all(len(ids) == MAX_NEW_TOKENS for ids in msa["output_ids"])
    assert msa["output_ids"] == native["output_ids"]
    assert msa["output_ids"] == hf_greedy(model_dir, input_ids, MAX_NEW_TOKENS)
