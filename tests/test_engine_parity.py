"""sglang.Engine(attention_backend="msa") == HF transformers, greedy, no memory, for every
architecture: the engine path (model loading, the plugin's registration in SGLang's own
processes, scheduling) end to end. That the backend equals SGLang's dense attention
(torch_native) bit for bit is pinned without an engine by tests/test_backend_unit.py; the three
engines run one after another in one interpreter."""

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


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(prompt).input_ids for prompt in PROMPTS]


@pytest.fixture(scope="module")
def msa_engines(tiny_models) -> dict:
    """Each architecture's greedy outputs through sglang.Engine(attention_backend="msa")."""
    runner = Path(__file__).with_name("engine_runner.py")
    runs = {arch: [str(tiny_models[arch]), prompt_ids(tiny_models[arch])] for arch in ARCHITECTURES}
    result = subprocess.run(
        [sys.executable, str(runner), "msa", str(MAX_NEW_TOKENS), json.dumps(runs)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_engine_msa_matches_hf(tiny_models, msa_engines, arch):
    msa = msa_engines[arch]
    assert msa["attention_backend"] == "msa"
    assert all(len(ids) == MAX_NEW_TOKENS for ids in msa["output_ids"])
    assert msa["output_ids"] == hf_greedy(tiny_models[arch], prompt_ids(tiny_models[arch]), MAX_NEW_TOKENS)
