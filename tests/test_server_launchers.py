"""`python -m sglang.launch_server --attention-backend msa` starts and answers like HF transformers.

(Its own module, so that no other server is running while it starts: idle servers share the
machine's two cores.)
"""

from __future__ import annotations

import pytest
import requests
from transformers import AutoTokenizer

from sglang_msa.server_process import start_server
from tiny_models import hf_greedy

pytestmark = pytest.mark.server


def test_launch_server_module_starts_with_msa(tiny_llama, tmp_path):
    prompt_ids = AutoTokenizer.from_pretrained(tiny_llama)("The capital of France is").input_ids
    with start_server(tiny_llama, "msa", launcher="launch_server",
                      extra_args=["--max-total-tokens", "4096", "--log-level", "warning"],
                      log_path=tmp_path / "launch_server.log") as server:
        print(f"\nstart-up (python -m sglang.launch_server, msa): {server.started_in_s:.1f}s")
        assert requests.get(f"{server.base_url}/get_server_info", timeout=10).json()["attention_backend"] == "msa"
        response = requests.post(
            f"{server.base_url}/generate",
            json={"input_ids": prompt_ids,
                  "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}},
            timeout=60,
        )
        response.raise_for_status()
        assert response.json()["output_ids"] == hf_greedy(tiny_llama, [prompt_ids], 10)[0]
