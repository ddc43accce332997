"""`make demo`: prepare the embedded model, start `sglang serve --attention-backend msa`, ask.

Stage of the project: the `msa` backend serves requests without memory exactly like SGLang's
dense attention. Memories (load documents, route, answer with sources) join this demo as the
serving core lands; see README.md for the status of each part of the method.
"""

from __future__ import annotations

import argparse
import logging
import time

import requests

from sglang_msa.models.embedded import prepare_embedded_model
from sglang_msa.server_process import start_server

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model_path = args.model_path or prepare_embedded_model()
    print(f"model: {model_path}")
    print("starting: sglang serve --attention-backend msa ...", flush=True)
    with start_server(model_path, "msa", extra_args=["--max-total-tokens", "8192"]) as server:
        print(f"server healthy in {server.started_in_s:.1f}s at {server.base_url}\n")
        for question in QUESTIONS:
            started = time.monotonic()
            response = requests.post(
                f"{server.base_url}/v1/chat/completions",
                json={
                    "model": "default",
                    "messages": [{"role": "user", "content": question}],
                    "temperature": 0,
                    "max_tokens": args.max_new_tokens,
                },
                timeout=120,
            )
            response.raise_for_status()
            answer = response.json()["choices"][0]["message"]["content"].strip()
            print(f"Q: {question}\nA: {answer}   ({time.monotonic() - started:.2f}s)\n")


if __name__ == "__main__":
    main()
