"""The wheels carried to the GPU check machine, and the checks around them (shared/docs/gpu-serving.md).

The lent GPU machine has Python 3.12, PyTorch 2.11.0+cu130 and Triton 3.6, no network, and takes at
most 64 MiB of files per command. `benchmarks/gpu_serve_check.sh` serves SGLang 0.5.23 there from:
SGLang's cp312 wheel and its missing import-time requirements (ci/gpu-carry-requirements.txt), a
wheel of this project (for its `sglang.srt.plugins` entry point; the code itself is imported from
the repository), and the sgl_kernel GPU stand-in (sgl_kernel_gpushim/, on PYTHONPATH).

    python benchmarks/gpu_carry.py prepare     # here, with network: fill .whl/ (cached download)
    python3 benchmarks/gpu_carry.py install    # there, by gpu_serve_check.sh: offline, --no-deps
    python3 benchmarks/gpu_carry.py preflight  # there, by gpu_serve_check.sh: imports on the GPU

tests/test_gpu_carry.py checks the set on CPU CI: the cp312 wheels exist and fit, their declared
requirements are met by the image and the set, and the server modules import in an emulation of
the machine's Python (tests/gpu_image_emulation.py).
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "ci" / "gpu-carry-requirements.txt"
IMAGE_PACKAGES = REPO / "ci" / "gpu-image-packages.txt"
CARRY_DIR = REPO / ".whl"
CACHE_DIR = Path(os.environ.get("SGLANG_MSA_GPU_CARRY_CACHE",
                               "~/.cache/sglang-msa/gpu-carry-wheels")).expanduser()
CARRY_LIMIT_BYTES = 64 * 2**20  # what one device call takes: working tree + carried paths
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (34, 28, 27, 26, 24, 17)] + ["manylinux2014_x86_64",
                                                                             "manylinux1_x86_64"]
# The machine's Python, for evaluating requirement markers.
TARGET_ENVIRONMENT = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "implementation_version": "3.12.3", "os_name": "posix",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": "",
}

# Declared requirements of carried wheels that are neither in the image nor carried, and why the
# server runs without them there: SGLang's CUDA, JIT and FlashInfer paths are switched off (see
# SWITCHES), and the rest are not imported by the server (tests/test_gpu_carry.py imports it with
# them hidden).
NOT_CARRIED = {
    "sglang": {
        "sglang-kernel": "ABI-bound to torch 2.14.1; replaced by sgl_kernel_gpushim",
        "flashinfer-python": "FlashInfer attention / sampling unused (SGLANG_IS_FLASHINFER_AVAILABLE=false)",
        "flash-attn-4": "CUDA attention kernels, not used by msa / torch_native",
        "sgl-flash-mla": "MLA models only", "sgl-deep-ep": "MoE expert parallelism only",
        "sgl-deep-gemm": "fp8 GEMM (DeepSeek) only", "humming-kernels": "quantized kernels only",
        "quack-kernels": "CuTe kernels, not on this path", "nvidia-cutlass-dsl": "CuTe DSL kernels only",
        "nvidia-mathdx": "cuFFTDx / MathDx JIT only", "nvshmem4py-cu13": "multi-GPU only",
        "tilelang": "TileLang kernels only", "torch-memory-saver": "--enable-memory-saver only",
        "cuda-python": "optional; the image's cuda-bindings cover SGLang's imports",
        "torchcodec": "multimodal only", "anthropic": "Anthropic-compatible API only (lazily imported)",
        "blobfile": "remote model paths only", "datasets": "benchmarks only",
        "deepseek-recipe": "DeepSeek only",
        "easydict": "multimodal only", "interegular": "outlines grammar only",
        "kernels": "HF kernels hub only", "llguidance": "llguidance grammar backend only",
        "mistral-common": "Mistral tokenizers only (import caught)", "modelscope": "ModelScope hub only",
        "openai-harmony": "gpt-oss only (import caught)", "outlines": "outlines grammar backend only",
        "py-spy": "profiling only", "smg-grpc-servicer": "gRPC server only", "tml-renderers": "TML chat only",
        "watchfiles": "reload on change only", "zstandard": "compressed checkpoints only (import caught)",
    },
    "ipython": {name: "interactive shell only; SGLang imports IPython.display"
                for name in ["ipython-pygments-lexers", "jedi", "matplotlib-inline", "pexpect",
                             "prompt-toolkit", "stack-data"]},
    "cffi": {"pycparser": "compiling cdefs only; soundfile's bindings are precompiled"},
}
# SGLang pins these at other versions than the image's; the image's are used (--no-deps).
IMAGE_VERSION_ACCEPTED = {"torch", "transformers", "sentencepiece"}

# The switches that keep SGLang 0.5.23 off its CUDA kernels, JIT compiles, FlashInfer and Rust
# radix core on the machine (each explained in shared/docs/gpu-serving.md §1).
SWITCHES = {
    "SGLANG_USE_CPU_ENGINE": "0",
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
    "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
    "SGLANG_CRASH_ON_JIT_COMPILE": "1",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
    "SGLANG_IS_FLASHINFER_AVAILABLE": "false",
    "SGLANG_MSA_GPU_STANDIN": "1",
}

# What the server needs to import on CUDA (launcher, HTTP server, tokenizer / detokenizer,
# scheduler, model runner, CUDA memory pools, the models and backends used, the frontend DSL, the
# plugin) and what the GPU check's drivers import.
SERVER_MODULES = [
    "sglang.cli.main", "sglang.launch_server", "sglang.srt.entrypoints.http_server",
    "sglang.srt.entrypoints.engine", "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager", "sglang.srt.managers.scheduler",
    "sglang.srt.model_executor.model_runner", "sglang.srt.mem_cache.memory_pool",
    "sglang.srt.mem_cache.memory_pool_host", "sglang.srt.layers.sampler", "sglang.srt.layers.layernorm",
    "sglang.srt.layers.activation", "sglang.srt.layers.quantization", "sglang.srt.models.llama",
    "sglang.srt.models.qwen2", "sglang.srt.models.qwen3", "sglang.srt.layers.attention.torch_native_backend",
    "sglang.srt.layers.attention.triton_backend", "sglang.lang.backend.runtime_endpoint",
    "sglang_msa.plugin", "sglang_msa.attention_backend.backend", "sglang_msa.models.msa",
    "sglang_msa.server.routes", "sglang_msa.frontend", "sglang_msa.engine_memories",
    "sglang_msa.server_process", "sglang_msa.memory_manager.service", "sglang_msa.memory_manager.tiers",
    "sglang_msa.kernels.routing_scan", "sglang_msa.kernels.indexed_attention", "sglang_msa.kernels.pooling",
]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str | None]:
    """`name==version` (or bare `name`) per line, comments dropped; names normalized."""
    pins: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if normalize(name) in pins:
            raise ValueError(f"{path.name}: {name} listed twice")
        pins[normalize(name)] = version.strip() or None
    return pins


def carried() -> dict[str, str]:
    pins = read_pins(REQUIREMENTS)
    unpinned = [name for name, version in pins.items() if version is None]
    if unpinned:
        raise ValueError(f"{REQUIREMENTS.name}: not pinned to one version: {unpinned}")
    return pins


def image_packages() -> dict[str, str | None]:
    return read_pins(IMAGE_PACKAGES)


def wheel_of(directory: Path, name: str, version: str) -> Path | None:
    """The wheel of `name==version` in `directory`, if there is one (stdlib only: this also runs
    on the GPU machine before anything is installed)."""
    for path in sorted(directory.glob("*.whl")):
        wheel_name, wheel_version = path.name.split("-")[:2]
        if normalize(wheel_name) == name and wheel_version == version:
            return path
    return None


def download(directory: Path = CACHE_DIR, python: str = sys.executable) -> dict[str, Path]:
    """The carried wheels, downloaded for cp312 / manylinux x86_64 with pip into `directory`
    (what is there already is kept: pip is only run for what is missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    pins = carried()
    missing = [f"{name}=={version}" for name, version in pins.items()
               if wheel_of(directory, name, version) is None]
    if missing:
        command = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                   "--abi", "cp312", "--abi", "abi3", "--abi", "none",
                   *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
                   "--dest", str(directory), *missing]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download of the carried wheels failed:\n{result.stderr[-3000:]}")
    wheels = {name: wheel_of(directory, name, version) for name, version in pins.items()}
    absent = [name for name, path in wheels.items() if path is None]
    if absent:
        raise RuntimeError(f"pip download left no wheel for {absent} in {directory}")
    return wheels


