"""Router adapters: MSA router projections for models that were not trained with them.

An MSA checkpoint computes, in each routed layer, router queries and keys from the attention
input (after `input_layernorm`) with its own `router_q_proj` / `router_k_proj`. A model without
them (Llama, Qwen2, Qwen3 — the embedded SmolLM2) routes training-free on its pooled attention
keys, which carry little document-retrieval signal. A router adapter supplies those two
projections from a small safetensors file, fitted on the frozen model (`sglang-msa calibrate`):

    layers.{i}.router_q_proj  [query_heads · head_dim, hidden]
    layers.{i}.router_k_proj  [key_heads · head_dim, hidden]
    layers.{i}.center         [hidden]   (optional: subtracted from the input before both)

Projections may be stored as float8 (e4m3) with one float32 scale per row
(`layers.{i}.router_q_proj_scale` [rows], the same for `router_k_proj`): half the bytes of bf16.

plus JSON metadata (`sglang_msa_router_adapter`): the router geometry, the reductions it was
trained for, the model it was fitted on, and a card (data, steps, loss, held-out recall).
Router keys are then pooled per chunk and routed top-k per layer exactly as for an MSA
checkpoint; the geometry may differ from the model's KV heads. `identity` (a hash of the file's
tensors and metadata) is recorded with every persisted memory, so memories encoded with one
adapter are never routed with another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

METADATA_KEY = "sglang_msa_router_adapter"
FORMAT = "sglang-msa-router-adapter/1"
EMBEDDED = "embedded"
FP8 = torch.float8_e4m3fn
EMBEDDED_FILE = Path(__file__).resolve().parent.parent / "data" / "smollm2_router_adapter.safetensors"
REDUCTION_FIELDS = ("similarity", "head_reduce", "query_reduce", "chunk_reduce")
TENSOR_NAMES = ("router_q_proj", "router_k_proj", "center", "router_q_proj_scale", "router_k_proj_scale")


class AdapterError(ValueError):
    """A router adapter file that cannot serve this model."""


@dataclass(frozen=True)
class LayerRouter:
    q_proj: torch.Tensor  # [query_heads · head_dim, hidden]
    k_proj: torch.Tensor  # [key_heads · head_dim, hidden]
    center: torch.Tensor | None = None  # [hidden]


@dataclass(frozen=True)
class RouterAdapter:
    layers: dict[int, LayerRouter]
    query_heads: int
    key_heads: int
    head_dim: int
    hidden_size: int
    num_layers: int  # of the model it was fitted on
    reductions: dict[str, str]  # similarity, head_reduce, query_reduce, chunk_reduce
    exclude_sink: bool = True  # each document's first token is left out of its router-key pooling
    card: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.layers:
            raise AdapterError("a router adapter needs at least one layer")
        if self.query_heads % self.key_heads:
            raise AdapterError(f"query_heads {self.query_heads} is not a multiple of key_heads {self.key_heads}")
        if set(self.reductions) != set(REDUCTION_FIELDS):
            raise AdapterError(f"reductions must name exactly {REDUCTION_FIELDS}")
        for layer_id, router in self.layers.items():
            expected = {"router_q_proj": (self.query_heads * self.head_dim, self.hidden_size),
                        "router_k_proj": (self.key_heads * self.head_dim, self.hidden_size)}
            for name, tensor in (("router_q_proj", router.q_proj), ("router_k_proj", router.k_proj)):
                if tuple(tensor.shape) != expected[name]:
                    raise AdapterError(f"layers.{layer_id}.{name} has shape {tuple(tensor.shape)}, "
                                       f"expected {expected[name]}")
            if router.center is not None and tuple(router.center.shape) != (self.hidden_size,):
                raise AdapterError(f"layers.{layer_id}.center has shape {tuple(router.center.shape)}, "
                                   f"expected ({self.hidden_size},)")

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.layers)

    def metadata(self) -> dict:
        return {"format": FORMAT, "query_heads": self.query_heads, "key_heads": self.key_heads,
                "head_dim": self.head_dim, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "reductions": self.reductions, "exclude_sink": self.exclude_sink, "card": self.card}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer_id, router in self.layers.items():
            out[f"layers.{layer_id}.router_q_proj"] = router.q_proj
            out[f"layers.{layer_id}.router_k_proj"] = router.k_proj
            if router.center is not None:
                out[f"layers.{layer_id}.center"] = router.center
        return out

    @property
    def identity(self) -> str:
        """A hash of the tensors and metadata: what persisted memories record."""
        digest = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
        for name, tensor in sorted(self.tensors().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:20]

    def check_model(self, hidden_size: int, num_layers: int) -> None:
        if hidden_size != self.hidden_size or num_layers != self.num_layers:
            raise AdapterError(f"the router adapter was fitted on a model with hidden size {self.hidden_size} and "
                               f"{self.num_layers} layers; this model has {hidden_size} and {num_layers}")

    def to(self, device, dtype) -> "RouterAdapter":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        layers = {i: LayerRouter(move(r.q_proj), move(r.k_proj), move(r.center)) for i, r in self.layers.items()}
        return RouterAdapter(layers, self.query_heads, self.key_heads, self.head_dim, self.hidden_size,
                             self.num_layers, dict(self.reductions), self.exclude_sink, dict(self.card))

    def project(self, layer_id: int, hidden: torch.Tensor, which: str) -> torch.Tensor:
        """Router queries ('q', [n, query_heads, d]) or keys ('k', [n, key_heads, d]) of the
        attention input `hidden` [n, hidden] in `layer_id`."""
        router = self.layers[layer_id]
        x = hidden if router.center is None else hidden - router.center.to(hidden.dtype)
        weight = router.q_proj if which == "q" else router.k_proj
        heads = self.query_heads if which == "q" else self.key_heads
        return (x @ weight.to(hidden.dtype).T).view(hidden.shape[0], heads, self.head_dim)

    def save(self, path: str | Path, weights: str = "bf16") -> None:
        """Write the adapter; `weights` "fp8" stores the projections as float8 with per-row scales."""
        from safetensors.torch import save_file

        tensors = {}
        for name, tensor in self.tensors().items():
            tensor = tensor.detach().to("cpu", torch.float32)
            if weights == "fp8" and not name.endswith(".center"):
                scale = tensor.abs().amax(dim=1).clamp_min(1e-12) / torch.finfo(FP8).max
                tensors[name] = (tensor / scale[:, None]).to(FP8).contiguous()
                tensors[f"{name}_scale"] = scale.contiguous()
            else:
                tensors[name] = tensor.to(torch.bfloat16).contiguous()
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.metadata())})


def adapter_path(value: str) -> Path:
    """The file a `router_adapter` option names: 'embedded' is the adapter shipped for the
    embedded model."""
    path = EMBEDDED_FILE if value == EMBEDDED else Path(value).expanduser()
    if not path.is_file():
        raise AdapterError(f"router_adapter: {value!r} is not a file" if value != EMBEDDED
                           else f"router_adapter: the package lacks its embedded adapter ({path})")
    return path


def load_adapter(value: str) -> RouterAdapter:
    from safetensors import SafetensorError, safe_open

    path = adapter_path(value)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"router_adapter: {path} is not a safetensors file: {exc}") from exc
    if raw is None:
        raise AdapterError(f"router_adapter: {path} has no {METADATA_KEY!r} metadata (not a router adapter)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise AdapterError(f"router_adapter: {path} has format {meta.get('format')!r}, this version reads {FORMAT!r}")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in TENSOR_NAMES:
            raise AdapterError(f"router_adapter: unexpected tensor {name!r} in {path}")
        layers.setdefault(int(parts[1]), {})[parts[2]] = tensor
    for layer_id, named in layers.items():
        for name in ("router_q_proj", "router_k_proj"):
            scale = named.pop(f"{name}_scale", None)
            if name in named and named[name].dtype == FP8:
                if scale is None or scale.shape != named[name].shape[:1]:
                    raise AdapterError(f"router_adapter: layers.{layer_id}.{name} is float8 without a scale per row")
                named[name] = named[name].float() * scale.float()[:, None]
    routers = {}
    for layer_id, named in layers.items():
        if "router_q_proj" not in named or "router_k_proj" not in named:
            raise AdapterError(f"router_adapter: layer {layer_id} lacks router_q_proj or router_k_proj")
        routers[layer_id] = LayerRouter(named["router_q_proj"], named["router_k_proj"], named.get("center"))
    return RouterAdapter(
        layers=routers, query_heads=int(meta["query_heads"]), key_heads=int(meta["key_heads"]),
        head_dim=int(meta["head_dim"]), hidden_size=int(meta["hidden_size"]), num_layers=int(meta["num_layers"]),
        reductions=dict(meta["reductions"]), exclude_sink=bool(meta.get("exclude_sink", True)),
        card=dict(meta.get("card", {})),
    )


def options_with_adapter(options, adapter: RouterAdapter, num_layers: int):
    """`options` (an `MSAOptions`) serving `adapter`: its layers are the routed layers and its
    reductions and sink rule the defaults; options set explicitly must agree on the layers."""
    if "routed_layers" in options.model_fields_set and options.routed_layer_ids(num_layers) != adapter.layer_ids:
        raise AdapterError(f"routed_layers {options.routed_layer_ids(num_layers)} differ from the router adapter's "
                           f"layers {adapter.layer_ids}; leave routed_layers unset to use the adapter's")
    update = {"routed_layers": adapter.layer_ids}
    update.update({name: value for name, value in adapter.reductions.items() if name not in options.model_fields_set})
    if "router_exclude_sink" not in options.model_fields_set:
        update["router_exclude_sink"] = adapter.exclude_sink
    return options.model_copy(update=update)
