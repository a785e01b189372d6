"""Command line: a thin layer that builds configs, calls the library and writes files.

``main(argv) -> int`` so tests run the CLI in-process. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from headlens import __version__
from headlens.cli.common import Parser
from headlens.errors import HeadlensError, as_flags

# Library parameters whose flag is not spelled --<name with dashes>.
FLAG_NAMES = {"ks": "--k"}

COMMANDS = ("ov", "sphere", "sweep", "router", "toy", "diagram")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="headlens", description="Open up the attention heads and the residual stream of "
                                                  "transformer checkpoints.")
    parser.add_argument("--version", action="version", version=f"headlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    import importlib

    for name in COMMANDS:  # each subcommand's module adds its own parser
        importlib.import_module(f"headlens.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        names = ", ".join(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
        print(f"headlens: error: choose a command: {names} (see headlens --help)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except HeadlensError as exc:
        print(f"headlens {args.command}: error: {as_flags(str(exc), FLAG_NAMES)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headlens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `headlens ... | head`: the reader left, nothing is wrong
        import os

        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