def supported_tags() -> set:
    from packaging import tags

    return set(tags.cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=PLATFORMS)) | set(
        tags.compatible_tags((3, 12), "cp312", platforms=PLATFORMS))


def wheel_requirements(path: Path) -> list:
    """The wheel's Requires-Dist that apply on the machine's Python (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as archive:
        metadata_name = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(TARGET_ENVIRONMENT)]


def check_wheels(wheels: dict[str, Path]) -> dict:
    """Problems with the carried set, and what could not be checked (image versions not known)."""
    from packaging.utils import parse_wheel_filename

    pins, image, tags = carried(), image_packages(), supported_tags()
    problems, unchecked = [], []
    for name, path in wheels.items():
        if not set(parse_wheel_filename(path.name)[3]) & tags:
            problems.append(f"{path.name}: no tag for CPython 3.12 on manylinux x86_64")
        for requirement in wheel_requirements(path):
            needed = normalize(requirement.name)
            if needed in pins:
                have, where = pins[needed], "carried"
            elif needed in image:
                have, where = image[needed], "image"
            elif needed in NOT_CARRIED.get(name, {}):
                continue
            else:
                problems.append(f"{name} needs {requirement}: neither in the image nor carried")
                continue
            if have is None:
                unchecked.append(f"{name}: {requirement} (image version unknown)")
            elif not requirement.specifier.contains(have, prereleases=True):
                if name == "sglang" and where == "image" and needed in IMAGE_VERSION_ACCEPTED:
                    continue
                problems.append(f"{name} needs {requirement}, {where} has {have}")
    overlap = sorted(set(pins) & set(image))
    return {"problems": problems, "unchecked": unchecked, "also_in_image": overlap,
            "bytes": sum(path.stat().st_size for path in wheels.values())}


def tracked_bytes() -> int:
    """The size of the working tree that travels with a device call (tracked files)."""
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    files = listing.stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def build_project_wheel(directory: Path) -> Path:
    """sglang_msa-<version>-py3-none-any.whl: installed there with --no-deps for its entry point."""
    for old in directory.glob("sglang_msa-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--no-build-isolation", "--wheel-dir", str(directory), str(REPO)],
                   check=True)
    (wheel,) = directory.glob("sglang_msa-*.whl")
    shutil.rmtree(REPO / "build", ignore_errors=True)
    return wheel


def prepare() -> int:
    """Fill .whl/ with exactly the carried wheels and the project's wheel; report the carry size."""
    wheels = download()
    report = check_wheels(wheels)
    for problem in report["problems"]:
        print("PROBLEM:", problem)
    CARRY_DIR.mkdir(exist_ok=True)
    keep = {path.name for path in wheels.values()}
    for stale in CARRY_DIR.glob("*.whl"):
        if stale.name not in keep:
            stale.unlink()
    for path in wheels.values():
        if not (CARRY_DIR / path.name).exists():
            shutil.copy2(path, CARRY_DIR / path.name)
    project = build_project_wheel(CARRY_DIR)
    total = report["bytes"] + project.stat().st_size + tracked_bytes()
    print(f"{len(wheels)} carried wheels ({report['bytes'] / 1e6:.1f} MB) + {project.name} in {CARRY_DIR}; "
          f"with the tracked tree {total / 2**20:.1f} MiB of the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB "
          "a call carries")
    if total > CARRY_LIMIT_BYTES:
        print("PROBLEM: over the carry limit")
        return 1
    return 1 if report["problems"] else 0


