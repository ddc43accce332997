"""Tiny MSA-format checkpoints (Qwen3 backbone + router projections + msa_config), built by the
tests, and an independent pure-torch forward of the MSA method over their weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sglang_msa.config import MSAOptions
from sglang_msa.kernels import reference as ref
from sglang_msa.models.msa_config import options_for_checkpoint, routed_layers_of
from tiny_models import build_tiny_model

NUM_LAYERS = 4


MSA_MARKERS = ("<|object_ref_end|>", "<End-of-Retrieve>")  # special tokens of the MSA tokenizer (spec §10)


def released_msa_config(aux_loss_method: str = "INFONCE_DECOUPLE") -> dict:
    """Every msa_config key the official resave writes (spec §1), with the released values except
    the tiny model's layers, top-k and chunk size."""
    return {
        "router_layer_idx": "2,3", "top_k_docs": 2, "pooling_kernel_size": 4, "decouple_router": True,
        "head_reduce_method": "mean", "query_reduce_method": "max", "chunk_reduce_method": "max",
        "decouple_pooling_mode": "mean", "aux_loss_method": aux_loss_method, "infonce_loss_temp": 0.1,
        "aux_loss": False, "rewrite_position": True,
        "lmloss_weigth": 1.0, "auxloss_weight": 0.1, "recloss_weight": 0.0, "ansloss_weight": 1.0,
    }


