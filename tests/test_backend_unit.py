"""The msa backend on real SGLang pools and hand-built batches (no server).

Without memory, it must be exactly SGLang's dense attention: equal to torch_native bit for bit
and to causal SDPA, for a batch of requests with cached prefixes, then for a decode step.
"""

from __future__ import annotations

import types

import pytest
import torch

from sglang_msa.server_process import free_port

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 32


@pytest.fixture(scope="module")
def sglang_parts():
    # the imported names are returned through locals()
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: F401
    from sglang.srt.layers.radix_attention import RadixAttention  # noqa: F401
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: F401
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: F401
    from sglang.srt.plugins import load_plugins

    load_plugins()
    return types.SimpleNamespace(**locals())


def make_runner(parts):
    kv = parts.MHATokenToKVPool(
        size=512, page_size=1, dtype=torch.float32, head_num=NUM_KV_HEADS, head_dim=HEAD_DIM,
        layer_num=1, device="cpu", enable_memory_saver=False,
    )
    r2t = parts.ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False)
    return types.SimpleNamespace(
        device="cpu", req_to_token_pool=r2t, token_to_kv_pool=kv,
        # a one-layer model: with the default routed_layers="upper_half", layer 0 is routed
        model_config=types.SimpleNamespace(num_hidden_layers=1, dtype=torch.float32,
                                               hf_config=types.SimpleNamespace(model_type="llama")),
        server_args=types.SimpleNamespace(port=free_port(), chunked_prefill_size=None, model_path="tiny"),
    )


def make_backend(parts, name, runner):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    return ATTENTION_BACKENDS[name](runner) if name == "msa" else parts.TorchNativeAttnBackend(runner)


def sdpa_reference(q, k, v, prefix_len):
    """Causal attention of the new tokens (after prefix_len cached ones) over all tokens."""
    q_ = q.view(-1, NUM_HEADS, HEAD_DIM).transpose(0, 1)
    k_ = k.transpose(0, 1).repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)
    v_ = v.transpose(0, 1).repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)
    total = k.shape[0]
    mask = torch.arange(total).unsqueeze(0) <= (torch.arange(q_.shape[1]) + prefix_len).unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)
    return out.transpose(0, 1).reshape(-1, NUM_HEADS * HEAD_DIM)


def run_batch(parts, backend_name, prefix_lens, new_lens, seed=0):
    """Two-phase run: write cached prefixes, then extend every request, then one decode step."""
    gen = torch.Generator().manual_seed(seed)
    runner = make_runner(parts)
    backend = make_backend(parts, backend_name, runner)
    layer = parts.RadixAttention(
        num_heads=NUM_HEADS, head_dim=HEAD_DIM, scaling=HEAD_DIM**-0.5, num_kv_heads=NUM_KV_HEADS, layer_id=0
    )
    rows = torch.arange(1, len(prefix_lens) + 1)  # row 0 and slot 0 are padding
    totals = [p + n for p, n in zip(prefix_lens, new_lens)]
    all_k = [torch.randn(t + 1, NUM_KV_HEADS, HEAD_DIM, generator=gen) for t in totals]
    all_v = [torch.randn(t + 1, NUM_KV_HEADS, HEAD_DIM, generator=gen) for t in totals]
    next_slot = 1
    slots = []
    for row, total in zip(rows.tolist(), totals):
        request_slots = torch.arange(next_slot, next_slot + total + 1)
        runner.req_to_token_pool.req_to_token[row, : total + 1] = request_slots.to(torch.int32)
        slots.append(request_slots)
        next_slot += total + 1
    # the cached prefixes are already in the pool
    for request, prefix_len in enumerate(prefix_lens):
        runner.token_to_kv_pool.k_buffer[0][slots[request][:prefix_len]] = all_k[request][:prefix_len]
        runner.token_to_kv_pool.v_buffer[0][slots[request][:prefix_len]] = all_v[request][:prefix_len]

    q = torch.randn(sum(new_lens), NUM_HEADS * HEAD_DIM, generator=gen)
    extend = parts.ForwardBatch(
        forward_mode=parts.ForwardMode.EXTEND,
        batch_size=len(rows),
        input_ids=torch.zeros(sum(new_lens), dtype=torch.long),
        req_pool_indices=rows,
        seq_lens=torch.tensor(totals),
        out_cache_loc=torch.cat([s[p : p + n] for s, p, n in zip(slots, prefix_lens, new_lens)]),
        seq_lens_sum=sum(totals),
        extend_seq_lens=torch.tensor(new_lens),
        extend_prefix_lens=torch.tensor(prefix_lens),
    )
    backend.init_forward_metadata(extend)
    k_new = torch.cat([k[p : p + n] for k, p, n in zip(all_k, prefix_lens, new_lens)])
    v_new = torch.cat([v[p : p + n] for v, p, n in zip(all_v, prefix_lens, new_lens)])
    extend_out = backend.forward(q, k_new, v_new, layer, extend)

    q_decode = torch.randn(len(rows), NUM_HEADS * HEAD_DIM, generator=gen)
    decode = parts.ForwardBatch(
        forward_mode=parts.ForwardMode.DECODE,
        batch_size=len(rows),
        input_ids=torch.zeros(len(rows), dtype=torch.long),
        req_pool_indices=rows,
        seq_lens=torch.tensor(totals) + 1,
        out_cache_loc=torch.stack([s[t] for s, t in zip(slots, totals)]),
        seq_lens_sum=sum(totals) + len(rows),
    )
    backend.init_forward_metadata(decode)
    k_dec = torch.stack([k[t] for k, t in zip(all_k, totals)])
    v_dec = torch.stack([v[t] for v, t in zip(all_v, totals)])
    decode_out = backend.forward(q_decode, k_dec, v_dec, layer, decode)
    return types.SimpleNamespace(
        extend_out=extend_out, decode_out=decode_out, q=q, q_decode=q_decode, all_k=all_k, all_v=all_v,
        pool=runner.token_to_kv_pool, slots=slots,
    )


@pytest.mark.parametrize("prefix_lens,new_lens", [([0], [7]), ([0, 3, 5], [5, 1, 9]), ([11], [2])])
def test_msa_without_memory_equals_torch_native_and_sdpa(sglang_parts, prefix_lens, new_lens):
    msa = run_batch(sglang_parts, "msa", prefix_lens, new_lens)
    native = run_batch(sglang_parts, "torch_native", prefix_lens, new_lens)
    assert torch.equal(msa.extend_out, native.extend_out)
    assert torch.equal(msa.decode_out, native.decode_out)

    start = 0
    for request, (prefix_len, new_len) in enumerate(zip(prefix_lens, new_lens)):
        total = prefix_len + new_len
        want = sdpa_reference(
            msa.q[start : start + new_len], msa.all_k[request][:total], msa.all_v[request][:total], prefix_len
        )
        torch.testing.assert_close(msa.extend_out[start : start + new_len], want, rtol=1e-5, atol=1e-5)
        want_decode = sdpa_reference(
            msa.q_decode[request : request + 1], msa.all_k[request][: total + 1], msa.all_v[request][: total + 1], total
        )
        torch.testing.assert_close(msa.decode_out[request : request + 1], want_decode, rtol=1e-5, atol=1e-5)
        # the new K/V landed in the request's slots of the pool
        written = msa.pool.get_key_buffer(0)[msa.slots[request][: total + 1]]
        assert torch.equal(written, msa.all_k[request][: total + 1])
        start += new_len