def install(directory: Path = CARRY_DIR) -> int:
    """On the GPU machine: install the carried wheels and the project's wheel offline (--no-deps)
    into this Python, unless they are installed already. Exit 3 naming what is missing or failed."""
    import sysconfig

    pins = carried()
    wheels = {name: wheel_of(directory, name, version) for name, version in pins.items()}
    project = sorted(directory.glob("sglang_msa-*.whl"))
    installed = all(_installed_version(name) == version for name, version in pins.items())
    if installed and _installed_version("sglang-msa"):
        print(f"carried distributions already installed for {sys.executable}")
        return 0
    missing = [f"{name}=={pins[name]}" for name, path in wheels.items() if path is None]
    if missing or len(project) != 1:
        lacking = missing + (["the project wheel sglang_msa-*.whl"] if len(project) != 1 else [])
        print(f"INSTALL FAILED: {directory} lacks {lacking}; run `python benchmarks/gpu_carry.py prepare` "
              "on a machine with network and carry .whl", file=sys.stderr)
        return 3
    site = sysconfig.get_paths()["purelib"]
    if not os.access(site, os.W_OK):
        print(f"INSTALL FAILED: {site} is not writable for this user; install there as its owner",
              file=sys.stderr)
        return 3
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
               "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", *map(str, wheels.values()),
               str(project[0])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"INSTALL FAILED: pip exited {result.returncode}:\n{result.stdout[-2000:]}"
              f"{result.stderr[-4000:]}", file=sys.stderr)
        return 3
    print(f"installed {len(wheels)} carried wheels and {project[0].name} into {site}")
    return 0


