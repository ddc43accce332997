"""sgl_kernel.kvcacheio in the GPU stand-in: the names SGLang 0.5.23's host KV pools import on
CUDA (hierarchical cache, not used by the GPU check); each raises naming itself when called."""

from . import unavailable

NAMES = [
    "transfer_kv_all_layer", "transfer_kv_all_layer_direct_lf_pf", "transfer_kv_all_layer_lf_pf",
    "transfer_kv_all_layer_lf_ph", "transfer_kv_all_layer_mla", "transfer_kv_all_layer_mla_lf_pf",
    "transfer_kv_direct", "transfer_kv_per_layer", "transfer_kv_per_layer_direct_pf_lf",
    "transfer_kv_per_layer_mla", "transfer_kv_per_layer_mla_pf_lf", "transfer_kv_per_layer_pf_lf",
    "transfer_kv_per_layer_ph_lf",
]
globals().update({name: unavailable(name, __name__) for name in NAMES})
