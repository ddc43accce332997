"""Load a folder of notes with the `sglang-msa` CLI, ask questions over it, and read the
plugin's series on `/metrics` (shown when the server runs with `--enable-metrics`).

    sglang serve --model-path <dir> --attention-backend msa --enable-metrics &
    python examples/load_notes.py --url http://127.0.0.1:30000 [--notes examples/notes]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import requests

QUESTIONS = ("When is the standup?", "Who is on call this week?", "Where do I park?")


def sglang_msa(*args: str) -> str:
    """Run the `sglang-msa` command (as `python -m sglang_msa.cli`) and return what it printed."""
    result = subprocess.run([sys.executable, "-m", "sglang_msa.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--memory", default="notes")
    parser.add_argument("--notes", type=Path, default=Path(__file__).parent / "notes")
    args = parser.parse_args()

    print(sglang_msa("ingest", "--url", args.url, "--memory", args.memory, str(args.notes)))
    for question in QUESTIONS:
        print(f"Q: {question}")
        print(sglang_msa("ask", "--url", args.url, "--memory", args.memory, "--max-tokens", "32",
                         "--inject-documents", "2", question))
    metrics = requests.get(f"{args.url}/metrics", timeout=30)
    series = [line for line in metrics.text.splitlines() if line.startswith("sglang_msa_")]
    print("metrics:" if series else "metrics: off (start the server with --enable-metrics)")
    for line in series:
        print("  " + line)


if __name__ == "__main__":
    main()
