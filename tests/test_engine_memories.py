"""The Python API for sglang.Engine users: the memory operations in-process, no HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_msa.server_process import free_port

pytestmark = pytest.mark.server


def test_engine_memories_round_trip(tiny_llama):
    runner = Path(__file__).with_name("engine_memories_runner.py")
    result = subprocess.run([sys.executable, str(runner), str(tiny_llama), str(free_port())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["create"] == {"memory_id": "notes", "created": True, "placement": "auto"}
    assert [d["doc_id"] for d in out["add"]["documents"]] == ["0", "budget"]
    assert out["info"]["documents"] == 2 and out["info"]["tokens"] == sum(
        d["num_tokens"] for d in out["add"]["documents"])
    chat = out["chat"]
    assert chat["usage"]["completion_tokens"] == 4
    assert sorted(d["doc_id"] for d in chat["msa"]["retrieved"]) == ["0", "budget"]  # 2 docs, top_k 16
    assert set(chat["msa"]["layers"]) == {"1"}  # upper half of a 2-layer model
    assert {d["doc_id"] for d in out["generate"]["retrieved"]} == {"0", "budget"}
    prompt_logprobs, prompt_tokens = out["prompt_logprobs"]
    assert prompt_logprobs == prompt_tokens > 0  # one log-prob per prompt position
    assert out["delete_doc"] == {"doc_id": "budget", "deleted": True}
    assert [d["doc_id"] for d in out["after_delete"]["retrieved"]] == ["0"]
    assert out["missing"]["error"]["code"] == 404
    assert out["list"] == {"memories": [{"memory_id": "notes", "documents": 1,
                                         "tokens": out["add"]["documents"][0]["num_tokens"]}]}
