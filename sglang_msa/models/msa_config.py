"""`MSAConfig`: the released MSA checkpoint format (Qwen3 backbone + `msa_config`), and how its
values become the plugin's options. Light module: no SGLang import."""

from __future__ import annotations

from transformers import Qwen3Config

from sglang_msa.config import MSAOptions

MSA_MODEL_TYPE = "msa"
MSA_ARCHITECTURE = "MSAForCausalLM"
TEMPLATE_HEAD = "<|im_start|>user\n"  # the 3-token template prefix of MSA prompts and encodings


class MSAConfig(Qwen3Config):
    model_type = MSA_MODEL_TYPE

    def __init__(self, msa_config: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.msa_config = dict(msa_config or {})


def routed_layers_of(msa_config: dict, num_layers: int) -> list[int]:
    """`router_layer_idx` is a comma string ("18,19,...") or "all"."""
    value = msa_config.get("router_layer_idx", "all")
    if isinstance(value, list):
        return sorted(int(v) for v in value)
    if str(value).strip() == "all":
        return list(range(num_layers))
    return sorted(int(part) for part in str(value).split(",") if part.strip())


def checkpoint_similarity(msa_config: dict) -> str:
    """The official inference engine normalises router Q/K only when aux_loss_method is exactly
    "INFONCE"; otherwise it scores <QR, K̄R> / sqrt(d) (spec §13.1)."""
    return "cosine" if msa_config.get("aux_loss_method") == "INFONCE" else "dot"


def options_for_checkpoint(options: MSAOptions, msa_config: dict, num_layers: int) -> MSAOptions:
    """The method's values come from the checkpoint; the plugin options keep the serving limits
    (and `similarity` when set explicitly)."""
    return options.model_copy(update={
        "routed_layers": routed_layers_of(msa_config, num_layers),
        "top_k_docs": int(msa_config.get("top_k_docs", 16)),
        "chunk_size": int(msa_config.get("pooling_kernel_size", 64)),
        "similarity": checkpoint_similarity(msa_config) if options.similarity == "auto" else options.similarity,
        "head_reduce": msa_config.get("head_reduce_method", "mean"),
        "query_reduce": msa_config.get("query_reduce_method", "max"),
        "chunk_reduce": msa_config.get("chunk_reduce_method", "max"),
        "memory_content": "pooled",
    })


def wrap_document(gid: int, text: str) -> str:
    """The text an MSA checkpoint encodes for document `gid` (spec §3)."""
    return f"<|im_start|>[{gid}]. {text}[{gid}]<|im_end|>"
