"""`MSAForCausalLM`: SGLang's Qwen3 with the MSA router projections in the routed layers.

Weights load unchanged from the released format: every Qwen3 name, plus per routed layer
`model.layers.{i}.self_attn.router_q_proj.0.weight` [H·d, hidden] and
`...router_k_proj.0.weight` [Hkv·d, hidden]. The router projections read the attention input
(after `input_layernorm`), get no norm and no RoPE, and travel to the `msa` backend with q/k/v.

Under tensor parallelism (`--tp N`) each rank computes the router heads that match its own
attention heads (its query heads; its KV heads, replicated like K when N exceeds the KV heads),
so the backend sees router queries and keys shaped like q and k.
"""

from __future__ import annotations

from typing import Iterable

import torch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.models.qwen3 import Qwen3Attention, Qwen3ForCausalLM
from torch import nn

from sglang_msa.models.msa_config import routed_layers_of


class RoutedQwen3Attention(Qwen3Attention):
    """Qwen3 attention that also computes router queries and keys for the backend."""

    def forward(self, positions, hidden_states, forward_batch):
        q, k, v = self.forward_prepare_native(positions=positions, hidden_states=hidden_states)
        router_q = self.router_q_proj(hidden_states)
        router_k = self.router_k_proj(hidden_states)
        attn_output = self.attn(q, k, v, forward_batch, router_q=router_q, router_k=router_k)
        output, _ = self.o_proj(attn_output)
        return output


def rank_head_rows(total_heads: int, local_heads: int, head_dim: int) -> slice:
    """The rows of a full [total_heads · d, hidden] projection that this tensor-parallel rank
    computes: its `local_heads` heads, replicated over ranks when there are fewer heads than
    ranks (as SGLang's QKVParallelLinear places K and V)."""
    from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    replicas = max(1, size // total_heads)
    first = (rank // replicas) * local_heads
    return slice(first * head_dim, (first + local_heads) * head_dim)


class MSAForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        self.routed_layers = routed_layers_of(config.msa_config, config.num_hidden_layers)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.router_rows: dict[str, slice] = {}  # parameter name -> rows of the checkpoint's weight
        for layer_id in self.routed_layers:
            attention = self.model.layers[layer_id].self_attn
            attention.__class__ = RoutedQwen3Attention
            for name, total, local in (("router_q_proj", config.num_attention_heads, attention.num_heads),
                                       ("router_k_proj", config.num_key_value_heads, attention.num_kv_heads)):
                setattr(attention, name, nn.Sequential(nn.Linear(config.hidden_size, local * head_dim, bias=False)))
                self.router_rows[f"model.layers.{layer_id}.self_attn.{name}.0.weight"] = rank_head_rows(
                    total, local, head_dim)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        params = dict(self.named_parameters())
        router_params = {name for name in params if ".router_q_proj." in name or ".router_k_proj." in name}
        loaded = set()

        def backbone_weights():
            for name, tensor in weights:
                if ".router_q_proj." in name or ".router_k_proj." in name:
                    # before Qwen3's loader, whose "q_proj"/"k_proj" stacking would match these names
                    if name not in params:
                        raise ValueError(f"{name}: router weights for a layer that msa_config does not route")
                    default_weight_loader(params[name], tensor[self.router_rows[name]])
                    loaded.add(name)
                else:
                    yield name, tensor

        super().load_weights(backbone_weights())
        missing = sorted(router_params - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks router weights of routed layers: {missing[:4]}")


EntryClass = MSAForCausalLM
