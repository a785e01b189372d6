"""Command line: a thin layer that builds configs, calls the library and writes files.

``main(argv) -> int`` so tests run the CLI in-process. Bad input is one line on stderr and exit code 2. Ctrl-C and
SIGTERM stop any command the same way: its files roll back, one line, exit 130 or 143
(:mod:`headlens.io.interrupts`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Sequence

from headlens import __version__
from headlens.cli.common import Parser, with_flags
from headlens.errors import HeadlensError
# Flags naming one output file, checked before the command runs (a directory or an unwritable place: exit 2).
FILE_FLAGS = (("json", "--json"), ("plot_path", "--plot-path"))
# Parameters naming a directory the command writes whole and new (compress's model), checked before it runs: absent
# or empty, writable, holding none of the command's other outputs. They join the output set and its lock.
NEW_DIR_PARAMS = ("save_model",)

COMMANDS = ("ov", "sphere", "sweep", "trajectory", "compress", "generate", "router", "toy", "diagram", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="headlens", description="Open up the attention heads and the residual stream of "
                                                  "transformer checkpoints.")
    parser.add_argument("--version", action="version", version=f"headlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    import importlib

    for name in COMMANDS:  # each subcommand's module adds its own parser
        importlib.import_module(f"headlens.cli.{name}").add_parser(sub)
    return parser


def new_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """{parameter: directory} of the :data:`NEW_DIR_PARAMS` the command was given."""
    return {p: Path(v) for p, v in ((p, getattr(args, p, None)) for p in NEW_DIR_PARAMS) if isinstance(v, str) and v}


def output_dirs(args: argparse.Namespace, new: bool = True) -> list[Path]:
    """The directories a command writes into, locked from its start: ``--out-dir`` (unless the command's
    ``writes_out_dir(args)`` says this run writes nothing there), those of ``--json``/``--plot-path``, toy's ``--out``
    (a directory itself when it names one) and, with ``new``, those of :data:`NEW_DIR_PARAMS`."""
    from headlens.io.files import is_dir_target

    writes_out_dir = getattr(args, "writes_out_dir", None)  # a command that writes there only when asked to
    use = getattr(args, "out_dir", None) and (writes_out_dir is None or writes_out_dir(args))
    dirs = [Path(args.out_dir)] if use else []
    dirs += list(new_dirs(args).values()) if new else []
    for attr, _ in FILE_FLAGS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            dirs.append(Path(value).parent)
    out = getattr(args, "out", None)
    if isinstance(out, str) and out:
        dirs.append(Path(out) if is_dir_target(out) else Path(out).parent)
    return dirs


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, creating nothing, output places the command could not write (one-line HeadlensError)."""
    from headlens.io.files import check_file_target, check_new_dir, check_writable_dir

    for attr, flag in FILE_FLAGS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            check_file_target(value, flag)
    new = new_dirs(args)
    for param, path in new.items():
        check_new_dir(path, param)
    for d in output_dirs(args, new=False):
        check_writable_dir(d)
        for param, path in new.items():  # a model directory holds the model only
            if path.resolve() == d.resolve() or path.resolve() in d.resolve().parents:
                raise HeadlensError(f"`{param}` {path} would also hold the command's other files ({d}): give it a "
                                    "directory of its own")


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Run the command inside its output set (:mod:`headlens.io.output_set`): its output directories are locked
    from the start, and its files appear together at the end or not at all."""
    from headlens.io.output_set import output_set

    check_outputs(args)
    command = " ".join(x for x in (args.command, getattr(args, "toy_command", None)) if x)
    words = sys.argv[1:] if argv is None else list(argv)
    with output_set(command, output_dirs(args), argv=" ".join(["headlens", *words])):
        return int(args.func(args))


def _report(args: argparse.Namespace | None, exc: BaseException) -> int:
    """The one stderr line and the exit code of a command that ended by ``exc``; re-raises what is not ours to
    report (a bug keeps its traceback)."""
    from headlens.io import interrupts

    command = getattr(args, "command", None)
    if isinstance(exc, HeadlensError):
        print(f"headlens {command}: error: {with_flags(str(exc), command or '')}", file=sys.stderr)
        return 2
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (interrupts.Terminated)
        signum = interrupts.signal_of(exc)
        what = "terminated" if signum == signal.SIGTERM else "interrupted"
        if isinstance(exc, interrupts.AfterWriting):
            print(f"headlens: {what} after writing: every file of this run is complete", file=sys.stderr)
        else:
            print(f"headlens: {what}", file=sys.stderr)
        return 128 + signum
    if isinstance(exc, BrokenPipeError):  # e.g. `headlens ... | head`: the reader left, nothing is wrong
        import os

        sys.stdout = open(os.devnull, "w")
        return 0
    raise exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run headlens with ``argv`` (default: the command line); returns the exit code. Called without ``argv`` it
    is the program itself: once the outcome is decided, a late Ctrl-C or SIGTERM is ignored while the interpreter
    shuts down, so it cannot end the process with no word (nor turn a written run into a signal's exit code)."""
    from headlens.io import interrupts

    program = argv is None
    restore = interrupts.install()
    args = None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
            code = int(exc.code or 0)
        else:
            if args.command is None:
                names = ", ".join(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
                print(f"headlens: error: choose a command: {names} (see headlens --help)", file=sys.stderr)
                code = 2
            else:
                code = _run(args, argv)
                late = interrupts.late()  # came after the files were in place: they stopped nothing
                if late:
                    code = _report(args, interrupts.AfterWriting(late[0]))
    except BaseException as exc:  # noqa: BLE001 (_report re-raises what it does not report)
        if program:
            interrupts.ignore_from_now()
        code = _report(args, exc)
    finally:
        if program:
            interrupts.ignore_from_now()
        else:
            restore()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
