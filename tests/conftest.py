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


@pytest.fixture(scope="session")
def _server_args_of_the_session(request, tiny_llama) -> dict[str, dict]:
    """The SERVER_ARGS_CASES of every collected module, resolved in one fresh interpreter
    (server_args_runner.py); "{tiny_llama}" in a case's args is the tiny llama checkpoint."""
    from server_args_runner import resolve_all

    modules = {getattr(item, "module", None) for item in request.session.items} - {None}
    cases = {}
    for module in modules:
        for name, case in getattr(module, "SERVER_ARGS_CASES", {}).items():
            args = [str(tiny_llama) if arg == "{tiny_llama}" else arg for arg in case["args"]]
            cases[f"{module.__name__}::{name}"] = {**case, "args": args}
    results = resolve_all(cases) if cases else {}
    by_module: dict[str, dict] = {}
    for key, result in results.items():
        module_name, name = key.split("::", 1)
        by_module.setdefault(module_name, {})[name] = result
    return by_module


@pytest.fixture
def server_args(request, _server_args_of_the_session) -> dict[str, dict]:
    """This module's SERVER_ARGS_CASES resolved: {name: outputs, or {"error": traceback}}."""
    return _server_args_of_the_session[request.module.__name__]
