"""``headlens toy``'s words: every flag of every action has a help line that states its default (checked against
the library's own defaults), and ``toy cluster`` names its files in the words ``headlens sphere`` uses, not by
attribute names."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from headlens.cli import build_parser, main
from headlens.report.sphere import SphereFiles
from headlens.toy.cluster import ClusterConfig
from headlens.toy.stack import Planting, ToyConfig
from headlens.toy.traces import TraceInputs


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _toy_actions() -> dict[str, argparse.ArgumentParser]:
    return _subparsers(_subparsers(build_parser())["toy"])


def test_every_toy_action_is_covered():
    assert set(_toy_actions()) == {"create", "trace", "cluster", "run"}


@pytest.mark.parametrize("name", ["create", "trace", "cluster", "run"])
def test_every_flag_has_help(name):
    parser = _toy_actions()[name]
    for action in parser._actions:
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
            (name, action.option_strings)
        default = action.default
        if isinstance(default, (int, float, str)) and not isinstance(default, bool) and action.dest != "help":
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"default {shown}" in action.help, (name, action.option_strings, action.help)


# The library's defaults behind the flags whose argparse default is None or a copy: the help must state them.
LIBRARY_DEFAULTS = {
    ("cluster", "--tokens"): ClusterConfig().tokens, ("cluster", "--dim"): ClusterConfig().dim,
    ("cluster", "--depth"): ClusterConfig().layers, ("cluster", "--beta"): ClusterConfig().beta,
    ("cluster", "--seed"): ClusterConfig().seed,
    ("create", "--plant-decay"): Planting(kind="geometric").decay,
    ("create", "--d-model"): ToyConfig().d_model, ("create", "--heads"): ToyConfig().n_heads,
    ("create", "--head-dim"): ToyConfig().head_dim, ("create", "--layers"): ToyConfig().n_layers,
    ("trace", "--tokens"): TraceInputs().tokens, ("trace", "--input-decay"): TraceInputs().input_decay,
    ("trace", "--input-seed"): TraceInputs().input_seed, ("trace", "--inputs"): TraceInputs().inputs,
}


@pytest.mark.parametrize("key", sorted(LIBRARY_DEFAULTS))
def test_help_states_the_library_default(key):
    name, flag = key
    (action,) = [a for a in _toy_actions()[name]._actions if flag in a.option_strings]
    value = LIBRARY_DEFAULTS[key]
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    assert re.search(rf"\(default {re.escape(shown)}[;)]", action.help), (key, action.help)


def test_cluster_names_files_in_sphere_words(tmp_path, capsys):
    assert main(["toy", "cluster", "--tokens", "8", "--dim", "4", "--depth", "2", "--out-dir", str(tmp_path / "c")]) \
        == 0
    out = capsys.readouterr().out
    saved = [line for line in out.splitlines() if line.startswith("saved ")]
    assert len(saved) == 5
    sphere_words = {line.split(" -> ")[0] for line in SphereFiles(*(Path(f"f{i}") for i in range(6))).lines()}
    for line in saved:
        what, path = line.split(" -> ")
        assert "_" not in what, line  # metrics_png, metrics_json: attribute names, not words
        assert what in sphere_words, line
        assert Path(path).exists(), line
    assert not re.search(r"\b[a-z]+_(png|json|csv|gif|html)\b", out)
