"""`MSAForCausalLM`: SGLang's Qwen3 with the MSA router projections in the routed layers.

Weights load unchanged from the released format: every Qwen3 name, plus per routed layer
`model.layers.{i}.self_attn.router_q_proj.0.weight` [H·d, hidden] and
`...router_k_proj.0.weight` [Hkv·d, hidden]. The router projections read the attention input
(after `input_layernorm`), get no norm and no RoPE, and travel to the `msa` backend with q/k/v.
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


class MSAForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        self.routed_layers = routed_layers_of(config.msa_config, config.num_hidden_layers)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for layer_id in self.routed_layers:
            attention = self.model.layers[layer_id].self_attn
            attention.__class__ = RoutedQwen3Attention
            attention.router_q_proj = nn.Sequential(
                nn.Linear(config.hidden_size, config.num_attention_heads * head_dim, bias=False)
            )
            attention.router_k_proj = nn.Sequential(
                nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=False)
            )

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
                    default_weight_loader(params[name], tensor)
                    loaded.add(name)
                else:
                    yield name, tensor

        super().load_weights(backbone_weights())
        missing = sorted(router_params - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks router weights of routed layers: {missing[:4]}")


EntryClass = MSAForCausalLM
