"""Entry point of the ``medmeta`` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medmeta_plugin import __version__

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Build the ``medmeta`` argument parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(prog="medmeta", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medmeta {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``medmeta`` command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