def preflight(out: Path | None) -> int:
    """On the GPU machine, after installing: CUDA is there, the switches are set, the stand-in is
    the sgl_kernel that loads, SGLang took its CUDA branches, every server module imports, the
    plugin is registered by entry point and from this repository. Exit 4 naming what failed."""
    import importlib
    import importlib.metadata

    report: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    failures = []
    for variable, value in SWITCHES.items():
        if os.environ.get(variable) != value:
            failures.append(f"{variable}={os.environ.get(variable)!r}, expected {value!r}")
    import torch

    report["torch"], report["cuda"] = torch.__version__, torch.version.cuda
    if not torch.cuda.is_available():
        failures.append("torch.cuda.is_available() is False: no GPU for this Python")
    else:
        report["device"] = torch.cuda.get_device_name()
        report["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32  # the float32 parity needs it off
        try:
            report["cuda_add"] = float((torch.ones(1, device="cuda") + 1).item())
        except Exception as error:  # noqa: BLE001
            failures.append(f"a CUDA tensor op failed: {type(error).__name__}: {error}")
    for dist in ["torch", "triton", "transformers", "numpy", "pydantic", "typing-extensions", "anyio",
                 "sglang", "sglang-msa", "tokenizers", "safetensors", "setuptools", "pytest", "pytest-xdist"]:
        try:
            report.setdefault("versions", {})[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            report.setdefault("versions", {})[dist] = None
    expected = carried()
    wrong = {name: (version, report.get("versions", {}).get(name)) for name, version in expected.items()
             if _installed_version(name) != version}
    if wrong:
        failures.append(f"carried distributions not installed at their pins (pin, installed): {wrong}")
    if not failures:
        import sgl_kernel

        if getattr(sgl_kernel, "STANDIN_KIND", None) != "gpu":
            failures.append(f"sgl_kernel from {sgl_kernel.__file__} is not the GPU stand-in")
        for module in SERVER_MODULES:
            try:
                importlib.import_module(module)
            except Exception as error:  # noqa: BLE001 - each failure is reported with its module
                failures.append(f"import {module}: {type(error).__name__}: {error}")
        import sglang_msa

        if not Path(sglang_msa.__file__).resolve().is_relative_to(REPO):
            failures.append(f"sglang_msa imported from {sglang_msa.__file__}, not from {REPO} (PYTHONPATH)")
        plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")}
        if plugins.get("msa") != "sglang_msa.plugin:register":
            failures.append(f"entry point sglang.srt.plugins:msa missing ({plugins})")
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.utils import is_cuda

        from sglang_msa.plugin import register

        register()  # SGLang's plugin loader swallows exceptions; called directly they surface here
        if "msa" not in ATTENTION_BACKENDS:
            failures.append("sglang_msa.plugin.register() did not register the msa attention backend")

        layernorm = sys.modules.get("sglang.srt.layers.layernorm")
        if not is_cuda() or getattr(layernorm, "rmsnorm", None) is not sgl_kernel.rmsnorm:
            failures.append("SGLang did not take its CUDA import branch (is_cuda(), or layernorm's names "
                            "are not the stand-in's)")
    report["failures"] = failures
    text = json.dumps(report, indent=1)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    for failure in failures:
        print("PREFLIGHT FAILED:", failure, file=sys.stderr)
    return 4 if failures else 0


def _installed_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def reap(marker: str) -> int:
    """Kill the process groups of the servers a step left behind (a timeout that outran the tests'
    teardown): processes whose command line contains `marker` (a path only this check uses)."""
    import signal

    import psutil

    groups = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid != os.getpid() and any(marker in part for part in process.info["cmdline"] or []):
            try:
                groups.add(os.getpgid(process.pid))
            except ProcessLookupError:
                continue
    groups.discard(os.getpgid(0))
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if groups:
        print(f"killed {len(groups)} leftover server process group(s) started with {marker}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="download the carried wheels (cached) into .whl/, build the project wheel")
    flight = sub.add_parser("preflight", help="on the GPU machine: the imports and switches, before serving")
    flight.add_argument("--out", type=Path, help="also write the report (JSON) there")
    sub.add_parser("check", help="download (cached) and check the carried set without filling .whl/")
    sub.add_parser("install", help="on the GPU machine: install .whl/ offline into this Python")
    sub.add_parser("env", help="print the serving switches as shell exports")
    reaper = sub.add_parser("reap", help="kill leftover servers whose command line contains MARKER")
    reaper.add_argument("marker")
    args = parser.parse_args()
    if args.command == "prepare":
        return prepare()
    if args.command == "install":
        return install()
    if args.command == "reap":
        return reap(args.marker)
    if args.command == "env":
        print("\n".join(f"export {name}={value}" for name, value in SWITCHES.items()))
        return 0
    if args.command == "preflight":
        return preflight(args.out)
    report = check_wheels(download())
    print(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
