"""MSA attention in plain PyTorch for the CPU serving path: `reference.msa_attention_split`
computed without repeating KV heads.

The reference repeats every KV head for its query-head group (`expand_kv_heads`) before one
einsum over all heads: clear, but every decode step of every routed layer then copies the
selected documents' K and V G times. Here the queries of each GQA group are stacked against their
one KV head ([Hkv, T·G, d] × [Hkv, d, S], one batched product), which reads each key once.
Query head h belongs to KV head h // G, as in the reference's `repeat_interleave`.

Equal to the reference up to float32 summation order (`tests/test_attention_torch.py`).
"""

from __future__ import annotations

import torch

from sglang_msa.kernels import reference as ref


def grouped_partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.partial_attention` without expanding KV heads: q [T, H, d], k/v [S, Hkv, d(v)],
    mask [T, S] bool or None (every key visible). Returns (out [T, H, dv], lse [T, H]) in the
    accumulation dtype; a query with no visible key gets out = 0 and lse = -inf."""
    num_q, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, v_dim = v.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    dtype = ref.accumulation_dtype(q)
    grouped_q = q.to(dtype).view(num_q, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)
    grouped_q = grouped_q.reshape(num_kv_heads, num_q * group, head_dim)
    logits = torch.bmm(grouped_q, k.to(dtype).permute(1, 2, 0)) * scale  # [Hkv, T·G, S]
    if mask is not None:
        rows = mask.repeat_interleave(group, dim=0)  # [T·G, S]: row t·G + g is query t
        logits = logits.masked_fill(~rows.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [Hkv, T·G]
    weights = torch.exp(logits - lse.unsqueeze(-1).clamp_min(torch.finfo(logits.dtype).min))
    out = torch.bmm(weights, v.to(dtype).permute(1, 0, 2))  # [Hkv, T·G, dv]
    out = out.view(num_kv_heads, num_q, group, v_dim).permute(1, 0, 2, 3).reshape(num_q, num_heads, v_dim)
    lse = lse.view(num_kv_heads, num_q, group).permute(1, 0, 2).reshape(num_q, num_heads)
    return out, lse


def msa_attention_split(inputs: ref.AttentionInputs) -> torch.Tensor:
    """`reference.msa_attention_split`: the selected memory (every query sees all of it) and
    [prefix ; local causal], merged by log-sum-exp."""
    num_q = inputs.q.shape[0]
    out_mem, lse_mem = grouped_partial_attention(inputs.q, inputs.memory_k, inputs.memory_v, None, inputs.scale)
    context_mask = ref.visibility_mask(num_q, inputs.prefix_k.shape[0], 0, inputs.local_k.shape[0])
    out_ctx, lse_ctx = grouped_partial_attention(
        inputs.q, torch.cat([inputs.prefix_k, inputs.local_k]), torch.cat([inputs.prefix_v, inputs.local_v]),
        context_mask, inputs.scale,
    )
    out, _ = ref.merge_partial_attentions(out_mem, lse_mem, out_ctx, lse_ctx)
    return out
