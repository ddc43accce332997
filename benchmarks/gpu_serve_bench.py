"""Serving cost through the `msa` server on one GPU: decode with a memory vs without, and time to
first token as the memory grows to 1M tokens (step 4 of benchmarks/gpu_serve_check.sh).

One `sglang serve --attention-backend msa` server on a random-weight model built here (no download:
`--shape smollm2-135m` is SmolLM2-135M's architecture, the embedded model of the CPU results, with
tests/tiny_models.py's 512-token tokenizer; `--shape tiny` is the 2-layer test model, for a smoke
run on the CPU engine). One memory (`device` placement) is filled with seeded synthetic documents
(benchmarks/serving.py's generator) in steps up to `--memory-tokens`; the server's defaults for a
training-free model otherwise (`memory_content` full, top-16 documents, upper half routed).

- decode: the same kind of prompt through `/generate` (plain) and `/v1/memories/bench/generate`
  (memory attached), greedy, `--new-tokens` tokens, `--batch` requests at once; decode tok/s per
  request as SGLang measures it (`meta_info.decode_throughput`, with `--enable-metrics`), median
  over requests and `--repeats`; the ratio memory / plain is the kernels issue's target (>= 0.9).
  Measured after the first step and again at the largest size reached. Every prompt differs, so
  no prefix-cache hit favours the plain requests (memory requests never use the prefix cache).
- time to first token: SGLang's `first_token_latency` of a 1-token answer with the memory
  attached (and plain, for reference), median of `--repeats`, after each step (the client's
  latency too); ingestion tokens/s per step.
- the whole run keeps to `--budget-s`: it stops growing the memory when the next step would not
  fit (the JSON then says which size was reached) instead of being killed mid-way.

    python3 benchmarks/gpu_serve_bench.py --out $OUT/serve_bench.json [--budget-s 200]
        [--memory-tokens 1048576] [--shape smollm2-135m|tiny] [--batch 1,8] [--device cpu (smoke run)]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serving import documents  # noqa: E402  (benchmarks/ is this script's directory)

from sglang_msa.server_process import default_device, start_server  # noqa: E402

SHAPES = {  # Llama architectures; vocabulary: the tokenizer's
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=False),
}
PROMPT = "Ticket {}. Which document mentions the copper lantern and the silver harbor? Answer briefly."
_tickets = iter(range(1000, 10**9))  # every request's prompt differs: no prefix-cache hit shortens a prefill


def build_model(shape: str, out_dir: Path, dtype: str) -> Path:
    """A random-weight Llama of `shape` with tests/tiny_models.py's tokenizer (built, not downloaded)."""
    import transformers
    from tiny_models import build_tokenizer, save_random_model

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192,
                                      rms_norm_eps=1e-5, eos_token_id=eos, bos_token_id=eos, pad_token_id=0,
                                      dtype=dtype, **SHAPES[shape])
    return save_random_model(config, tokenizer, out_dir, seed=0, weight_std=0.05, dtype=dtype)


def generate(url: str, memory: str | None, new_tokens: int) -> dict:
    """One greedy request of exactly `new_tokens` tokens; its server-side timings (SGLang's
    meta_info with --enable-metrics: first_token_latency, decode_throughput) and client latency."""
    path = f"/v1/memories/{memory}/generate" if memory else "/generate"
    started = time.perf_counter()
    response = requests.post(f"{url}{path}", json={
        "text": PROMPT.format(next(_tickets)),
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
    }, timeout=600)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    body = response.json()
    if len(body["output_ids"]) != new_tokens:
        raise RuntimeError(f"{path} produced {len(body['output_ids'])} tokens, asked {new_tokens}")
    meta = body["meta_info"]
    wanted = ["first_token_latency"] + (["decode_throughput"] if new_tokens > 1 else [])
    missing = [key for key in wanted if key not in meta]
    if missing:
        raise RuntimeError(f"{path}: meta_info lacks {missing} (the server needs --enable-metrics)")
    return {"client_s": elapsed, **{key: meta[key] for key in wanted}}


