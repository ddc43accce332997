"""The HTTP server with --attention-backend msa answers like torch_native and HF transformers (no
memory attached).

The msa server here is started with `python -m sglang.launch_server` (every other server test
uses `sglang serve`: both launchers load the plugin), torch_native's with `sglang serve`. Covers
the native /generate endpoint, the OpenAI-compatible chat endpoint, and a frontend-DSL program
(RuntimeEndpoint + sgl.gen/select).
"""

from __future__ import annotations

import pytest
import requests
from transformers import AutoTokenizer

from sglang_msa.server_process import start_server
from tiny_models import hf_greedy

pytestmark = pytest.mark.server

SERVER_ARGS = ["--max-total-tokens", "4096", "--log-level", "warning"]
PROMPTS = ["The capital of France is", "Here we go. There and", "One of the special magic numbers"]


@pytest.fixture(scope="module")
def servers(tiny_llama, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server-logs")
    # msa first, so that no other server is running while it starts (idle servers share the cores)
    with start_server(tiny_llama, "msa", launcher="launch_server", extra_args=SERVER_ARGS,
                      log_path=logs / "msa.log") as msa, \
            start_server(tiny_llama, "torch_native", extra_args=SERVER_ARGS, log_path=logs / "native.log") as native:
        print(f"\nstart-up: msa (python -m sglang.launch_server) {msa.started_in_s:.1f}s, "
              f"torch_native (sglang serve) {native.started_in_s:.1f}s")
        yield {"msa": msa, "torch_native": native}


def generate(base_url: str, prompt: str) -> dict:
    response = requests.post(
        f"{base_url}/generate",
        json={"text": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}},
        timeout=60,
    )
    response.raise_for_status()
    return response.json()


def chat(base_url: str, content: str) -> str:
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        json={"model": "default", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 16},
        timeout=60,
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def test_server_reports_the_msa_backend(servers):
    info = requests.get(f"{servers['msa'].base_url}/get_server_info", timeout=10).json()
    assert info["attention_backend"] == "msa"


def test_launch_server_module_starts_with_msa_and_answers_like_hf(servers, tiny_llama):
    prompt_ids = AutoTokenizer.from_pretrained(tiny_llama)("The capital of France is").input_ids
    response = requests.post(
        f"{servers['msa'].base_url}/generate",
        json={"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}},
        timeout=60,
    )
    response.raise_for_status()
    assert response.json()["output_ids"] == hf_greedy(tiny_llama, [prompt_ids], 10)[0]


def test_generate_matches_torch_native(servers):
    for prompt in PROMPTS:
        msa, native = generate(servers["msa"].base_url, prompt), generate(servers["torch_native"].base_url, prompt)
        assert len(msa["output_ids"]) == 16
        assert msa["output_ids"] == native["output_ids"]
        assert msa["text"] == native["text"]


def test_chat_completions_match_torch_native(servers):
    for content in PROMPTS:
        assert chat(servers["msa"].base_url, content) == chat(servers["torch_native"].base_url, content)


def test_frontend_dsl_program_matches_torch_native(servers):
    import sglang as sgl

    @sgl.function
    def fill_and_choose(s, prompt):
        s += prompt + sgl.gen("continuation", max_tokens=8, temperature=0)
        s += " Is it green or blue? " + sgl.select("color", choices=["green", "blue", "yellow"])

    results = {}
    for name, server in servers.items():
        backend = sgl.RuntimeEndpoint(server.base_url)
        states = fill_and_choose.run_batch([{"prompt": p} for p in PROMPTS], backend=backend)
        results[name] = [(state["continuation"], state["color"]) for state in states]
    assert results["msa"] == results["torch_native"]
    assert all(continuation for continuation, _ in results["msa"])


def test_host_placement_without_a_host_budget_is_refused_naming_the_field(servers):
    base = servers["msa"].base_url
    response = requests.post(f"{base}/v1/memories", json={"memory_id": "on-host", "placement": "host"}, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "placement" and "host_memory_budget_mb" in error["message"]
    assert requests.get(f"{base}/v1/memories/on-host", timeout=30).status_code == 404  # nothing half-created
