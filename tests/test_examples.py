"""Every example in examples/ runs against the msa server (a tiny model: mechanics, not quality),
and the DSL endpoint really binds its requests to a memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sglang_msa.server_process import start_server

pytestmark = pytest.mark.server
EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def server_url(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("examples") / "server.log"
    with start_server(tiny_llama, "msa", extra_args=["--max-total-tokens", "8192", "--log-level", "warning"],
                      log_path=log) as server:
        yield server.base_url


@pytest.mark.parametrize("example,expected", [
    ("quickstart.py", ["answer:", "retrieved: ["]),
    ("multi_tenant.py", ["tenant-red:", "tenant-blue:"]),
    ("openai_client.py", ["answer:", "retrieved:", "streamed:"]),
    ("multi_hop.py", ["rounds=[[", "answer:"]),
    ("dsl_program.py", ["retrieved: [", "answer:", "over memory: ["]),
    ("load_notes.py", ["stored 5 documents", "Q: Who is on call this week?", "documents used", "metrics: off"]),
])
def test_example_runs(server_url, example, expected):
    result = subprocess.run([sys.executable, str(EXAMPLES / example), "--url", server_url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in expected:
        assert text in result.stdout, result.stdout


def test_memory_endpoint_requests_carry_the_memory(server_url):
    import sglang as sgl

    from sglang_msa.frontend import MemoryEndpoint

    @sgl.function
    def program(s):
        s += "Hello" + sgl.gen("answer", max_tokens=2, temperature=0)

    state = program.run(backend=MemoryEndpoint(server_url, "no-such-memory"))
    # the scheduler refused it: the request named the memory
    assert "memory 'no-such-memory' does not exist" in str(state.error())
