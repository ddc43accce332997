"""`make demo`: the embedded model behind `sglang serve --attention-backend msa`, a demo memory
loaded through the memory API, and questions answered with the documents each one retrieved.

The embedded model (SmolLM2-135M-Instruct) was not trained for MSA: it routes with the router
adapter shipped for it (`router_adapter: "embedded"`, fitted on the frozen model by
`sglang-msa calibrate`), reads the selected documents at full resolution, and the original text
of the top-ranked document is injected before each question (a 135M model copies from what is
in front of it; given a second, unrelated document it sometimes answers from that one).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from importlib import resources

import requests

from sglang_msa.models.embedded import prepare_embedded_model
from sglang_msa.server_process import start_server

DEMO_OPTIONS = {"top_k_docs": 3, "memory_content": "full", "router_adapter": "embedded"}
INJECT_DOCUMENTS = 1  # the original text of the top-ranked document goes before the question


def load_demo_memory() -> dict:
    return json.loads(resources.files("sglang_msa.data").joinpath("demo_memory.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    demo = load_demo_memory()
    model_path = args.model_path or prepare_embedded_model()
    print(f"model: {model_path}")
    print("starting: sglang serve --attention-backend msa ...", flush=True)
    server_args = ["--max-total-tokens", "16384", "--msa-config", json.dumps(DEMO_OPTIONS)]
    with start_server(model_path, "msa", extra_args=server_args) as server:
        url = server.base_url
        print(f"server healthy in {server.started_in_s:.1f}s at {url}\n")
        requests.post(f"{url}/v1/memories", json={"memory_id": demo["memory_id"]}, timeout=30).raise_for_status()
        started = time.monotonic()
        added = requests.post(f"{url}/v1/memories/{demo['memory_id']}/documents",
                              json={"documents": demo["documents"]}, timeout=600)
        added.raise_for_status()
        info = requests.get(f"{url}/v1/memories/{demo['memory_id']}", timeout=30).json()
        print(f"memory {demo['memory_id']!r}: {info['documents']} documents, {info['tokens']} tokens, "
              f"{info['bytes']['device']} bytes, ingested in {time.monotonic() - started:.2f}s\n")
        texts = {doc["doc_id"]: doc["text"] for doc in demo["documents"]}
        for question in demo["questions"]:
            started = time.monotonic()
            response = requests.post(
                f"{url}/v1/memories/{demo['memory_id']}/chat/completions",
                json={"messages": [{"role": "user", "content": question}], "temperature": 0,
                      "max_tokens": args.max_new_tokens, "msa": {"inject_documents": INJECT_DOCUMENTS}},
                timeout=300,
            )
            response.raise_for_status()
            reply = response.json()
            answer = reply["choices"][0]["message"]["content"].strip()
            print(f"Q: {question}\nA: {answer}   ({time.monotonic() - started:.2f}s)")
            for rank, doc in enumerate(reply["msa"]["injected"], 1):
                print(f"   retrieved #{rank}: [{doc['doc_id']}] {texts[doc['doc_id']]}")
            print()


if __name__ == "__main__":
    main()
