"""The command line the kernel check scripts share: a seed (fresh by default), `--gpu` for the
compiled kernels at tiny and MSA-4B shapes, one summary line and the exit status."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch


def run_checks(checks: Callable[[bool, torch.Generator], int]) -> None:
    """Call `checks(gpu, generator)`, which returns its number of failures, and exit with it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("seed", type=int, nargs="?", default=torch.seed() % 2**31)
    parser.add_argument("--gpu", action="store_true", help="tiny and MSA-4B shapes on the GPU (compiled kernels)")
    args = parser.parse_args()
    failures = checks(args.gpu, torch.Generator().manual_seed(args.seed))
    print(f"seed {args.seed}: {failures} failures")
    sys.exit(1 if failures else 0)
