"""Load a real-text corpus through `sglang-msa ingest` into a server on the embedded model:
ingestion tokens/s, the server's peak RSS, and the time to first answer while the load runs.

The corpus is plain text that any machine with this project's venv has: the package
descriptions (`*.dist-info/METADATA`) of the installed Python packages and the license texts
under /usr/share/doc, one file per source, until `--tokens` tokens (counted with the model's
tokenizer). Usage:

    python benchmarks/corpus_load.py --tokens 250000 --out benchmarks/results/corpus_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
from soak import server_rss_mb  # noqa: E402

from sglang_msa.models.embedded import prepare_embedded_model  # noqa: E402
from sglang_msa.server_process import start_server  # noqa: E402

QUESTION = "Which license allows redistribution with attribution?"


def sources() -> list[Path]:
    packages = sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info/METADATA"))
    return packages + sorted(Path("/usr/share/doc").glob("*/copyright"))


def build_corpus(root: Path, target_tokens: int, tokenizer) -> tuple[int, int]:
    """Write text files under `root` until `target_tokens`; (files, tokens)."""
    root.mkdir(parents=True, exist_ok=True)
    files = tokens = 0
    for source in sources():
        if tokens >= target_tokens:
            break
        try:
            text = source.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError):
            continue
        if not text:
            continue
        name = f"{source.parent.name}.txt"
        (root / name).write_text(text + "\n")
        files += 1
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return files, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="corpus size in the model's tokens")
    parser.add_argument("--corpus-dir", type=Path, default=Path("/tmp/sglang-msa-corpus"))
    parser.add_argument("--ask-after", type=float, default=30.0, help="seconds into the load to ask a question")
    parser.add_argument("--part-tokens", type=int, default=512, help="`ingest --part-tokens`")
    parser.add_argument("--max-seconds", type=float, help="stop the load after this long (then the rate is over "
                        "what was stored)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/corpus_load.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model = prepare_embedded_model()
    files, corpus_tokens = build_corpus(args.corpus_dir, args.tokens, AutoTokenizer.from_pretrained(model))
    print(f"corpus: {files} files, {corpus_tokens:,} tokens under {args.corpus_dir}", flush=True)
    options = {"top_k_docs": 4, "memory_content": "pooled", "memory_budget_mb": 2048}
    server_args = ["--max-total-tokens", "65536", "--msa-config", json.dumps(options), "--log-level", "warning"]
    with start_server(model, "msa", extra_args=server_args, startup_timeout_s=600) as server:
        url = server.base_url
        peak = {"rss_mb": 0.0}
        loading = threading.Event()
        loading.set()

        def sample_rss():
            while loading.is_set():
                by_process = server_rss_mb(server.process.pid)
                if sum(by_process.values()) > peak["rss_mb"]:
                    peak.update(rss_mb=round(sum(by_process.values()), 1), by_process=by_process)
                time.sleep(1.0)

        answer = {}

        def ask_while_loading():
            time.sleep(args.ask_after)
            started = time.monotonic()
            reply = requests.post(f"{url}/v1/memories/corpus/chat/completions", timeout=600, json={
                "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0})
            answer.update(status=reply.status_code, seconds=round(time.monotonic() - started, 2),
                          documents_loaded=requests.get(f"{url}/v1/memories/corpus", timeout=60).json()["documents"])

        threads = [threading.Thread(target=sample_rss), threading.Thread(target=ask_while_loading)]
        for thread in threads:
            thread.start()
        command = [sys.executable, "-m", "sglang_msa.cli", "ingest", "--url", url, "--memory", "corpus",
                   "--part-tokens", str(args.part_tokens), str(args.corpus_dir)]
        started = time.monotonic()
        load = subprocess.Popen(command)
        try:
            completed = load.wait(timeout=args.max_seconds) == 0
        except subprocess.TimeoutExpired:  # stopped: the rate is over what was stored until now
            load.terminate()
            load.wait()
            completed = False
        elapsed = time.monotonic() - started
        info = requests.get(f"{url}/v1/memories/corpus", timeout=60).json()  # a stopped load's job goes on
        load_average = os.getloadavg()
        threads[1].join()
        loading.clear()
        threads[0].join()
    result = {"corpus_files": files, "corpus_tokens": corpus_tokens, "completed": completed,
              "part_tokens": args.part_tokens, "documents": info["documents"],
              "memory_tokens": info["tokens"], "ingest_wall_s": round(elapsed, 1),
              "machine_load_average_1_5_15_min": load_average,
              "tokens_per_s": round(info["tokens"] / elapsed, 1), "peak_server_rss_mb": peak["rss_mb"],
              "peak_rss_by_process_mb": peak.get("by_process"), "answer_while_loading": answer,
              "command": " ".join(["python", *sys.argv]), "server_options": options}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