def measure_decode(url: str, memory: str, batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    """Per-request decode tok/s as SGLang measures it (tokens after the first / time after the
    first), `batch` requests at once, median over requests and repeats."""
    rows = []
    for batch in batches:
        row = {"batch": batch, "new_tokens": new_tokens}
        for name, target in (("plain", None), ("memory", memory)):
            rates = []
            for _ in range(repeats):
                with ThreadPoolExecutor(max_workers=batch) as pool:
                    runs = [pool.submit(generate, url, target, new_tokens) for _ in range(batch)]
                    rates += [run.result()["decode_throughput"] for run in runs]
            row[f"{name}_decode_tok_s"] = statistics.median(rates)
        row["memory_over_plain"] = row["memory_decode_tok_s"] / row["plain_decode_tok_s"]
        rows.append(row)
        print(json.dumps({"decode": row}), flush=True)
    return rows


def measure_ttft(url: str, memory: str, repeats: int) -> dict:
    """Time to first token (SGLang's first_token_latency: request received to first token) of a
    1-token answer with the memory attached and plain, medians; and the client's latency."""
    out = {}
    for name, target in (("memory", memory), ("plain", None)):
        runs = [generate(url, target, 1) for _ in range(repeats)]
        out[f"{name}_ttft_s"] = statistics.median(r["first_token_latency"] for r in runs)
        out[f"{name}_client_latency_s"] = statistics.median(r["client_s"] for r in runs)
    return out


def run(args, result: dict, save) -> None:
    """Fills `result`, calling save() after each measurement (a run cut short keeps what it had)."""
    deadline = time.monotonic() + args.budget_s
    started = time.monotonic()
    device = default_device()
    if device != args.device:
        raise SystemExit(f"asked for --device {args.device}, but this machine offers {device} (no CUDA "
                         "device for this Python); --device cpu is a smoke run on SGLang's CPU engine")
    work = Path(tempfile.mkdtemp(prefix="gpu-serve-bench-"))  # `gpu_carry.py reap` finds servers by it
    try:
        _serve_and_measure(args, result, save, work, device, deadline, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _serve_and_measure(args, result, save, work: Path, device: str, deadline: float, started: float) -> None:
    model = build_model(args.shape, work / f"model-{args.shape}", args.dtype)
    options = {"max_document_tokens": 4096, "memory_budget_mb": args.memory_budget_mb}
    server_args = ["--max-total-tokens", str(args.max_total_tokens), "--dtype", args.dtype,
                   "--enable-metrics", "--msa-config", json.dumps(options), "--log-level", "warning"]
    result.update({"device": device, "shape": args.shape, "dtype": args.dtype, "options": options,
                   "machine": platform.platform(), "target_memory_tokens": args.memory_tokens, "steps": []})
    if device == "cuda":
        import torch

        result["card"] = torch.cuda.get_device_name()
        result["torch"] = torch.__version__
    log_path = Path(args.log or work / "bench-server.log")
    with start_server(model, "msa", extra_args=server_args, log_path=log_path, startup_timeout_s=300,
                      device=device) as server:
        url = server.base_url
        result["setup_s"] = time.monotonic() - started
        requests.post(f"{url}/v1/memories", json={"memory_id": "bench", "placement": "device"},
                      timeout=60).raise_for_status()
        steps, stored, seed, decode_done = result["steps"], 0, 0, False
        milestones = [m for m in args.steps if m < args.memory_tokens] + [args.memory_tokens]
        rate = None
        for milestone in milestones:
            if rate is not None:  # will the step fit, leaving time for its measurements?
                needed = (milestone - stored) / rate + args.reserve_s
                if time.monotonic() + needed > deadline:
                    result["stopped_by_budget"] = f"next step to {milestone} tokens needs ~{needed:.0f} s"
                    break
            ingest_s, ingest_tokens = 0.0, 0
            while stored < milestone:
                if ingest_tokens and time.monotonic() + args.reserve_s > deadline:  # the estimate was off
                    result["stopped_by_budget"] = f"ingestion toward {milestone} tokens stopped at {stored}"
                    break
                batch = documents(args.docs_per_request, args.doc_words, seed)
                seed += 1
                began = time.perf_counter()
                response = requests.post(f"{url}/v1/memories/bench/documents",
                                         json={"documents": [{"text": t} for t in batch]}, timeout=1800)
                response.raise_for_status()
                ingest_s += time.perf_counter() - began
                added = sum(d["num_tokens"] for d in response.json()["documents"])
                ingest_tokens += added
                stored += added
            if not ingest_tokens:  # the last request already went past this step
                continue
            rate = ingest_tokens / ingest_s
            info = requests.get(f"{url}/v1/memories/bench", timeout=60).json()
            step = {"memory_tokens": info["tokens"], "documents": info["documents"], "ingest_tok_s": rate,
                    "device_bytes_per_token": info["bytes"]["device"] / info["tokens"],
                    **measure_ttft(url, "bench", args.repeats)}
            steps.append(step)
            result["reached_memory_tokens"] = step["memory_tokens"]
            print(json.dumps({"step": step}), flush=True)
            save()
            if not decode_done:  # the kernels issue's target first, whatever the budget
                result["decode_first_step"] = measure_decode(url, "bench", args.batch, args.new_tokens,
                                                             args.repeats)
                decode_done = True
                save()
            if "stopped_by_budget" in result:
                break
        if len(steps) > 1 and time.monotonic() + args.reserve_s < deadline:
            result["decode_largest_step"] = measure_decode(url, "bench", args.batch, args.new_tokens,
                                                           args.repeats)
        result["server_info_attention_backend"] = requests.get(f"{url}/get_server_info",
                                                               timeout=30).json().get("attention_backend")
    result["total_s"] = time.monotonic() - started
    result["complete"] = True


def print_summary(result: dict) -> None:
    print(f"\n{result.get('card', result.get('device'))}, {result.get('shape')} ({result.get('dtype')}, "
          "random weights)")
    for key in ("decode_first_step", "decode_largest_step"):
        for row in result.get(key, []):
            verdict = "met" if row["memory_over_plain"] >= 0.9 else "MISSED"
            print(f"decode {key.split('_')[1]:>7} step, batch {row['batch']:>2}: "
                  f"plain {row['plain_decode_tok_s']:8.1f} tok/s, "
                  f"memory {row['memory_decode_tok_s']:8.1f} tok/s, "
                  f"ratio {row['memory_over_plain']:.2f} (target >= 0.9: {verdict})")
    print(f"{'memory tokens':>13} {'docs':>6} {'ingest tok/s':>12} {'dev B/tok':>9} {'TTFT mem s':>10} "
          f"{'TTFT plain s':>12}")
    for step in result.get("steps", []):
        print(f"{step['memory_tokens']:>13} {step['documents']:>6} {step['ingest_tok_s']:>12.0f} "
              f"{step['device_bytes_per_token']:>9.0f} {step['memory_ttft_s']:>10.3f} "
              f"{step['plain_ttft_s']:>12.3f}")
    if "stopped_by_budget" in result:
        print("stopped by the time budget:", result["stopped_by_budget"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON result")
    parser.add_argument("--log", type=Path, help="the server's log (default: in a temporary directory)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke run on SGLang's CPU engine (use --shape tiny and small sizes)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--memory-tokens", type=int, default=1_048_576)
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[65_536, 262_144],
                        help="memory sizes measured on the way to --memory-tokens")
    parser.add_argument("--doc-words", type=int, default=180, help="~1K tokens with the 512-token vocabulary")
    parser.add_argument("--docs-per-request", type=int, default=64)
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-budget-mb", type=int, default=16384)
    parser.add_argument("--max-total-tokens", type=int, default=65536)
    parser.add_argument("--budget-s", type=float, default=200.0, help="the whole run, server start included")
    parser.add_argument("--reserve-s", type=float, default=25.0, help="kept for a step's measurements")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a timeout's SIGINT stops the server cleanly
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"complete": False}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    try:
        run(args, result, save)
    finally:
        save()
        print_summary(result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
