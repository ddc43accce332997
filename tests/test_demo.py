"""`make demo`'s program end to end: embedded SmolLM2 converted, msa server started, answers."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.server


def test_demo_answers_with_the_embedded_model():
    result = subprocess.run(
        [sys.executable, "-m", "sglang_msa.demo", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "models/smollm2-135m-instruct" in result.stdout
    answers = [line for line in result.stdout.splitlines() if line.startswith("A: ")]
    assert len(answers) == 2
    assert "Paris" in answers[0]  # a real model, a real answer (greedy, deterministic)
