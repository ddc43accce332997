"""Cost vs memory size: ingestion throughput, bytes per memory token by tier, and query latency.

Starts `sglang serve --attention-backend msa` on the embedded SmolLM2-135M-Instruct (training-free
mode) and fills one memory per placement (`device`: content with the router keys; `host`:
content in host memory, router keys on the device) with the same seeded pseudo-prose documents
in steps; after each step it measures each memory's ingestion speed, bytes per memory token on
each tier, and the query's time to first token and decode speed. In the same run, dense SGLang
(the same server, no memory) answers the same question with the memory's text in its context
wherever that fits the model's context window. Prints a table with the growth exponent of MSA's
time to first token (slope of log TTFT over log memory tokens), writes JSON and a PNG plot.

    .venv/bin/python benchmarks/serving.py [--sizes 4096,16384,65536,262144] [--placements device,host]
        [--out benchmarks/results/serving]
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
    parser.add_argument("--placements", default="device,host", help="one memory per placement, side by side")
    parser.add_argument("--doc-words", type=int, default=180)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/serving")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    placements = args.placements.split(",")

    model = prepare_embedded_model()
    options = {"top_k_docs": 4, "memory_content": "full", "max_document_tokens": 2048, "memory_budget_mb": 12288,
               "host_memory_budget_mb": 8192 if "host" in placements else 0}
    server_args = ["--max-total-tokens", "32768", "--msa-config", json.dumps(options), "--log-level", "warning"]
    rows = []
    with start_server(model, "msa", extra_args=server_args, startup_timeout_s=600) as server:
        url = server.base_url
        for placement in placements:
            requests.post(f"{url}/v1/memories", json={"memory_id": f"bench-{placement}", "placement": placement},
                          timeout=60).raise_for_status()
        memory_text: list[str] = []
        stored_tokens, seed = 0, 0
        for size in sizes:
            ingest = {placement: [0.0, 0] for placement in placements}  # seconds, tokens
            while stored_tokens < size:
                batch = documents(16, args.doc_words, seed)
                if seed == 0:
                    batch[7] = batch[7] + " " + NEEDLE
                seed += 1
                for placement in placements:
                    started = time.perf_counter()
                    response = requests.post(f"{url}/v1/memories/bench-{placement}/documents",
                                             json={"documents": [{"text": t} for t in batch]}, timeout=3600)
                    response.raise_for_status()
                    ingest[placement][0] += time.perf_counter() - started
                    added = sum(d["num_tokens"] for d in response.json()["documents"])
                    ingest[placement][1] += added
                stored_tokens += added
                memory_text += batch
            row = {"placements": {}, "dense_ttft_s": None, "dense_decode_tok_s": None}
            for placement in placements:
                memory_id = f"bench-{placement}"
                info = requests.get(f"{url}/v1/memories/{memory_id}", timeout=60).json()
                msa = measure_query(url, f"/v1/memories/{memory_id}/chat/completions", QUESTION, args.repeats)
                row["memory_tokens"], row["documents"] = info["tokens"], info["documents"]
                row["placements"][placement] = {
                    "device_bytes_per_token": info["bytes"]["device"] / info["tokens"],
                    "host_bytes_per_token": info["bytes"]["host"] / info["tokens"],
                    "ingest_tok_s": ingest[placement][1] / ingest[placement][0],
                    "ttft_s": msa["ttft_s"], "decode_tok_s": msa["decode_tok_s"],
                    "needle_retrieved": any(d["gid"] == 7 for d in msa["reply"]["msa"]["retrieved"]),
                }
            if row["memory_tokens"] + 200 < CONTEXT_LIMIT:
                haystack = "\n\n".join(memory_text) + "\n\n" + QUESTION
                dense = measure_query(url, "/v1/chat/completions", haystack, args.repeats)
                row["dense_ttft_s"], row["dense_decode_tok_s"] = dense["ttft_s"], dense["decode_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    print_table(rows, placements)
    exponents = {placement: growth_exponent([r["memory_tokens"] for r in rows],
                                            [r["placements"][placement]["ttft_s"] for r in rows])
                 for placement in placements}
    for placement, exponent in exponents.items():
        print(f"MSA ({placement}) time-to-first-token growth exponent over memory size: {exponent:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "machine": platform.platform(), "processor": platform.processor(), "model": str(model),
        "options": options, "msa_ttft_growth_exponent": exponents, "rows": rows}, indent=2))
    plot(rows, placements, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def print_table(rows: list[dict], placements: list[str]) -> None:
    header = f"{'memory tok':>10} {'docs':>5} {'placement':>9} {'dev B/tok':>9} {'host B/tok':>10} " \
             f"{'ingest tok/s':>12} {'TTFT s':>7} {'dec tok/s':>9} {'needle':>6} {'dense TTFT s':>12} " \
             f"{'dense dec tok/s':>15} {'TTFT vs device':>14}"
    print("\n" + header)
    for r in rows:
        for placement in placements:
            m = r["placements"][placement]
            dense_ttft = f"{r['dense_ttft_s']:.3f}" if r["dense_ttft_s"] is not None else "n/a (>ctx)"
            dense_dec = f"{r['dense_decode_tok_s']:.1f}" if r["dense_decode_tok_s"] is not None else "n/a"
            ratio = m["ttft_s"] / r["placements"][placements[0]]["ttft_s"]
            print(f"{r['memory_tokens']:>10} {r['documents']:>5} {placement:>9} {m['device_bytes_per_token']:>9.0f} "
                  f"{m['host_bytes_per_token']:>10.0f} {m['ingest_tok_s']:>12.0f} {m['ttft_s']:>7.3f} "
                  f"{m['decode_tok_s']:>9.1f} {str(m['needle_retrieved']):>6} {dense_ttft:>12} {dense_dec:>15} "
                  f"{ratio:>13.2f}x")


def growth_exponent(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) over log(size): 1.0 is linear growth, 0 is flat."""
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0


def plot(rows: list[dict], placements: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    sizes = [r["memory_tokens"] for r in rows]
    for placement in placements:
        axis.plot(sizes, [r["placements"][placement]["ttft_s"] for r in rows], marker="o",
                  label=f"MSA time to first token ({placement} content)")
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
