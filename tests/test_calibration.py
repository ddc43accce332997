"""`sglang-msa calibrate` on a tiny random model: the calibration data, the features, and a fit
whose loss falls and whose held-out retrieval rises above the closed-form start."""

from __future__ import annotations

import argparse

import torch

from sglang_msa.calibration.corpus import FACT_TEMPLATES, build_calibration_set
from sglang_msa.calibration.features import extract_features
from sglang_msa.calibration.fit import document_scores, retrieval_metrics, whitening
from sglang_msa.calibration.run import calibrate
from sglang_msa.evaluation import generators
from sglang_msa.models.router_adapter import load_adapter


def test_calibration_set_is_deterministic_and_answers_its_queries():
    first, again = build_calibration_set(60, seed=3), build_calibration_set(60, seed=3)
    assert [d.text for d in first.documents] == [d.text for d in again.documents]
    assert [q.text for q in first.queries] == [q.text for q in again.queries]
    assert {d.source for d in first.documents} == {"kjv", "docstring", "facts"}
    assert {q.family for q in first.queries} == {"cloze", "words", "fact"}
    for query in first.queries:
        document = first.documents[query.doc_index].text
        if query.family == "words":
            words = {w.strip(".,;:?!()\"'").lower() for w in document.split()}
            assert set(query.evidence.split()) <= words
        else:  # the span, or the person asked about, is in the document and in the query
            assert query.evidence in document and query.evidence in query.text


def test_calibration_text_shares_no_template_with_the_benchmark_generators():
    data = build_calibration_set(60, seed=0)
    text = " ".join(d.text for d in data.documents) + " ".join(q.text for q in data.queries)
    assert "magic number" not in text and generators.NEEDLE.split("{")[0] not in text
    assert not any("magic" in template for pair in FACT_TEMPLATES.values() for template in pair)


def test_features_are_layer_inputs_pooled_without_the_sink(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    docs = ["alpha beta gamma " * 30, "The sky is blue."]
    features = extract_features(model, tokenizer, docs, ["Where is the sky?"], [1], chunk_size=16, progress=False)
    ids = tokenizer(docs[0], add_special_tokens=False).input_ids
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
        normed = model.model.layers[1].input_layernorm(hidden)[0]
    chunks_of_first = -(-len(ids) // 16)
    assert features.chunk_doc.tolist().count(0) == chunks_of_first
    torch.testing.assert_close(features.chunks[1][0], normed[1:16].mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features.chunks[1][1], normed[16:32].mean(0), rtol=1e-4, atol=1e-4)
    assert features.queries[1].shape == (1, model.config.hidden_size)


def test_whitening_decorrelates_and_scores_match_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=generator) @ torch.randn(8, 8, generator=generator)
    center, w = whitening(x, 8)
    covariance = torch.cov(((x - center) @ w.T).T)
    torch.testing.assert_close(covariance, torch.eye(8), rtol=1e-3, atol=1e-3)
    queries, chunk_doc = torch.randn(3, 8, generator=generator), torch.tensor([0, 0, 1, 2, 2])
    chunks = torch.randn(5, 8, generator=generator)
    scores = document_scores(w, w, center, queries, chunks, chunk_doc, 3, heads=2)
    q, k = (queries - center) @ w.T, (chunks - center) @ w.T
    per_chunk = q @ k.T / (2 * 2.0)  # head mean of per-head dots / sqrt(head_dim 4)
    expected = torch.stack([per_chunk[:, :2].amax(1), per_chunk[:, 2], per_chunk[:, 3:].amax(1)], 1)
    torch.testing.assert_close(scores, expected)
    assert retrieval_metrics(scores, scores.argmax(1))["recall@1"] == 1.0


def test_calibrate_a_tiny_model_learns(tiny_llama, tmp_path):
    out = tmp_path / "adapter.safetensors"
    args = argparse.Namespace(out=out, model_path=str(tiny_llama), documents=160, queries_per_document=3, dims=64,
                              head_dim=32, steps=120, layers=None, chunk_size=64, max_document_tokens=256, seed=0,
                              features_cache=None, weights="bf16")
    card = calibrate(args)
    assert card["loss_last"] < 0.8 * card["loss_first"]
    assert card["heldout_mrr"] > card["heldout_mrr_closed_form"]
    adapter = load_adapter(str(out))
    assert adapter.layer_ids == [1] and (adapter.query_heads, adapter.head_dim) == (2, 32)
    assert adapter.reductions["query_reduce"] == "mean" and adapter.card["documents"] == 160