def build_tiny_msa_checkpoint(out_dir: Path, aux_loss_method: str = "INFONCE_DECOUPLE", seed: int = 0) -> Path:
    """A 4-layer Qwen3 with layers 2 and 3 routed, top-2 documents, 4-token chunks; its config.json
    is shaped like a released one (the official decoder layer's `sliding_window: false`), and its
    tokenizer has a "\\n\\n" token, as Qwen's has."""
    out_dir = Path(out_dir)
    build_tiny_model("qwen3", out_dir, seed=seed, num_layers=NUM_LAYERS, extra_special_tokens=MSA_MARKERS,
                     qwen_newlines=True)
    config = json.loads((out_dir / "config.json").read_text())
    config.update(
        model_type="msa",
        architectures=["MSAForCausalLM"],
        sliding_window=False,
        use_sliding_window=False,
        max_window_layers=28,
        msa_config=released_msa_config(aux_loss_method),
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(out_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed + 100)
    hidden, heads, kv_heads, head_dim = 128, 4, 2, 32
    for layer in (2, 3):
        prefix = f"model.layers.{layer}.self_attn"
        weights[f"{prefix}.router_q_proj.0.weight"] = torch.randn(heads * head_dim, hidden, generator=gen) * 0.08
        weights[f"{prefix}.router_k_proj.0.weight"] = torch.randn(kv_heads * head_dim, hidden, generator=gen) * 0.08
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def script_next_tokens(model_dir: Path, chain: list[int], strength: float = 20.0) -> None:
    """Make the checkpoint a scripted decoder: greedy decoding after token chain[i] emits
    chain[i + 1] (chain tokens distinct). Attention outputs and MLPs are zeroed, so the last
    hidden state is the current token's embedding, and the LM head maps it to its successor. The
    router projections stay random: routing (and what the tests check of it) is unchanged."""
    assert len(set(chain)) == len(chain)
    path = Path(model_dir) / "model.safetensors"
    weights = load_file(path)
    for name in weights:
        if name.endswith("self_attn.o_proj.weight") or name.endswith("mlp.down_proj.weight"):
            weights[name].zero_()
    embed, lm_head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    lm_head.zero_()
    for current, following in zip(chain, chain[1:]):
        unit = embed[current] / embed[current].pow(2).mean().sqrt()  # what the final RMSNorm gives
        lm_head[following] = strength * unit / unit.numel()
    save_file(weights, path, metadata={"format": "pt"})


def align_router_keys(model_dir: Path) -> None:
    """Set each KV group's router key projection to its first query head's router query
    projection, so a routing token scores highest against chunks holding the same tokens
    (routing by overlap: what makes later interleave rounds select differently in tests)."""
    path = Path(model_dir) / "model.safetensors"
    weights = load_file(path)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim, group = config["head_dim"], config["num_attention_heads"] // config["num_key_value_heads"]
    for name in [n for n in weights if n.endswith("router_q_proj.0.weight")]:
        heads = weights[name].view(-1, head_dim, weights[name].shape[-1])
        weights[name.replace("router_q_proj", "router_k_proj")] = heads[::group].reshape(-1, heads.shape[-1]).clone()
    save_file(weights, path, metadata={"format": "pt"})


class ReferenceMSAModel:
    """The MSA forward of the spec, written independently of the serving path (float64)."""

    def __init__(self, model_dir: Path):
        self.config = json.loads((Path(model_dir) / "config.json").read_text())
        self.w = {name: t.double() for name, t in load_file(Path(model_dir) / "model.safetensors").items()}
        c = self.config
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.eps, self.theta = c["rms_norm_eps"], c["rope_parameters"]["rope_theta"]
        self.num_layers = c["num_hidden_layers"]
        self.routed = routed_layers_of(c["msa_config"], self.num_layers)
        self.options = options_for_checkpoint(MSAOptions(), c["msa_config"], self.num_layers)

    def rms(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def rope(self, x, positions):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        freqs = positions.double()[:, None] * inv_freq[None]
        cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def attention_inputs(self, layer, x, positions):
        p = f"model.layers.{layer}"
        xn = self.rms(x, self.w[f"{p}.input_layernorm.weight"])
        n = x.shape[0]
        q = (xn @ self.w[f"{p}.self_attn.q_proj.weight"].T).view(n, self.heads, self.head_dim)
        k = (xn @ self.w[f"{p}.self_attn.k_proj.weight"].T).view(n, self.kv_heads, self.head_dim)
        v = (xn @ self.w[f"{p}.self_attn.v_proj.weight"].T).view(n, self.kv_heads, self.head_dim)
        q = self.rope(self.rms(q, self.w[f"{p}.self_attn.q_norm.weight"]), positions)
        k = self.rope(self.rms(k, self.w[f"{p}.self_attn.k_norm.weight"]), positions)
        return xn, q, k, v

    def finish_layer(self, layer, x, attn):
        p = f"model.layers.{layer}"
        x = x + attn.reshape(x.shape[0], -1) @ self.w[f"{p}.self_attn.o_proj.weight"].T
        h = self.rms(x, self.w[f"{p}.post_attention_layernorm.weight"])
        gate, up = h @ self.w[f"{p}.mlp.gate_proj.weight"].T, h @ self.w[f"{p}.mlp.up_proj.weight"].T
        return x + (torch.nn.functional.silu(gate) * up) @ self.w[f"{p}.mlp.down_proj.weight"].T

    def causal(self, q, k, v):
        empty = k[:0]
        return ref.msa_attention(ref.AttentionInputs(q, empty, empty, empty, empty, k, v, self.head_dim**-0.5))

    def encode_document(self, ids: list[int]) -> dict[int, tuple]:
        """Per routed layer: pooled K̄ (after RoPE at positions 0..n-1), V̄ and router keys K̄R."""
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        positions = torch.arange(len(ids))
        stored = {}
        for layer in range(self.num_layers):
            xn, q, k, v = self.attention_inputs(layer, x, positions)
            if layer in self.routed:
                kr = (xn @ self.w[f"model.layers.{layer}.self_attn.router_k_proj.0.weight"].T).view(
                    len(ids), self.kv_heads, self.head_dim)
                pool = lambda t: ref.pool_chunks(t, [len(ids)], self.options.chunk_size)  # noqa: E731
                stored[layer] = (pool(k), pool(v), pool(kr))
            x = self.finish_layer(layer, x, self.causal(q, k, v))
        return stored

    def query(self, ids: list[int], memory: list[dict], template: int, spans):
        """Logits of every prompt token and the per-layer selected document indices; the tokens
        of `spans` ([start, end) ranges) route."""
        routing_tokens = torch.tensor([i for start, end in spans for i in range(start, end)])
        self.document_scores: dict[int, torch.Tensor] = {}  # per routed layer, of the last query
        n = len(ids)
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        positions = torch.where(torch.arange(n) < template, torch.arange(n),
                                torch.arange(n) - template + 3 + self.options.top_k_docs)
        layout = ref.chunk_layout([doc["num_tokens"] for doc in memory], self.options.chunk_size)
        selections = {}
        for layer in range(self.num_layers):
            xn, q, k, v = self.attention_inputs(layer, x, positions)
            if layer not in self.routed:
                x = self.finish_layer(layer, x, self.causal(q, k, v))
                continue
            qr = (xn @ self.w[f"model.layers.{layer}.self_attn.router_q_proj.0.weight"].T).view(
                n, self.heads, self.head_dim)
            router_keys = torch.cat([doc["layers"][layer][2] for doc in memory])
            o = self.options
            chosen = ref.route_documents(qr[routing_tokens], router_keys, layout, o.top_k_docs, o.similarity,
                                         o.head_reduce, o.query_reduce, o.chunk_reduce).tolist()
            selections[layer] = chosen
            chunk_scores = ref.chunk_scores(qr[routing_tokens], router_keys, o.similarity, o.head_reduce,
                                            o.query_reduce)
            self.document_scores[layer] = ref.document_scores(chunk_scores, layout, o.chunk_reduce)
            memory_k = torch.cat([memory[i]["layers"][layer][0] for i in chosen])
            memory_v = torch.cat([memory[i]["layers"][layer][1] for i in chosen])
            attn = torch.empty(n, self.heads, self.head_dim, dtype=torch.float64)
            attn[:template] = self.causal(q[:template], k[:template], v[:template])
            attn[template:] = ref.msa_attention(ref.AttentionInputs(
                q[template:], k[:template], v[:template], memory_k, memory_v, k[template:], v[template:],
                self.head_dim**-0.5))
            x = self.finish_layer(layer, x, attn)
        logits = self.rms(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T
        return logits, selections

    def greedy(self, ids, memory, template, spans, max_new_tokens):
        """Greedy decoding with the selection frozen: the routing tokens precede every generated
        token, so re-running the causal forward reproduces their routing exactly."""
        tokens = list(ids)
        for _ in range(max_new_tokens):
            logits, _ = self.query(tokens, memory, template, spans)
            tokens.append(int(logits[-1].argmax()))
        return tokens[len(ids):]
