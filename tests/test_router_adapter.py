"""Router adapters (`models.router_adapter`): the file format, the options it sets, the memory
directory's record of it, and router-key pooling without each document's sink token."""

from __future__ import annotations

import pytest
import torch

from sglang_msa.attention_backend import memory_ops
from sglang_msa.config import MSAOptions
from sglang_msa.kernels import reference as ref
from sglang_msa.memory_manager import service as service_module
from sglang_msa.memory_manager.persistence import ArchiveMismatchError
from sglang_msa.models.router_adapter import (
    AdapterError, LayerRouter, RouterAdapter, adapter_path, load_adapter, options_with_adapter,
)

HIDDEN, LAYERS = 16, 4
REDUCTIONS = {"similarity": "dot", "head_reduce": "mean", "query_reduce": "mean", "chunk_reduce": "max"}


def make_adapter(seed: int = 0, layers=(2, 3), heads: int = 2, head_dim: int = 4, center: bool = True) -> RouterAdapter:
    generator = torch.Generator().manual_seed(seed)
    routers = {layer: LayerRouter(torch.randn(heads * head_dim, HIDDEN, generator=generator),
                                  torch.randn(heads * head_dim, HIDDEN, generator=generator),
                                  torch.randn(HIDDEN, generator=generator) if center else None)
               for layer in layers}
    return RouterAdapter(routers, heads, heads, head_dim, HIDDEN, LAYERS, dict(REDUCTIONS), card={"steps": 3})


def test_round_trip_keeps_tensors_metadata_and_identity(tmp_path):
    adapter = make_adapter()
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    loaded = load_adapter(str(path))
    assert loaded.layer_ids == [2, 3] and loaded.card == {"steps": 3} and loaded.reductions == REDUCTIONS
    for layer in (2, 3):  # stored as bfloat16
        torch.testing.assert_close(loaded.layers[layer].q_proj.float(), adapter.layers[layer].q_proj.bfloat16().float())
        torch.testing.assert_close(loaded.layers[layer].center.float(), adapter.layers[layer].center.bfloat16().float())
    assert loaded.identity == load_adapter(str(path)).identity
    assert make_adapter(seed=1).identity != adapter.identity != loaded.identity  # bfloat16 rounding changed it


def test_float8_weights_load_within_float8_precision(tmp_path):
    adapter = make_adapter()
    path = tmp_path / "adapter-fp8.safetensors"
    adapter.save(path, weights="fp8")
    loaded = load_adapter(str(path))
    for layer in (2, 3):
        for name in ("q_proj", "k_proj"):
            original = getattr(adapter.layers[layer], name)
            error = (getattr(loaded.layers[layer], name) - original).abs()
            assert float((error / original.abs().amax(1, keepdim=True)).max()) <= 2**-3  # e4m3: 3 mantissa bits
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # one byte per weight on disk
        assert handle.get_tensor("layers.2.router_q_proj").dtype == torch.float8_e4m3fn


