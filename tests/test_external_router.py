"""The external router (`external_router: "minilm"`): router keys and queries from MiniLM text
embeddings, the service's checks, the memory directory's record, and the chunk keys stored as
they were made."""

from __future__ import annotations

import pytest
import torch

from sglang_msa.attention_backend import memory_ops
from sglang_msa.config import MSAOptions
from sglang_msa.kernels import routing_scan
from sglang_msa.memory_manager import service as service_module
from sglang_msa.memory_manager.persistence import ArchiveMismatchError
from sglang_msa.memory_manager.service import KVGeometry
from sglang_msa.models.text_router import ExternalRouter, ExternalRouterError

LAYERS = 4
DOCUMENTS = [
    "The lighthouse keeper logs the passing ships every night and trims the lamp wick at dawn.",
    "Sourdough needs a lively starter, a long cold proof, and a very hot oven with steam.",
    "The violin was restored by a luthier in Cremona, who replaced its bridge and sound post.",
    "Glaciers carve U-shaped valleys and leave moraines of rock where the ice retreats.",
]


@pytest.fixture(scope="module")
def router(tiny_llama) -> ExternalRouter:
    return ExternalRouter("minilm", str(tiny_llama))


def test_chunk_keys_embed_each_chunks_decoded_text(router):
    ids = router.model_tokenizer(DOCUMENTS[2], add_special_tokens=False).input_ids
    keys = router.chunk_keys(ids, 8)
    assert keys.shape == (-(-len(ids) // 8), 1, router.dim)
    texts = [router.model_tokenizer.decode(ids[start:start + 8]) for start in range(0, len(ids), 8)]
    torch.testing.assert_close(keys[:, 0], router.encoder.embed(texts))
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(keys.shape[:2]))
    query = router.query(router.model_tokenizer("Who restored the violin?", add_special_tokens=False).input_ids)
    assert query.shape == (1, 1, router.dim)


def test_the_matching_document_outscores_the_others(router):
    """Cosine of the question against each document's best chunk: the document about the
    question's subject ranks first (what the router exists for)."""
    tokenizer = router.model_tokenizer
    for question, expected in (("Who repaired the violin's bridge?", 2), ("How should I bake sourdough bread?", 1),
                               ("What does the lighthouse keeper record?", 0)):
        query = router.query(tokenizer(question, add_special_tokens=False).input_ids)[0, 0]
        scores = [float((router.chunk_keys(tokenizer(text, add_special_tokens=False).input_ids, 16)[:, 0]
                         @ query).max()) for text in DOCUMENTS]
        assert max(range(len(DOCUMENTS)), key=scores.__getitem__) == expected, (question, scores)


def test_unknown_router_is_refused(tiny_llama):
    with pytest.raises(ExternalRouterError, match="'bm25' is not one of"):
        ExternalRouter("bm25", str(tiny_llama))


def test_options_refuse_an_unknown_external_router():
    with pytest.raises(ValueError, match="external_router"):
        MSAOptions(external_router="bm25")


def _service(tmp_path, monkeypatch, tiny_llama, msa_config=None, **extra):
    monkeypatch.setattr(service_module, "_service", None)
    options = MSAOptions(memory_dir=str(tmp_path / "memories"), **extra)
    facts = service_module.ModelFacts(
        num_layers=LAYERS, msa_config=msa_config, max_prefill_tokens=None, hidden_size=16,
        tokenizer_path=str(tiny_llama))
    return service_module.MemoryService(options, facts)


def test_service_serves_the_external_router_and_records_it(tmp_path, monkeypatch, tiny_llama):
    service = _service(tmp_path, monkeypatch, tiny_llama, external_router="minilm")
    assert service.router_identity().startswith("external:minilm:")
    assert (service.options.similarity, service.options.chunk_reduce) == ("cosine", "max")
    assert not service.exclude_sink and not service.routes_on_pooled_keys
    layout = service.slot_layout(KVGeometry(kv_heads=2, head_dim=8, v_head_dim=8, dtype=torch.bfloat16,
                                            device=torch.device("cpu")))
    assert (layout.router_heads, layout.router_dim) == (1, 384)
    # memories encoded with MiniLM keys are never routed with pooled keys, nor the other way
    with pytest.raises(ArchiveMismatchError, match="router differ"):
        _service(tmp_path, monkeypatch, tiny_llama)
    assert _service(tmp_path, monkeypatch, tiny_llama, external_router="minilm").router_identity() == \
        service.router_identity()


def test_service_refuses_an_external_router_with_an_adapter_or_an_msa_checkpoint(tmp_path, monkeypatch, tiny_llama):
    with pytest.raises(ExternalRouterError, match="exclusive"):
        _service(tmp_path, monkeypatch, tiny_llama, external_router="minilm", router_adapter="embedded")
    with pytest.raises(ExternalRouterError, match="MSA checkpoint"):
        _service(tmp_path / "msa", monkeypatch, tiny_llama, msa_config={"router_layer_idx": "2,3"},
                 external_router="minilm")


@pytest.mark.parametrize("fmt", ["model", "fp8"])
def test_chunk_keys_are_stored_as_made(fmt):
    keys, values = torch.randn(20, 2, 4), torch.randn(20, 2, 4)
    chunk_keys = torch.nn.functional.normalize(torch.randn(3, 1, 384), dim=-1)
    tensors = memory_ops.pool_document(keys, values, 8, keep_full=False, router_key_format=fmt,
                                       exclude_sink=False, pooled_router_keys=chunk_keys)
    if fmt == "model":
        torch.testing.assert_close(tensors.router_k, chunk_keys, rtol=0, atol=0)
    else:
        expected, scales = routing_scan.quantize_fp8(chunk_keys)
        torch.testing.assert_close(tensors.router_k.float(), expected.float(), rtol=0, atol=0)
        torch.testing.assert_close(tensors.router_k_scale, scales)
    assert tensors.pooled_k.shape == (3, 2, 4)  # the content is pooled as always

