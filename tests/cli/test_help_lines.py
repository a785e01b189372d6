"""Every flag and positional argument of every command and subcommand has a help line."""

from __future__ import annotations

import argparse

from headlens.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + [name])
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), "/".join(action.option_strings) or action.dest, action.help


def test_every_argument_has_help():
    seen = list(_walk(build_parser(), ["headlens"]))
    assert len({cmd for cmd, _, _ in seen}) >= 10  # the commands and the toy subcommands were all walked
    missing = [f"{cmd} {flag}" for cmd, flag, text in seen if not (text and text.strip())]
    assert missing == []
