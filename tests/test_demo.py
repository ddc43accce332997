"""`make demo`'s program end to end: embedded SmolLM2 converted, msa server started, a demo
memory loaded through the HTTP API, questions answered with their retrieved documents."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.server


def test_demo_answers_from_its_memory():
    result = subprocess.run(
        [sys.executable, "-m", "sglang_msa.demo", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "models/smollm2-135m-instruct" in result.stdout
    assert "memory 'demo': 12 documents" in result.stdout
    answers = [line for line in result.stdout.splitlines() if line.startswith("A: ")]
    assert len(answers) == 3
    # the shipped router adapter ranks each question's own document first
    firsts = [line.split("]")[0].split("[")[1] for line in result.stdout.splitlines() if "retrieved #1: [" in line]
    assert firsts == ["soup", "ship", "festival"]
    # a real model reading the injected documents (greedy, deterministic)
    assert "paprika" in answers[0]
    assert "Elira Voss" in answers[1]
    assert "Miravelle" in answers[2]
