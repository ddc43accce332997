"""The wheel set carried to the GPU check machine (ci/gpu-carry-requirements.txt) and the imports
of the server there, checked on CPU CI (benchmarks/gpu_carry.py, shared/docs/gpu-serving.md).

What is checked, precisely:
- the carried wheels exist on PyPI for CPython 3.12 on manylinux x86_64, one pinned version each
  (downloaded with pip, cached in ~/.cache/sglang-msa/gpu-carry-wheels; ~52 MB the first time),
  and with the project's wheel and the tracked tree they fit in the 64 MiB a device call carries;
- every requirement those wheels declare for Python 3.12 on Linux is met by the image
  (ci/gpu-image-packages.txt: by name, and by version where the image's version is known) or by
  the carried set, except the ones benchmarks/gpu_carry.NOT_CARRIED lists with a reason (every
  one of which is a real requirement);
- in an emulation of the machine's Python (tests/gpu_image_emulation.py: every distribution that
  is neither the image's nor carried hidden, the carried ones at their pinned versions, the GPU
  stand-in as sgl_kernel, torch reporting an H100, the serving switches set) SGLang's server
  modules, the plugin, the GPU check's test helpers and drivers import, SGLang takes its CUDA
  branches into the stand-in, and nothing hidden is loaded; hiding one carried distribution
  (pydantic) makes the imports fail naming it.
Not checked here: Python 3.12 itself and the image's own versions (this environment's cp311
builds and versions stand in for them), and anything that needs the GPU (gpu_serve_check.sh).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_carry  # noqa: E402


@pytest.fixture(scope="module")
def wheels():
    return gpu_carry.download()


def test_carried_wheels_are_for_cpython_312_and_fit_one_call(wheels):
    pins = gpu_carry.carried()
    assert "sglang" in pins and pins["sglang"] == "0.5.23"
    assert set(wheels) == set(pins) and all(path.is_file() for path in wheels.values())
    report = gpu_carry.check_wheels(wheels)
    assert report["problems"] == []
    assert report["also_in_image"] == ["typing-extensions"]  # carried for its version: pydantic needs >= 4.16
    # sglang_msa-*.whl: ~0.3 MB of code, and its package data (the embedded router adapter) as it is
    package_data = sum(path.stat().st_size for path in (REPO / "sglang_msa" / "data").iterdir())
    project_wheel_allowance = 2**20 + package_data
    total = report["bytes"] + gpu_carry.tracked_bytes() + project_wheel_allowance
    assert total <= gpu_carry.CARRY_LIMIT_BYTES - 4 * 2**20, f"{total / 2**20:.1f} MiB"


def test_every_not_carried_requirement_is_a_real_one(wheels):
    declared = {name: {gpu_carry.normalize(r.name) for r in gpu_carry.wheel_requirements(path)}
                for name, path in wheels.items()}
    for requirer, names in gpu_carry.NOT_CARRIED.items():
        stale = set(names) - declared[requirer]
        assert not stale, f"{requirer} does not require {stale}: drop them from NOT_CARRIED"
        image = gpu_carry.image_packages()
        assert not set(names) & (set(image) | set(gpu_carry.carried()))
    sglang_needs = {gpu_carry.normalize(r.name): r for r in gpu_carry.wheel_requirements(wheels["sglang"])}
    for name in gpu_carry.IMAGE_VERSION_ACCEPTED:  # each one a real conflict, not a stale exception
        image_version = gpu_carry.image_packages()[name]
        assert image_version and not sglang_needs[name].specifier.contains(image_version), name


def test_the_checker_finds_a_missing_requirement(wheels, monkeypatch):
    """Drop a carried distribution from the set: the wheels that need it are named."""
    pins = gpu_carry.carried()
    del pins["pydantic-core"]
    monkeypatch.setattr(gpu_carry, "carried", lambda: pins)
    report = gpu_carry.check_wheels({k: v for k, v in wheels.items() if k != "pydantic-core"})
    assert any(p.startswith("pydantic needs pydantic-core==2.50.5") for p in report["problems"]), report


@pytest.fixture(scope="module")
def carried_versions_path(tmp_path_factory):
    """A directory with the carried distributions whose pinned version this environment lacks
    (this environment's build of that version), put before site-packages; None when all match."""
    pins = gpu_carry.carried()
    missing = {}
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            missing[name] = version
    if not missing:
        return None
    target = tmp_path_factory.mktemp("carried-versions")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--only-binary=:all:", "--target", str(target),
                    *[f"{n}=={v}" for n, v in missing.items()]], check=True)
    return target


def emulate(tmp_path, carried_versions_path, *hide: str) -> tuple[int, dict, str]:
    report_path = tmp_path / f"emulation-{'-'.join(hide) or 'all'}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if carried_versions_path is not None:
        env["PYTHONPATH"] = str(carried_versions_path)
    command = [sys.executable, str(REPO / "tests" / "gpu_image_emulation.py"), str(report_path)]
    result = subprocess.run(command + (["--hide", *hide] if hide else []), capture_output=True, text=True,
                            timeout=600, env=env)
    assert report_path.is_file(), f"exit {result.returncode} without a report:\n{result.stderr[-3000:]}"
    return result.returncode, json.loads(report_path.read_text()), result.stderr


def test_server_modules_import_in_an_emulation_of_the_gpu_machine(tmp_path, carried_versions_path):
    code, report, stderr = emulate(tmp_path, carried_versions_path)
    assert report["failures"] == [] and code == 0, (report["failures"], stderr[-3000:])
    facts = report["facts"]
    assert facts["standin_kind"] == "gpu" and facts["sgl_kernel"].startswith(str(REPO / "sgl_kernel_gpushim"))
    assert facts["is_cuda"] and facts["layernorm_uses_standin"] and facts["sampler_uses_standin"]
    assert facts["msa_backend_registered"] and facts["entry_points"] == ["msa=sglang_msa.plugin:register"]
    assert facts["hidden_dist_visible"] == []
    loaded, allowed = set(report["loaded"]), set(report["allowed"])
    assert loaded <= allowed, loaded - allowed
    assert {"sglang", "pydantic", "fastapi", "uvicorn", "pyzmq", "torch", "transformers"} <= loaded
    assert "sgl-kernel-cpushim" not in loaded
    # distributions installed here that SGLang tries and the machine lacks: they were hidden, not loaded
    assert {"zstandard", "mistral_common"} <= set(report["hidden_asked"]), report["hidden_asked"]
    assert set(gpu_carry.carried()) - loaded == {"jiter"}  # all imported but the insurance (openai's need)


def test_the_emulation_fails_loudly_without_a_carried_distribution(tmp_path, carried_versions_path):
    code, report, _ = emulate(tmp_path, carried_versions_path, "pydantic")
    assert code == 1 and report["failures"]
    failures = report["failures"]
    assert len(failures) == 1 and "No module named 'pydantic'" in failures[0], failures
