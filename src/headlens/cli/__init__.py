"""Command line: a thin layer that builds configs, calls the library and writes files.

``main(argv) -> int`` so tests run the CLI in-process. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from headlens import __version__
from headlens.cli.common import Parser, with_flags
from headlens.errors import HeadlensError
# Flags naming one output file, checked before the command runs (a directory or an unwritable place: exit 2).
FILE_FLAGS = (("json", "--json"), ("plot_path", "--plot-path"))

COMMANDS = ("ov", "sphere", "sweep", "compress", "router", "toy", "diagram", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="headlens", description="Open up the attention heads and the residual stream of "
                                                  "transformer checkpoints.")
    parser.add_argument("--version", action="version", version=f"headlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    import importlib

    for name in COMMANDS:  # each subcommand's module adds its own parser
        importlib.import_module(f"headlens.cli.{name}").add_parser(sub)
    return parser


def output_dirs(args: argparse.Namespace) -> list[Path]:
    """The directories a command writes into: ``--out-dir``, those of ``--json``/``--plot-path``, and toy's
    ``--out`` (a directory itself when it names one)."""
    from headlens.io.files import is_dir_target

    dirs = [Path(args.out_dir)] if getattr(args, "out_dir", None) else []
    for attr, _ in FILE_FLAGS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            dirs.append(Path(value).parent)
    out = getattr(args, "out", None)
    if isinstance(out, str) and out:
        dirs.append(Path(out) if is_dir_target(out) else Path(out).parent)
    return dirs


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Run the command inside its output set (:mod:`headlens.io.output_set`): its files appear together at
    the end or not at all, and its output directories are locked while it writes them."""
    from headlens.io.files import check_file_target
    from headlens.io.output_set import output_set

    for attr, flag in FILE_FLAGS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            check_file_target(value, flag)
    command = " ".join(x for x in (args.command, getattr(args, "toy_command", None)) if x)
    words = sys.argv[1:] if argv is None else list(argv)
    with output_set(command, output_dirs(args), argv=" ".join(["headlens", *words])):
        return int(args.func(args))


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
        return _run(args, argv)
    except HeadlensError as exc:
        print(f"headlens {args.command}: error: {with_flags(str(exc), args.command)}", file=sys.stderr)
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
