"""The quality benchmark's pieces that need no server: the systems file, the haystack-above
metric, the SSE reader (TTFT, final msa report), the client that drops an explain request a server
refuses, summaries, table and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglang_msa.evaluation.chat_stream import parse_events
from sglang_msa.evaluation.metrics import explained_above, haystack_above
from sglang_msa.evaluation.quality_report import Row, load_systems, summarize, table, write

BENCHMARK_SYSTEMS = Path(__file__).parents[1] / "benchmarks" / "quality_systems.json"


def test_the_shipped_systems_file_names_msa_server_configs(tmp_path):
    systems = load_systems(BENCHMARK_SYSTEMS)
    assert systems["msa-old"] == {"router_exclude_sink": False} and systems["msa-new"] == {}
    assert systems["msa-adapter"] == {"router_adapter": "embedded"} and "msa-adapter-closed" in systems
    (tmp_path / "bad.json").write_text(json.dumps({"rag": {}}))
    with pytest.raises(ValueError, match="built-in"):
        load_systems(tmp_path / "bad.json")
    (tmp_path / "worse.json").write_text(json.dumps({"x": "not an object"}))
    with pytest.raises(ValueError):
        load_systems(tmp_path / "worse.json")


def test_haystack_above_from_ranks_and_explain_reports():
    assert haystack_above(1, 300) == 0.0 and haystack_above(300, 300) == 1.0 and haystack_above(51, 101) == 0.5
    assert haystack_above(1, 1) == 0.0
    with pytest.raises(ValueError):
        haystack_above(0, 10)
    explain = {"doc-3": {"15": {"rank": 1, "score": 2.0, "num_documents": 11},
                         "16": {"rank": 6, "score": 0.1, "num_documents": 11},
                         "17": {"rank": 11, "score": -1.0, "num_documents": 11}},
               "doc-9": {"15": {"rank": 2, "score": 1.0, "num_documents": 11}}}
    assert explained_above(explain, ["doc-3"]) == 0.5
    assert explained_above(explain, ["doc-3", "doc-9"]) == pytest.approx((0.1 + 0.5) / 2)


def test_stream_reader_times_the_first_content_and_keeps_the_last_msa_report():
    ticks = iter([0.25, 9.0])
    events = [
        'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}', "",
        'data: {"choices": [{"delta": {"content": "Four"}}]}',
        b'data: {"choices": [{"delta": {"content": " thousand"}}]}',
        'data: {"choices": [{"delta": {}, "finish_reason": "stop"}], "msa": {"retrieved": [{"doc_id": "d", "gid": 0}]}}',
        "data: [DONE]", 'data: {"choices": [{"delta": {"content": "after done"}}]}',
    ]
    chat = parse_events(events, started=0.0, clock=lambda: next(ticks))
    assert chat.text == "Four thousand" and chat.ttft_s == 0.25 and chat.msa["retrieved"][0]["doc_id"] == "d"
    assert parse_events(["data: [DONE]"], 0.0).ttft_s is None
    with pytest.raises(RuntimeError, match="memory not found"):
        parse_events(['data: {"error": {"message": "memory not found"}}'], 0.0)


def row(mode: str, em: bool, ttft: float, **fields) -> Row:
    return Row(size=16000, generator="heldout", family="single", seed=0, mode=mode, memory_tokens=16100, question="q", gold=["d"],
               answer="a", em=em, ttft_s=ttft, **fields)


def test_summaries_table_and_plot(tmp_path):
    rows = [row("msa-old", True, 0.2, recall_layer=0.5, recall_union=1.0, above=0.1, ingest_tok_s=1000.0),
            row("msa-old", False, 0.4, recall_layer=0.0, recall_union=0.0, above=0.3, ingest_tok_s=1000.0),
            row("msa-old", False, 0.9, recall_layer=0.25, recall_union=1.0, above=None, ingest_tok_s=1000.0),
            row("rag", True, 0.1, recall_top=1.0, above=0.0)]
    old, rag = summarize(rows)
    assert old["mode"] == "msa-old" and old["questions"] == 3 and old["em"] == pytest.approx(1 / 3)
    assert old["ttft_ms"] == pytest.approx(400) and old["recall_layer"] == pytest.approx(0.25)
    assert old["above"] == pytest.approx(0.2) and old["recall_top"] is None  # median of the reported ones
    assert rag["em"] == 1.0 and rag["recall_layer"] is None and rag["above"] == 0.0
    lines = table([old, rag]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| size | generator | system")
    assert "| 16000 | heldout | msa-old | 16100 | 3 | 0.33 | 400 | 0.25 | 0.67 | n/a | 0.200 | 1000 |" == lines[2]
    write(tmp_path / "q", {"machine": "test"}, rows, [old, rag])
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["machine"] == "test" and len(saved["rows"]) == 4 and saved["summaries"][1]["mode"] == "rag"
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_client_drops_explain_once_a_server_refuses_it():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sglang_msa.evaluation.chat_stream import ChatClient

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body["msa"])
            if "explain_doc_ids" in body["msa"]:
                status, reply = 422, b'{"error": {"message": "msa.explain_doc_ids: extra inputs are not permitted"}}'
            else:
                status, reply = 200, (b'data: {"choices": [{"delta": {"content": "ok"}}], "msa": {"retrieved": []}}\n\n'
                                      b"data: [DONE]\n\n")
            self.send_response(status)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ChatClient(f"http://127.0.0.1:{server.server_port}", max_tokens=8)
        first = client.chat("/v1/memories/m/chat/completions", "q", {"routing_details": True, "explain_doc_ids": ["d"]})
        second = client.chat("/v1/memories/m/chat/completions", "q", {"routing_details": True, "explain_doc_ids": ["d"]})
    finally:
        server.shutdown()
    assert first.text == second.text == "ok" and first.ttft_s is not None and not client.explains
    assert seen == [{"routing_details": True, "explain_doc_ids": ["d"]}, {"routing_details": True},
                    {"routing_details": True}]
