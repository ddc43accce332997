"""Import SGLang's server modules as the GPU check machine's Python would (run by test_gpu_carry.py).

    python tests/gpu_image_emulation.py REPORT.json [--hide DIST ...]

Emulates, in this CPU environment, what benchmarks/gpu_serve_check.sh does there:
- only the image's distributions (ci/gpu-image-packages.txt), the carried ones
  (ci/gpu-carry-requirements.txt) and sglang-msa exist: every other installed distribution is
  hidden, both its modules (each meta-path finder returns no spec for them, as for a package that
  is not installed; transformers probes optional packages with find_spec) and its metadata
  (importlib.metadata, entry points); `--hide` hides more, for the test's negative control;
- the sgl_kernel GPU stand-in is first on sys.path (the CPU stand-in installed here is hidden);
- torch reports one H100 (compute capability 9.0), so SGLang takes its CUDA import branches;
- the switches of benchmarks/gpu_carry.SWITCHES are set.
Then imports gpu_carry.SERVER_MODULES and the GPU check's test helpers and drivers, registers the
plugin, and writes a JSON report: failures, distributions loaded, hidden names asked for.

Not emulated: Python 3.12 and the image's versions (cp311 builds and this environment's versions
run; the carried distributions are at their pinned versions, test_gpu_carry.py sees to that).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import site
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "sgl_kernel_gpushim"), str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

import gpu_carry  # noqa: E402

SITE_DIRS = [str(Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]]


def allowed_distributions(extra_hidden: set[str]) -> set[str]:
    allowed = set(gpu_carry.image_packages()) | set(gpu_carry.carried()) | {"sglang-msa"}
    return allowed - {gpu_carry.normalize(name) for name in extra_hidden}


def in_site_packages(spec) -> bool:
    locations = list(spec.submodule_search_locations or []) or [spec.origin or ""]
    return any(str(Path(loc).resolve()).startswith(tuple(SITE_DIRS)) for loc in locations if loc)


class Hiding:
    """Wraps a meta-path finder: no spec for a hidden top-level module found in site-packages, and
    no metadata for a hidden distribution."""

    def __init__(self, finder, hidden_modules: set[str], allowed: set[str], asked: set[str]):
        self.finder, self.hidden_modules, self.allowed, self.asked = finder, hidden_modules, allowed, asked

    def find_spec(self, fullname, path=None, target=None):
        find = getattr(self.finder, "find_spec", None)
        spec = find(fullname, path, target) if find else None
        top = fullname.partition(".")[0]
        if spec is not None and top in self.hidden_modules and in_site_packages(spec):
            self.asked.add(top)
            return None
        return spec

    def find_distributions(self, context=None):
        find = getattr(self.finder, "find_distributions", None)
        context = context or importlib.metadata.DistributionFinder.Context()
        for dist in find(context) if find else []:
            if dist_name(dist) in self.allowed:
                yield dist

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()

    def __getattr__(self, name):
        return getattr(self.finder, name)


_names: dict[str, str] = {}


def dist_name(dist) -> str:
    """The normalized name of a distribution, its metadata read once per location (transformers
    asks for package versions many times while it imports)."""
    key = str(getattr(dist, "_path", id(dist)))
    if key not in _names:
        _names[key] = gpu_carry.normalize(dist.metadata["Name"] or "")
    return _names[key]


def hide(extra_hidden: set[str]) -> tuple[set[str], set[str], set[str]]:
    allowed = allowed_distributions(extra_hidden)
    hidden_modules = set()
    for module, dists in importlib.metadata.packages_distributions().items():
        if not any(gpu_carry.normalize(dist) in allowed for dist in dists):
            hidden_modules.add(module)
    asked: set[str] = set()
    sys.meta_path[:] = [Hiding(finder, hidden_modules, allowed, asked) for finder in sys.meta_path]
    importlib.invalidate_caches()
    return allowed, hidden_modules, asked


def simulate_h100() -> None:
    import torch

    class Properties:
        name, major, minor, total_memory = "NVIDIA H100 80GB HBM3", 9, 0, 80 * 2**30
        multi_processor_count, L2_cache_size, gcnArchName, uuid = 132, 50 * 2**20, "", "emulated"

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_name = lambda device=None: Properties.name
    torch.cuda.get_device_properties = lambda device=None: Properties()


def loaded_distributions() -> dict[str, str]:
    """The distribution of every loaded module that lives in site-packages (by its files)."""
    owner = {}
    for dist in importlib.metadata.distributions():
        root = Path(dist.locate_file("")).resolve()
        for file in dist.files or []:
            if file.suffix in (".py", ".so", ".pyd"):
                owner[str((root / file).resolve())] = dist_name(dist)
    found = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and str(Path(path).resolve()).startswith(tuple(SITE_DIRS)):
            found.setdefault(owner.get(str(Path(path).resolve()), "?unowned"), name)
    return found


def main() -> int:
    report_path = Path(sys.argv[1])
    extra_hidden = set(sys.argv[sys.argv.index("--hide") + 1:]) if "--hide" in sys.argv else set()
    os.environ.update(gpu_carry.SWITCHES)
    allowed, hidden_modules, asked = hide(extra_hidden)
    simulate_h100()
    failures = []
    for module in gpu_carry.SERVER_MODULES + ["msa_checkpoints", "tiny_models", "test_msa_checkpoint_parity",
                                               "gpu_serve_bench", "pytest", "pytest_timeout"]:
        try:
            importlib.import_module(module)
        except BaseException as error:  # noqa: BLE001 - reported per module
            failures.append(f"import {module}: {type(error).__name__}: {error}")
            if extra_hidden:  # the negative control needs the first failure only
                break
    facts = {}
    if not failures:
        import sgl_kernel
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.utils import is_cuda

        from sglang_msa.plugin import register

        register()
        layernorm = sys.modules["sglang.srt.layers.layernorm"]
        sampler = sys.modules["sglang.srt.layers.sampler"]
        facts = {
            "sgl_kernel": sgl_kernel.__file__, "standin_kind": getattr(sgl_kernel, "STANDIN_KIND", None),
            "is_cuda": is_cuda(),
            "layernorm_uses_standin": getattr(layernorm, "rmsnorm", None) is sgl_kernel.rmsnorm,
            "sampler_uses_standin": getattr(sampler, "top_k_renorm_prob", None)
            is sgl_kernel.top_k_renorm_prob,
            "msa_backend_registered": "msa" in ATTENTION_BACKENDS,
            "entry_points": sorted(f"{ep.name}={ep.value}" for ep in importlib.metadata.entry_points(
                group="sglang.srt.plugins")),
            "hidden_dist_visible": [d for d in ("sgl-kernel-cpushim", "zstandard", "mistral-common")
                                    if d in {dist_name(x) for x in importlib.metadata.distributions()}],
        }
    report = {"failures": failures, "facts": facts, "loaded": loaded_distributions(),
              "allowed": sorted(allowed), "hidden_asked": sorted(asked),
              "hidden_modules": len(hidden_modules), "python": sys.version.split()[0]}
    report_path.write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
