"""The installed stack: pinned requirements present, and the sgl_kernel CPU stand-in's contract."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

SHIM_SOURCE = Path(__file__).parents[1] / "sgl_kernel_cpushim" / "sgl_kernel" / "__init__.py"


def test_every_declared_requirement_is_installed():
    """The CPU install path uses --no-deps; this catches a requirement added to pyproject only."""
    for line in importlib.metadata.requires("sglang-msa") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "test"}):
            continue
        version = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} but {version} installed"


@pytest.fixture(scope="module")
def shim():
    spec = importlib.util.spec_from_file_location("sgl_kernel_standin_under_test", SHIM_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standin_assigns_req_to_token_rows(shim):
    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    out_cache_loc = torch.tensor([5, 6, 7, 8, 9, 10], dtype=torch.int64)
    shim.assign_req_to_token_pool_cpu(
        torch.tensor([2, 1]), req_to_token, torch.tensor([0, 3]), torch.tensor([4, 5]), out_cache_loc, 10
    )
    assert req_to_token[2, :4].tolist() == [5, 6, 7, 8]
    assert req_to_token[1, 3:5].tolist() == [9, 10]
    assert req_to_token[1, :3].tolist() == [0, 0, 0] and req_to_token[0].sum() == 0


def test_standin_other_cpu_symbols_import_but_raise(shim):
    fn = shim.verify_tree_greedy_cpu
    with pytest.raises(NotImplementedError, match="verify_tree_greedy_cpu"):
        fn()


def test_standin_unknown_symbols_are_absent(shim):
    assert not hasattr(shim, "convert_weight_packed")
    with pytest.raises(AttributeError, match="does not provide"):
        shim.fused_add_rmsnorm  # noqa: B018


def test_the_installed_sgl_kernel_is_the_standin_without_gpu():
    if torch.cuda.is_available():
        assert not hasattr(importlib.import_module("sgl_kernel"), "STANDIN")
    else:
        import sgl_kernel

        assert getattr(sgl_kernel, "STANDIN", False), f"expected the CPU stand-in, found {sgl_kernel.__file__}"
