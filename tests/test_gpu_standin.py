"""The sgl_kernel GPU stand-in (sgl_kernel_gpushim/, the test rig of benchmarks/gpu_serve_check.sh)
against SGLang 0.5.23's own PyTorch code: the norms and act-and-mul equal SGLang's `forward_native`
exactly in float32 and within 2 ulp in bfloat16 (the stand-in computes in float32 and rounds once,
like the CUDA kernels); top-k / top-p renorm equal SGLang's FlashInfer-semantics fallback
(`renorm_triton`, run under Triton's interpreter) and a brute-force definition; every other name
raises or is absent, naming itself."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STANDIN_DIR = Path(__file__).parents[1] / "sgl_kernel_gpushim" / "sgl_kernel"
ALIAS = "sgl_kernel_gpu_standin_under_test"  # the CPU stand-in owns the name sgl_kernel in this process


def load_standin(alias: str = ALIAS):
    spec = importlib.util.spec_from_file_location(alias, STANDIN_DIR / "__init__.py",
                                                  submodule_search_locations=[str(STANDIN_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module


@pytest.fixture(scope="module")
def standin():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SGLANG_MSA_GPU_STANDIN", "1")
        module = load_standin()
    yield module
    for name in [name for name in sys.modules if name == ALIAS or name.startswith(ALIAS + ".")]:
        del sys.modules[name]


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between two bfloat16 tensors in units in the last place."""
    assert a.dtype == b.dtype == torch.bfloat16

    def ordered(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return int((ordered(a) - ordered(b)).abs().max())


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.float32:
        assert torch.equal(got, expected), (got - expected).abs().max()
    else:
        assert ulps_apart(got, expected) <= 2


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gemma", [False, True], ids=["rmsnorm", "gemma"])
def test_norms_equal_sglang_forward_native(standin, dtype, gemma):
    from sglang.srt.layers.layernorm import GemmaRMSNorm, RMSNorm

    hidden, eps = 96, 1e-5
    generator = torch.Generator().manual_seed(7)
    layer = (GemmaRMSNorm if gemma else RMSNorm)(hidden, eps=eps)
    layer.weight.data = (torch.randn(hidden, generator=generator) * 0.5 + (0 if gemma else 1)).to(dtype)
    norm = standin.gemma_rmsnorm if gemma else standin.rmsnorm
    fused = standin.gemma_fused_add_rmsnorm if gemma else standin.fused_add_rmsnorm
    x = (torch.randn(13, hidden, generator=generator) * 3).to(dtype)
    residual = torch.randn(13, hidden, generator=generator).to(dtype)

    expected = layer.forward_native(x.clone())
    assert_close(norm(x, layer.weight.data, eps), expected)
    out = torch.full_like(x, float("nan"))
    assert norm(x, layer.weight.data, eps, out=out) is out
    assert_close(out, expected)

    expected_x, expected_residual = layer.forward_native(x.clone(), residual.clone())
    got_x, got_residual = x.clone(), residual.clone()
    assert fused(got_x, got_residual, layer.weight.data, eps) is None  # in place, like the kernel
    assert_close(got_residual, expected_residual)
    assert_close(got_x, expected_x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh"])
def test_act_and_mul_equal_sglang_forward_native(standin, dtype, kind):
    from sglang.srt.layers.activation import GeluAndMul, SiluAndMul

    layers = {"silu": SiluAndMul, "gelu": lambda: GeluAndMul("none"), "gelu_tanh": lambda: GeluAndMul("tanh")}
    layer = layers[kind]()
    function = getattr(standin, f"{kind}_and_mul")
    x = (torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    expected = layer.forward_native(x)
    assert_close(function(x), expected)
    out = torch.full_like(expected, float("nan"))
    assert function(x, out=out) is out
    assert_close(out, expected)
    with pytest.raises(ValueError, match=f"{kind}_and_mul"):
        function(x, out=torch.empty(3, 5, 65, dtype=dtype))


def brute_force_renorm(row: list[float], keep) -> list[float]:
    kept = [p if keep(p) else 0.0 for p in row]
    return [p / sum(kept) for p in kept]


def renorm_cases():
    generator = torch.Generator().manual_seed(11)
    probs = torch.softmax(torch.randn(6, 50, generator=generator) * 2, dim=-1)
    probs[5] = torch.tensor([0.3, 0.3, 0.2, 0.2] + [0.0] * 46)  # ties at the pivot
    return probs


def test_top_k_renorm_matches_its_definition(standin):
    probs = renorm_cases()
    top_ks = torch.tensor([1, 3, 10, 50, 80, 1])
    got = standin.top_k_renorm_prob(probs, top_ks)
    for row, k, got_row in zip(probs.tolist(), top_ks.tolist(), got):
        pivot = sorted(row, reverse=True)[min(k, len(row)) - 1]
        assert got_row.tolist() == pytest.approx(brute_force_renorm(row, lambda p: p >= pivot), abs=1e-7)
    assert (got[5] > 0).sum() == 2  # k = 1 keeps both tied 0.3s, as FlashInfer does
    scalar, tensor = standin.top_k_renorm_prob(probs, 3), standin.top_k_renorm_prob(probs, torch.tensor([3]))
    assert torch.equal(scalar, tensor)


def test_top_p_renorm_matches_its_definition(standin):
    probs = renorm_cases()
    top_ps = torch.tensor([0.0001, 0.5, 0.9, 1.0, 0.3, 0.5])
    got = standin.top_p_renorm_prob(probs, top_ps)
    for row, p, got_row in zip(probs.tolist(), top_ps.tolist(), got):
        ordered, mass = sorted(row, reverse=True), 0.0
        for pivot in ordered:  # the smallest head of the sorted row whose mass reaches p
            mass += pivot
            if mass >= p - 1e-6:
                break
        assert got_row.tolist() == pytest.approx(brute_force_renorm(row, lambda q: q >= pivot), abs=1e-6)
    assert (got[0] > 0).sum() == 1 and (got[3] > 0).all()  # p -> 0 keeps the best token, p = 1 all
    assert (got[5] > 0).sum() == 2  # p = 0.5 is reached at the second of the two tied 0.3s


RENORM_VS_SGLANG = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_gpu_standin import load_standin, renorm_cases
import sglang.kernels.ops.sampling.renorm_triton as sglang_renorm
sglang_renorm._prepare_probs = lambda probs: probs.float().contiguous()  # no CUDA check: interpreted on CPU
standin = load_standin()
probs = renorm_cases()
ks, ps = torch.tensor([1, 3, 10, 50, 80, 1]), torch.tensor([0.0001, 0.5, 0.9, 1.0, 0.3, 0.5])
print(json.dumps({
    "top_k": (standin.top_k_renorm_prob(probs, ks) - sglang_renorm.top_k_renorm_probs_triton(probs, ks))
             .abs().max().item(),
    "top_p": (standin.top_p_renorm_prob(probs, ps) - sglang_renorm.top_p_renorm_probs_triton(probs, ps))
             .abs().max().item(),
}))
"""


def test_renorm_equals_sglang_flashinfer_semantics_fallback():
    """SGLang's ROCm fallback (`renorm_triton`, documented as FlashInfer's threshold semantics) in a
    child process, since Triton reads TRITON_INTERPRET when a kernel is defined."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "SGLANG_MSA_GPU_STANDIN": "1"}
    result = subprocess.run([sys.executable, "-c", RENORM_VS_SGLANG, str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = json.loads(result.stdout.strip().splitlines()[-1])
    assert differences["top_k"] <= 1e-7 and differences["top_p"] <= 1e-7, differences


def test_every_other_imported_name_raises_naming_itself(standin):
    kvcacheio = importlib.import_module(f"{ALIAS}.kvcacheio")
    quantization = importlib.import_module(f"{ALIAS}.quantization")
    functions = [standin.int8_scaled_mm, standin.moe_sum, standin.moe_sum_reduce]
    functions += [getattr(kvcacheio, name) for name in kvcacheio.NAMES]
    functions += [getattr(quantization, name) for name in quantization.NAMES]
    assert len(kvcacheio.NAMES) == 13 and len(quantization.NAMES) == 4
    for function in functions:
        expected = f"GPU stand-in: .*{function.__name__} is not implemented"
        with pytest.raises(NotImplementedError, match=expected):
            function(torch.zeros(1))


def test_names_sglang_does_not_import_on_cuda_are_absent(standin):
    for name in ["rotary_embedding", "apply_rope_with_cos_sin_cache_inplace", "weak_ref_tensor",
                 "merge_state_v2", "top_k_top_p_sampling_from_probs", "flash_attn"]:
        assert not hasattr(standin, name), name


def test_scalar_types_are_names_only(standin):
    scalar_type = importlib.import_module(f"{ALIAS}.scalar_type")
    types = scalar_type.scalar_types
    assert types.uint4b8 is types.uint4b8 and types.uint4b8 != types.uint8b128
    assert isinstance(types.float4_e2m1f, scalar_type.ScalarType)
    {(4, True): types.uint4b8}  # noqa: B018  (built at import by SGLang's GPTQ config)
    with pytest.raises(NotImplementedError, match="scalar_types.uint4b8.size_bits"):
        types.uint4b8.size_bits  # noqa: B018


def test_marked_as_a_standin_and_refuses_to_load_unasked(standin, monkeypatch):
    assert standin.STANDIN is True and standin.STANDIN_KIND == "gpu" and "standin" in standin.__version__
    monkeypatch.delenv("SGLANG_MSA_GPU_STANDIN", raising=False)
    with pytest.raises(RuntimeError, match="SGLANG_MSA_GPU_STANDIN=1"):  # not ImportError: no silent fallback
        load_standin(ALIAS + "_unasked")
    assert ALIAS + "_unasked" not in sys.modules


def test_each_implemented_function_logs_once_when_it_runs(caplog):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SGLANG_MSA_GPU_STANDIN", "1")
        with caplog.at_level(logging.WARNING, logger="sgl_kernel.gpu_standin"):
            fresh = load_standin(ALIAS + "_logging")
            x = torch.randn(2, 16)
            fresh.silu_and_mul(x)
            fresh.silu_and_mul(x)
            fresh.rmsnorm(x, torch.ones(16))
    messages = [record.getMessage() for record in caplog.records if record.name == "sgl_kernel.gpu_standin"]
    del sys.modules[ALIAS + "_logging"]
    assert "not the real sglang-kernel" in messages[0]
    assert sum("silu_and_mul ran" in m for m in messages) == 1
    assert sum("rmsnorm ran" in m for m in messages) == 1
