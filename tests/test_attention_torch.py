"""The CPU path's MSA attention (`kernels.attention_torch`, KV heads never repeated) against the
reference (`reference.msa_attention_split`, which repeats them) on random inputs."""

from __future__ import annotations

import pytest
import torch

from sglang_msa.kernels import attention_torch, reference as ref

CASES = [  # (queries, heads, kv heads, head dim, v dim, prefix, memory, local)
    (1, 9, 3, 64, 64, 0, 1160, 40),   # SmolLM2 decode step: GQA 3, full-resolution memory
    (7, 4, 2, 16, 16, 3, 37, 7),      # prefill of the local part, template prefix, odd memory
    (5, 8, 1, 32, 24, 2, 0, 9),       # MQA, no memory, v dim != k dim
    (3, 6, 6, 8, 8, 0, 5, 3),         # MHA, every local token a query
    (2, 4, 2, 16, 16, 0, 1, 12),      # one memory row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_grouped_attention_equals_the_reference(case, dtype):
    num_q, heads, kv_heads, dim, v_dim, prefix, memory, local = case
    gen = torch.Generator().manual_seed(sum(case))

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    inputs = ref.AttentionInputs(
        q=rand(num_q, heads, dim), prefix_k=rand(prefix, kv_heads, dim), prefix_v=rand(prefix, kv_heads, v_dim),
        memory_k=rand(memory, kv_heads, dim), memory_v=rand(memory, kv_heads, v_dim),
        local_k=rand(local, kv_heads, dim), local_v=rand(local, kv_heads, v_dim), scale=dim**-0.5,
    )
    got = attention_torch.msa_attention_split(inputs)
    want = ref.msa_attention_split(inputs)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the one-softmax definition, computed in float64
    exact = ref.msa_attention(ref.AttentionInputs(**{
        name: value.double() if isinstance(value, torch.Tensor) else value for name, value in vars(inputs).items()}))
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-5)


def test_a_query_that_sees_no_key_gets_zero_and_minus_infinity():
    q, k, v = torch.randn(2, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out, lse = attention_torch.grouped_partial_attention(q, k, v, mask, 0.3)
    want_out, want_lse = ref.partial_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    assert bool((out[1] == 0).all()) and bool(torch.isinf(lse[1]).all())


def test_heads_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        attention_torch.grouped_partial_attention(torch.randn(1, 5, 4), torch.randn(2, 2, 4), torch.randn(2, 2, 4),
                                                  None, 1.0)