def test_projection_is_the_centered_linear_map():
    adapter = make_adapter()
    hidden = torch.randn(5, HIDDEN)
    router = adapter.layers[3]
    expected_k = ((hidden - router.center) @ router.k_proj.T).view(5, 2, 4)
    torch.testing.assert_close(adapter.project(3, hidden, "k"), expected_k)
    assert adapter.project(3, hidden, "q").shape == (5, 2, 4)
    # pooling commutes with the projection: the router key of a chunk is the projection of its mean
    torch.testing.assert_close(adapter.project(3, hidden, "k").mean(0), adapter.project(3, hidden.mean(0, True), "k")[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("break_it, message", [
    (lambda t: t.pop("layers.2.router_k_proj"), "lacks router_q_proj or router_k_proj"),
    (lambda t: t.update({"layers.2.router_q_proj": torch.zeros(3, HIDDEN)}), "has shape"),
    (lambda t: t.update({"something.else": torch.zeros(1)}), "unexpected tensor"),
    (lambda t: t.update({"layers.2.router_q_proj": t["layers.2.router_q_proj"].to(torch.float8_e4m3fn)}),
     "float8 without a scale"),
])
def test_broken_files_are_refused_naming_the_problem(tmp_path, break_it, message):
    from safetensors.torch import save_file

    adapter = make_adapter()
    tensors = adapter.tensors()
    break_it(tensors)
    path = tmp_path / "broken.safetensors"
    import json

    save_file(tensors, str(path), metadata={"sglang_msa_router_adapter": json.dumps(adapter.metadata())})
    with pytest.raises(AdapterError, match=message):
        load_adapter(str(path))


def test_files_that_are_not_adapters_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(AdapterError, match="is not a file"):
        adapter_path(str(tmp_path / "missing.safetensors"))
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(AdapterError, match="no 'sglang_msa_router_adapter' metadata"):
        load_adapter(str(plain))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        load_adapter(str(garbage))


def test_wrong_model_is_refused():
    with pytest.raises(AdapterError, match="hidden size 16 and 4 layers; this model has 32 and 4"):
        make_adapter().check_model(32, LAYERS)


def test_options_take_the_adapters_layers_and_reductions_unless_set():
    adapter = make_adapter()
    options = options_with_adapter(MSAOptions(), adapter, LAYERS)
    assert options.routed_layer_ids(LAYERS) == [2, 3]
    assert (options.query_reduce, options.similarity) == ("mean", "dot")
    explicit = options_with_adapter(MSAOptions(query_reduce="max"), adapter, LAYERS)
    assert explicit.query_reduce == "max"
    assert options_with_adapter(MSAOptions(routed_layers=[2, 3]), adapter, LAYERS).routed_layer_ids(LAYERS) == [2, 3]
    with pytest.raises(AdapterError, match="differ from the router adapter's layers"):
        options_with_adapter(MSAOptions(routed_layers="all"), adapter, LAYERS)


def _service(tmp_path, monkeypatch, adapter_file=None, **extra):
    monkeypatch.setattr(service_module, "_service", None)
    options = MSAOptions(memory_dir=str(tmp_path / "memories"), router_adapter=adapter_file, **extra)
    facts = service_module.ModelFacts(num_layers=LAYERS, msa_config=None, max_prefill_tokens=None,
                                      hidden_size=HIDDEN)
    return service_module.MemoryService(options, facts)


def test_memory_directory_records_the_router_that_made_its_keys(tmp_path, monkeypatch):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    make_adapter(seed=0).save(first)
    make_adapter(seed=1).save(second)
    service = _service(tmp_path, monkeypatch, str(first))
    assert service.router_identity() == f"adapter:{service.adapter.identity}/no-sink"
    assert _service(tmp_path, monkeypatch, str(first)).adapter.identity == service.adapter.identity  # reopens
    with pytest.raises(ArchiveMismatchError, match="router differ"):
        _service(tmp_path, monkeypatch, str(second))
    with pytest.raises(ArchiveMismatchError, match="router differ"):
        _service(tmp_path, monkeypatch, None)


def test_an_adapter_is_refused_for_msa_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    make_adapter().save(path)
    monkeypatch.setattr(service_module, "_service", None)
    facts = service_module.ModelFacts(num_layers=LAYERS, msa_config={"router_layer_start": 2},
                                      max_prefill_tokens=None, hidden_size=HIDDEN)
    with pytest.raises(AdapterError, match="MSA checkpoint"):
        service_module.MemoryService(MSAOptions(router_adapter=str(path)), facts)


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 130])
def test_sink_exclusion_pools_the_first_chunk_without_token_zero(n):
    keys, values = torch.randn(n, 2, 4), torch.randn(n, 2, 4)
    tensors = memory_ops.pool_document(keys, values, 64, keep_full=False, exclude_sink=True)
    expected = ref.pool_chunks(keys, [n], 64)
    if n > 1:
        expected[0] = keys[1:min(n, 64)].mean(0)
    torch.testing.assert_close(tensors.router_k, expected)
    torch.testing.assert_close(tensors.pooled_k, ref.pool_chunks(keys, [n], 64))  # content keeps every token
    assert tensors.router_k is not tensors.pooled_k


def test_a_document_differing_only_in_its_first_token_keeps_its_router_keys():
    keys, values = torch.randn(100, 2, 4), torch.randn(100, 2, 4)
    other = keys.clone()
    other[0] = 100.0
    same = memory_ops.pool_document(keys, values, 64, keep_full=False, exclude_sink=True)
    changed = memory_ops.pool_document(other, values, 64, keep_full=False, exclude_sink=True)
    torch.testing.assert_close(same.router_k, changed.router_k, rtol=0, atol=0)
    with_sink = memory_ops.pool_document(other, values, 64, keep_full=False, exclude_sink=False)
    assert not torch.allclose(with_sink.router_k, same.router_k)
