"""Entry point of the ``medmeta`` console script: one sub-command per module in :mod:`medmeta_plugin.cli`.

Each sub-command module exposes ``add_parser(subparsers)`` and a ``run(args) -> int`` set as the parser's
``func``; the work itself lives in the library, so the CLI stays a thin layer over it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medmeta_plugin import __version__
from medmeta_plugin.cli import commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Build the ``medmeta`` argument parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="medmeta",
        description="medmeta: a meta-learned 3D backbone with few-shot task adapters, for MONAI Label.",
    )
    parser.add_argument("--version", action="version", version=f"medmeta {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in commands.PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``medmeta`` command and return its exit code (2 for invalid input, with the reason)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"medmeta {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
