"""Memory Parallel through the real server: `--tp 2` on the CPU engine (two scheduler ranks over
gloo) against `--tp 1` on the same tiny model and documents.

Under --tp 2 each rank holds its KV heads of every document's content and the router keys of
about half of the documents; routing all-gathers the router queries and the local top-k
candidates. The selections per layer must be the single-rank ones, the scores equal within fp
tolerance (the model's own tensor-parallel reductions reorder sums), and the greedy answers the
same; creation, deletion and statistics reach both ranks.
"""

from __future__ import annotations

import json

import pytest
import requests

from sglang_msa.server_process import default_device, start_server

pytestmark = pytest.mark.server

MSA_CONFIG = {"top_k_docs": 3, "chunk_size": 8, "routed_layers": "all", "memory_budget_mb": 16}
DOCUMENTS = [{"text": f"Drawer {i} keeps the {['red', 'blue', 'green'][i % 3]} key number {i * 7919 % 1000}"
                      + " and a note" * (i % 5), "doc_id": f"drawer-{i}"} for i in range(24)]
QUESTIONS = ["Which key is in drawer 7?", "Where is the green key number 30?", "Tell me about drawer 19."]


def post(url, payload, expect=200):
    response = requests.post(url, json=payload, timeout=300)
    assert response.status_code == expect, response.text
    return response.json()


def serve_and_ask(model, tp: int, log_dir, monkeypatch) -> dict:
    device = default_device(ranks=2)  # both runs on the same kind of device: GPUs when there are 2
    if device == "cpu" and tp > 1:  # one CPU core per rank for SGLang's CPU engine
        monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "|".join(str(rank) for rank in range(tp)))
    args = ["--tp", str(tp), "--max-total-tokens", "4096", "--log-level", "warning",
            "--msa-config", json.dumps(MSA_CONFIG)]
    with start_server(model, "msa", extra_args=args, log_path=log_dir / f"tp{tp}.log", device=device) as server:
        url = server.base_url
        post(f"{url}/v1/memories", {"memory_id": "drawers"}, 201)
        added = post(f"{url}/v1/memories/drawers/documents", {"documents": DOCUMENTS}, 201)["documents"]
        answers = [post(f"{url}/v1/memories/drawers/chat/completions", {
            "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 8,
            "msa": {"routing_details": True}}) for question in QUESTIONS]
        info = requests.get(f"{url}/v1/memories/drawers", timeout=30).json()
        # a deleted document is never selected again, on any rank
        top = answers[0]["msa"]["layers"]["0"]["doc_gids"][0]
        doc_id = next(d["doc_id"] for d in added if d["gid"] == top)
        requests.delete(f"{url}/v1/memories/drawers/documents/{doc_id}", timeout=30).raise_for_status()
        after_delete = post(f"{url}/v1/memories/drawers/chat/completions", {
            "messages": [{"role": "user", "content": QUESTIONS[0]}], "temperature": 0, "max_tokens": 8,
            "msa": {"routing_details": True}})
        info_after = requests.get(f"{url}/v1/memories/drawers", timeout=30).json()
        requests.delete(f"{url}/v1/memories/drawers", timeout=30).raise_for_status()
        gone = requests.get(f"{url}/v1/memories/drawers", timeout=30).status_code
        return {"answers": answers, "info": info, "deleted": top, "after_delete": after_delete,
                "info_after": info_after, "gone": gone}


def test_two_ranks_select_and_answer_as_one(tiny_llama, tmp_path, monkeypatch):
    one = serve_and_ask(tiny_llama, 1, tmp_path, monkeypatch)
    two = serve_and_ask(tiny_llama, 2, tmp_path, monkeypatch)

    for single, sharded in zip(one["answers"] + [one["after_delete"]], two["answers"] + [two["after_delete"]]):
        assert set(sharded["msa"]["layers"]) == {"0", "1"}
        for layer, chosen in single["msa"]["layers"].items():
            assert sharded["msa"]["layers"][layer]["doc_gids"] == chosen["doc_gids"]
            assert sharded["msa"]["layers"][layer]["scores"] == pytest.approx(chosen["scores"], rel=1e-3, abs=1e-3)
        assert sharded["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]

    assert two["deleted"] == one["deleted"]
    assert all(two["deleted"] not in layer["doc_gids"] for layer in two["after_delete"]["msa"]["layers"].values())
    info = two["info"]
    assert info["documents"] == len(DOCUMENTS) and info["tokens"] == one["info"]["tokens"]
    # router keys sharded by document: both ranks route some, together all, each once
    per_rank = info["routed_documents_per_rank"]
    assert len(per_rank) == 2 and sum(per_rank) == len(DOCUMENTS) and min(per_rank) >= len(DOCUMENTS) // 3
    assert sum(two["info_after"]["routed_documents_per_rank"]) == len(DOCUMENTS) - 1
    assert "routed_documents_per_rank" not in one["info"]
    assert one["gone"] == two["gone"] == 404
