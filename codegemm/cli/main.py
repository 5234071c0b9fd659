"""Entry point of the ``codegemm`` console script.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``;
its parser sets ``func`` to the function that runs it. Modules are imported
here so ``--help`` lists every subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from codegemm.errors import CodeGEMMError

SUBCOMMANDS = ("quantize", "eval", "generate", "bench", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codegemm",
        description="Quantize Hugging Face causal LMs to 2-bit codebooks and run them fast with Psumbook kernels.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"codegemm.cli.{name}_cmd").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CodeGEMMError as err:
        logging.getLogger("codegemm").error("%s: %s", type(err).__name__, err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
