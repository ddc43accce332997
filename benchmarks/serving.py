"""Cost vs memory size: ingestion throughput, bytes per memory token, and query latency.

Starts `sglang serve --attention-backend msa` on the embedded SmolLM2-135M-Instruct (training-free
mode), fills a memory with seeded pseudo-prose documents in steps, and after each step measures
the query's time to first token and decode speed. In the same run, dense SGLang (the same
server, no memory) answers the same question with the memory's text in its context wherever
that fits the model's context window. Prints a table with the growth exponent of MSA's time to
first token (slope of log TTFT over log memory tokens), writes JSON and a PNG plot.

    .venv/bin/python benchmarks/serving.py [--sizes 4096,16384,65536,262144] [--out benchmarks/results/serving]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path

import requests

from sglang_msa.models.embedded import prepare_embedded_model
from sglang_msa.server_process import start_server

WORDS = ("river mountain lantern garden silver quiet market harbor winter meadow copper forest engine "
         "violet thunder archive window pepper canyon orchard velvet signal marble feather compass").split()
QUESTION = "What is the special magic number for the copper lantern?"
NEEDLE = "One of the special magic numbers for the copper lantern is: 4817263."
CONTEXT_LIMIT = 8192  # SmolLM2's context window


def documents(count: int, words_per_doc: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = []
        while sum(len(s.split()) for s in sentences) < words_per_doc:
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def timed_chat(url: str, path: str, content: str, max_tokens: int) -> tuple[float, dict]:
    started = time.perf_counter()
    response = requests.post(f"{url}{path}", json={
        "model": "default", "messages": [{"role": "user", "content": content}], "temperature": 0,
        "max_tokens": max_tokens,
    }, timeout=1800)
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def measure_query(url: str, path: str, content: str, repeats: int) -> dict:
    """TTFT = latency of a 1-token answer; decode tok/s from a 33-token answer minus it."""
    ttft = statistics.median(timed_chat(url, path, content, 1)[0] for _ in range(repeats))
    long_s, reply = timed_chat(url, path, content, 33)
    decode = reply["usage"]["completion_tokens"] - 1
    return {"ttft_s": ttft, "decode_tok_s": decode / max(long_s - ttft, 1e-9), "reply": reply}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,65536,262144", help="memory sizes in tokens (cumulative steps)")
    parser.add_argument("--doc-words", type=int, default=180)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/serving")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    model = prepare_embedded_model()
    options = {"top_k_docs": 4, "memory_content": "full", "max_document_tokens": 2048, "memory_budget_mb": 16384}
    server_args = ["--max-total-tokens", "32768", "--msa-config", json.dumps(options), "--log-level", "warning"]
    rows = []
    with start_server(model, "msa", extra_args=server_args, startup_timeout_s=600) as server:
        url = server.base_url
        requests.post(f"{url}/v1/memories", json={"memory_id": "bench"}, timeout=60).raise_for_status()
        memory_text: list[str] = []
        stored_tokens, seed = 0, 0
        for size in sizes:
            ingest_s, ingest_tokens = 0.0, 0
            while stored_tokens < size:
                batch = documents(16, args.doc_words, seed)
                if seed == 0:
                    batch[7] = batch[7] + " " + NEEDLE
                seed += 1
                started = time.perf_counter()
                response = requests.post(f"{url}/v1/memories/bench/documents",
                                         json={"documents": [{"text": t} for t in batch]}, timeout=3600)
                response.raise_for_status()
                ingest_s += time.perf_counter() - started
                added = sum(d["num_tokens"] for d in response.json()["documents"])
                ingest_tokens += added
                stored_tokens += added
                memory_text += batch
            info = requests.get(f"{url}/v1/memories/bench", timeout=60).json()
            msa = measure_query(url, "/v1/memories/bench/chat/completions", QUESTION, args.repeats)
            row = {
                "memory_tokens": info["tokens"], "documents": info["documents"],
                "bytes_per_memory_token": info["bytes"]["device"] / info["tokens"],
                "ingest_tok_s": ingest_tokens / ingest_s,
                "msa_ttft_s": msa["ttft_s"], "msa_decode_tok_s": msa["decode_tok_s"],
                "needle_retrieved": any(d["gid"] == 7 for d in msa["reply"]["msa"]["retrieved"]),
                "dense_ttft_s": None, "dense_decode_tok_s": None,
            }
            if info["tokens"] + 200 < CONTEXT_LIMIT:
                haystack = "\n\n".join(memory_text) + "\n\n" + QUESTION
                dense = measure_query(url, "/v1/chat/completions", haystack, args.repeats)
                row["dense_ttft_s"], row["dense_decode_tok_s"] = dense["ttft_s"], dense["decode_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    header = f"{'memory tok':>10} {'docs':>5} {'B/tok':>8} {'ingest tok/s':>12} {'MSA TTFT s':>10} " \
             f"{'MSA dec tok/s':>13} {'dense TTFT s':>12} {'dense dec tok/s':>15} {'needle@union':>12}"
    print("\n" + header)
    for r in rows:
        dense_ttft = f"{r['dense_ttft_s']:.3f}" if r["dense_ttft_s"] is not None else "n/a (>ctx)"
        dense_dec = f"{r['dense_decode_tok_s']:.1f}" if r["dense_decode_tok_s"] is not None else "n/a"
        print(f"{r['memory_tokens']:>10} {r['documents']:>5} {r['bytes_per_memory_token']:>8.0f} "
              f"{r['ingest_tok_s']:>12.0f} {r['msa_ttft_s']:>10.3f} {r['msa_decode_tok_s']:>13.1f} "
              f"{dense_ttft:>12} {dense_dec:>15} {str(r['needle_retrieved']):>12}")
    exponent = growth_exponent([r["memory_tokens"] for r in rows], [r["msa_ttft_s"] for r in rows])
    print(f"\nMSA time-to-first-token growth exponent over memory size: {exponent:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "machine": platform.platform(), "processor": platform.processor(), "model": str(model),
        "options": options, "msa_ttft_growth_exponent": exponent, "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def growth_exponent(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) over log(size): 1.0 is linear growth, 0 is flat."""
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    sizes = [r["memory_tokens"] for r in rows]
    axis.plot(sizes, [r["msa_ttft_s"] for r in rows], marker="o", label="MSA time to first token")
    dense = [(r["memory_tokens"], r["dense_ttft_s"]) for r in rows if r["dense_ttft_s"] is not None]
    if dense:
        axis.plot(*zip(*dense), marker="s", label="dense SGLang (memory in context)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("memory tokens")
    axis.set_ylabel("seconds")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
