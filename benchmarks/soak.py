"""Soak: a mixed load held for a while; throughput, latency percentiles and memory over time.

Starts `sglang serve --attention-backend msa` on the embedded SmolLM2-135M-Instruct, creates
--memories memories, then for --duration seconds runs --readers chat clients (random memory,
short answers) and --writers clients that add a document and delete an older one (so the
memories stay the same size). Every second it samples the resident memory of the server's
processes (launcher, scheduler, detokenizer). Prints a table, writes JSON and a PNG plot.

    .venv/bin/python benchmarks/soak.py [--duration 300] [--readers 16] [--writers 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import statistics
import threading
import time
from pathlib import Path

import psutil
import requests

from sglang_msa.models.embedded import prepare_embedded_model
from sglang_msa.server_process import start_server

WORDS = ("river mountain lantern garden silver quiet market harbor winter meadow copper forest engine "
         "violet thunder archive window pepper canyon orchard velvet signal marble feather compass").split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def server_rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of the server's processes (launcher/HTTP, scheduler, detokenizer), MiB."""
    root = psutil.Process(pid)
    by_process: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            name = "http" if process.pid == pid else process.name().removeprefix("sglang::")
            by_process[name] = by_process.get(name, 0.0) + round(process.memory_info().rss / 2**20, 1)
        except psutil.Error:
            pass
    return by_process


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--memories", type=int, default=4)
    parser.add_argument("--documents", type=int, default=200, help="documents per memory at the start")
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--log-level", default="warning", help="the server's (info shows its batches)")
    parser.add_argument("--server-args", default="", help="more `sglang serve` flags, one string")
    parser.add_argument("--out", default="benchmarks/results/soak")
    args = parser.parse_args()

    model = args.model_path or prepare_embedded_model()
    options = {"top_k_docs": 4, "memory_content": "full", "memory_budget_mb": 8192}
    server_args = ["--max-total-tokens", "65536", "--msa-config", json.dumps(options), "--log-level", args.log_level,
                   *shlex.split(args.server_args)]
    rng = random.Random(0)
    with start_server(model, "msa", extra_args=server_args, startup_timeout_s=600) as server:
        url = server.base_url
        live: dict[str, list[str]] = {}
        for m in range(args.memories):
            memory_id = f"soak-{m}"
            requests.post(f"{url}/v1/memories", json={"memory_id": memory_id}, timeout=60).raise_for_status()
            docs = [{"doc_id": f"{memory_id}-{i}", "text": text(rng, 120)} for i in range(args.documents)]
            requests.post(f"{url}/v1/memories/{memory_id}/documents", json={"documents": docs},
                          timeout=3600).raise_for_status()
            live[memory_id] = [d["doc_id"] for d in docs]
        lock = threading.Lock()
        latencies: dict[str, list[float]] = {"query": [], "add": [], "delete": []}
        timeline: list[tuple[str, float, float]] = []  # (operation, started at s, latency s)
        errors: list[str] = []
        deadline = time.monotonic() + args.duration
        started, began_at = time.monotonic(), time.perf_counter()

        def timed(kind: str, method: str, path: str, **payload) -> None:
            began = time.perf_counter()
            response = requests.request(method, f"{url}{path}", timeout=600, **payload)
            elapsed = time.perf_counter() - began
            with lock:
                if response.status_code >= 400:
                    errors.append(f"{kind}: {response.status_code} {response.text[:120]}")
                else:
                    latencies[kind].append(elapsed)
                    timeline.append((kind, round(began - began_at, 3), round(elapsed, 3)))

        def reader(index: int) -> None:
            local = random.Random(index)
            while time.monotonic() < deadline:
                memory_id = local.choice(list(live))
                timed("query", "POST", f"/v1/memories/{memory_id}/chat/completions", json={
                    "messages": [{"role": "user", "content": f"What is the {local.choice(WORDS)}?"}],
                    "max_tokens": 8, "temperature": 0})

        def writer(index: int) -> None:
            local = random.Random(1000 + index)
            serial = 0
            while time.monotonic() < deadline:
                memory_id = local.choice(list(live))
                doc_id = f"{memory_id}-w{index}-{serial}"
                serial += 1
                timed("add", "POST", f"/v1/memories/{memory_id}/documents",
                      json={"documents": [{"doc_id": doc_id, "text": text(local, 120)}]})
                with lock:
                    live[memory_id].append(doc_id)
                    oldest = live[memory_id].pop(0)
                timed("delete", "DELETE", f"/v1/memories/{memory_id}/documents/{oldest}")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(args.readers)]
        threads += [threading.Thread(target=writer, args=(i,)) for i in range(args.writers)]
        for thread in threads:
            thread.start()
        samples = []
        while any(thread.is_alive() for thread in threads):
            by_process = server_rss_mb(server.process.pid)
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(sum(by_process.values()), 1),
                            "rss_mb_by_process": by_process, "queries": len(latencies["query"])})
            time.sleep(1.0)
        elapsed = time.monotonic() - started

    summary = {kind: {"count": len(values), "per_s": len(values) / elapsed,
                      "p50_s": percentile(values, 0.5), "p99_s": percentile(values, 0.99),
                      "max_s": max(values, default=None)}
               for kind, values in latencies.items()}
    rss = [s["rss_mb"] for s in samples]
    drift = statistics.fmean(rss[-10:]) - statistics.fmean(rss[:10]) if len(rss) >= 20 else None
    print(f"\n{'operation':>9} {'count':>6} {'per s':>7} {'p50 s':>7} {'p99 s':>7} {'max s':>7}")
    for kind, row in summary.items():
        fmt = lambda v: f"{v:.3f}" if v is not None else "n/a"  # noqa: E731
        print(f"{kind:>9} {row['count']:>6} {row['per_s']:>7.2f} {fmt(row['p50_s']):>7} {fmt(row['p99_s']):>7} "
              f"{fmt(row['max_s']):>7}")
    growth = {name: round(samples[-1]["rss_mb_by_process"].get(name, 0) - mb, 1)
              for name, mb in samples[0]["rss_mb_by_process"].items()}
    print(f"server RSS: start {rss[0]:.0f} MiB, max {max(rss):.0f} MiB, end {rss[-1]:.0f} MiB "
          f"(growth by process: {growth}); "
          f"drift (mean of last 10 s - first 10 s): {drift if drift is None else round(drift, 1)} MiB; errors: {len(errors)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "machine": platform.platform(), "model": str(model), "options": options, "args": vars(args),
        "elapsed_s": elapsed, "summary": summary, "rss_drift_mb": drift, "errors": errors[:50],
        "samples": samples, "timeline": timeline}, indent=2))
    plot(samples, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(samples: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, rss_axis = plt.subplots(figsize=(8, 4))
    times = [s["t_s"] for s in samples]
    rss_axis.plot(times, [s["rss_mb"] for s in samples], label="server RSS (MiB)")
    rss_axis.set_xlabel("seconds")
    rss_axis.set_ylabel("MiB")
    queries_axis = rss_axis.twinx()
    queries_axis.plot(times, [s["queries"] for s in samples], color="tab:orange", label="queries answered")
    queries_axis.set_ylabel("queries")
    figure.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
