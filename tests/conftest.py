from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))

from tiny_models import ARCHITECTURES, build_tiny_model  # noqa: E402

# SGLang's CPU engine: the Makefile sets this; set it here too so `pytest` alone works.
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per architecture (llama, qwen2, qwen3), built once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch, seed=index) for index, arch in enumerate(ARCHITECTURES)}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]
