"""`MSAConfig`: the released MSA checkpoint format (Qwen3 backbone + `msa_config`), and how its
values become the plugin's options. Light module: no SGLang import.

`msa_config` keys, as the official conversion script writes them (spec §1):

- read (`SERVED_KEYS`): `router_layer_idx`, `top_k_docs`, `pooling_kernel_size`,
  `head_reduce_method`, `query_reduce_method`, `chunk_reduce_method`, and `aux_loss_method`
  (the routing similarity: cosine only when exactly "INFONCE", spec §13.1);
- checked (`FIXED_KEYS`): `decouple_router` and `decouple_pooling_mode` change inference, and
  serving implements only the released values (own router projections, mean pooling);
- ignored with a debug log (`TRAINING_ONLY_KEYS`): loss weights and switches, the InfoNCE
  temperature, and `rewrite_position` (training's doc-wise position ids; inference always uses
  document-wise positions, spec §4, §7);
- any other key is ignored with a warning.

A value that serving does not implement is refused at start-up with a ValueError naming the key.
"""

from __future__ import annotations

import logging
import typing

from transformers import Qwen3Config

from sglang_msa.config import MSAOptions

MSA_MODEL_TYPE = "msa"
MSA_ARCHITECTURE = "MSAForCausalLM"
TEMPLATE_HEAD = "<|im_start|>user\n"  # the 3-token template prefix of MSA prompts and encodings

# msa_config key -> the option it sets (the options' allowed values are the supported ones)
REDUCTION_KEYS = {"head_reduce_method": "head_reduce", "query_reduce_method": "query_reduce",
                  "chunk_reduce_method": "chunk_reduce"}
SERVED_KEYS = frozenset({"router_layer_idx", "top_k_docs", "pooling_kernel_size", "aux_loss_method",
                         *REDUCTION_KEYS})
FIXED_KEYS = {"decouple_router": True, "decouple_pooling_mode": "mean"}  # key -> the one value served
TRAINING_ONLY_KEYS = frozenset({"ansloss_weight", "lmloss_weigth", "recloss_weight", "auxloss_weight", "aux_loss",
                                "infonce_loss_temp", "rewrite_position"})

logger = logging.getLogger(__name__)


class MSAConfig(Qwen3Config):
    model_type = MSA_MODEL_TYPE

    def __init__(self, msa_config: dict | None = None, **kwargs):
        # The official decoder layer sets `config.sliding_window = False` and its resave writes that
        # into config.json: MSA layers attend in full whatever the window fields say.
        kwargs["sliding_window"] = None
        super().__init__(**kwargs)
        self.msa_config = dict(msa_config or {})
        check_msa_config(self.msa_config, self.num_hidden_layers)


def check_msa_config(msa_config: dict, num_layers: int) -> None:
    """Refuse values that serving does not implement (ValueError naming the key); log the keys it
    ignores."""
    try:
        routed = routed_layers_of(msa_config, num_layers)
    except (TypeError, ValueError):
        routed = []
    if not routed or routed[0] < 0 or routed[-1] >= num_layers or len(set(routed)) != len(routed):
        raise ValueError(f"msa_config.router_layer_idx {msa_config.get('router_layer_idx')!r} must be 'all' or "
                         f"name distinct layers of the {num_layers}-layer model ('18,19,...')")
    for key in ("top_k_docs", "pooling_kernel_size"):
        value = msa_config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"msa_config.{key} {value!r} must be a positive integer")
    for key, option in REDUCTION_KEYS.items():
        supported = typing.get_args(MSAOptions.model_fields[option].annotation)
        if key in msa_config and msa_config[key] not in supported:
            raise ValueError(f"msa_config.{key} {msa_config[key]!r} is not supported; "
                             f"sglang-msa serves {supported}")
    if not isinstance(msa_config.get("aux_loss_method", ""), str):
        raise ValueError(f"msa_config.aux_loss_method {msa_config['aux_loss_method']!r} must be a string")
    for key, served in FIXED_KEYS.items():
        if key in msa_config and msa_config[key] != served:
            raise ValueError(f"msa_config.{key} {msa_config[key]!r} is not supported; sglang-msa serves "
                             f"{key} = {served!r} (the released checkpoint's value)")
    ignored = sorted(TRAINING_ONLY_KEYS & msa_config.keys())
    if ignored:
        logger.debug("sglang-msa: msa_config keys used only in training, ignored: %s", ignored)
    unknown = sorted(msa_config.keys() - SERVED_KEYS - FIXED_KEYS.keys() - TRAINING_ONLY_KEYS)
    if unknown:
        logger.warning("sglang-msa: msa_config keys unknown to sglang-msa, ignored: %s", unknown)


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
