"""`layers` and `ks` parsing (headlens.selection): what each selection means, every error, and how the CLI
shows the errors (with --layers / --k instead of the library's backticked parameter names)."""

from __future__ import annotations

import pytest

from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.selection import parse_ks, parse_layers

N = 36  # layers, as in Qwen3-4B


# ------------------------------------------------------------------------------------------- parse_layers


@pytest.mark.parametrize("text", [None, "all", " all "])
def test_every_layer(text):
    assert parse_layers(text, N) == list(range(N))


@pytest.mark.parametrize("text,expect", [
    ("7:35", list(range(7, 35))),
    ("7:", list(range(7, N))),
    (":3", [0, 1, 2]),
    (":", list(range(N))),
    ("::", list(range(N))),
    ("::12", [0, 12, 24]),
    ("1:10:3", [1, 4, 7]),
    ("-3:", [33, 34, 35]),
    (":-33", [0, 1, 2]),
    ("-5:-1:2", [31, 33]),
    ("-36:2", [0, 1]),
    ("0:36", list(range(N))),
    (" 2 : 4 ", [2, 3]),
])
def test_slices_as_python_slices_them(text, expect):
    assert parse_layers(text, N) == expect
    parts = [int(p) if p.strip() else None for p in text.split(":")]
    assert expect == list(range(N))[slice(*parts)]  # the written-out expectation is Python's own slice


@pytest.mark.parametrize("text,expect", [("5", [5]), ("1,4,9", [1, 4, 9]), ("9,1,4", [1, 4, 9]),
                                         (" 0 , 35 ", [0, 35]), ("35", [35])])
def test_lists_sorted(text, expect):
    assert parse_layers(text, N) == expect


@pytest.mark.parametrize("text,message", [
    ("1:5:0", "`layers` 1:5:0: the step must be positive"),
    ("5:1:-1", "`layers` 5:1:-1: the step must be positive"),
    ("37:", "`layers` 37:: start 37 is out of range (valid layers are 0..35)"),
    ("-37:", "`layers` -37:: start -37 is out of range (valid layers are 0..35)"),
    (":40", "`layers` :40: stop 40 is out of range (valid layers are 0..35)"),
    ("36", "`layers` 36: layer 36 is out of range (valid layers are 0..35)"),
    ("-1", "`layers` -1: layer -1 is out of range (valid layers are 0..35)"),
    ("1,4,36", "`layers` 1,4,36: layer 36 is out of range (valid layers are 0..35)"),
    ("abc", "`layers` 'abc': use a slice like 7:35, a list like 1,4,9, or all"),
    ("1:2:3:4", "`layers` '1:2:3:4': use a slice like 7:35, a list like 1,4,9, or all"),
    ("1,,2", "`layers` '1,,2' has an empty item: separate the numbers by single commas"),
    ("1,2,", "`layers` '1,2,' has an empty item: separate the numbers by single commas"),
    ("9,1,4,4", "`layers` 9,1,4,4: 4 is given twice"),
    ("", "`layers` '' is empty: use a slice like 7:35, a list like 1,4,9, or all (every layer: all, or leave it out)"),
    ("  ", "`layers` '  ' is empty: use a slice like 7:35, a list like 1,4,9, or all (every layer: all, or leave it "
           "out)"),
    ("1.5", "`layers` '1.5': use a slice like 7:35, a list like 1,4,9, or all"),
    ("a:b", "`layers` 'a:b': use a slice like 7:35, a list like 1,4,9, or all"),
    ("5:5", "`layers` 5:5 selects no layer (valid layers are 0..35)"),
    ("4:2", "`layers` 4:2 selects no layer (valid layers are 0..35)"),
    ("-1:-3", "`layers` -1:-3 selects no layer (valid layers are 0..35)"),
])
def test_layer_errors(text, message):
    with pytest.raises(HeadlensError) as info:
        parse_layers(text, N)
    assert str(info.value) == message


def test_layer_range_follows_the_model():
    assert parse_layers("all", 1) == [0]
    with pytest.raises(HeadlensError, match=r"valid layers are 0\.\.5\)$"):
        parse_layers("6", 6)


# ----------------------------------------------------------------------------------------------- parse_ks


@pytest.mark.parametrize("text,expect", [("8,16,32", [8, 16, 32]), ("32,8,16", [8, 16, 32]), ("4", [4]),
                                         (" 8 , 16 ", [8, 16])])
def test_ks_sorted(text, expect):
    assert parse_ks(text) == expect
    assert parse_ks(text, head_dim=32) == expect


def test_ks_up_to_head_dim():
    assert parse_ks("8,128", head_dim=128) == [8, 128]
    assert parse_ks("1000") == [1000]  # no head_dim: no upper bound


@pytest.mark.parametrize("text,head_dim,message", [
    ("8,200", 128, "`ks` 200 is above head_dim 128: a head's OV circuit has rank <= 128; choose sizes in 1..128"),
    ("129", 128, "`ks` 129 is above head_dim 128: a head's OV circuit has rank <= 128; choose sizes in 1..128"),
    ("0", None, "`ks` '0': latent sizes must be positive integers, e.g. 8,16,32"),
    ("-3,8", 128, "`ks` '-3,8': latent sizes must be positive integers, e.g. 8,16,32"),
    ("", None, "`ks` '' is empty: give positive integers separated by commas, e.g. 8,16,32"),
    (",", None, "`ks` ',' has an empty item: separate the numbers by single commas"),
    ("8,,4", None, "`ks` '8,,4' has an empty item: separate the numbers by single commas"),
    ("8,16,", None, "`ks` '8,16,' has an empty item: separate the numbers by single commas"),
    ("8,8", 32, "`ks` 8,8: 8 is given twice"),
    ("32,8,16,8", None, "`ks` 32,8,16,8: 8 is given twice"),
    ("8,x", None, "`ks` '8,x': give positive integers separated by commas, e.g. 8,16,32"),
    ("8.5", None, "`ks` '8.5': give positive integers separated by commas, e.g. 8,16,32"),
    ("8;16", None, "`ks` '8;16': give positive integers separated by commas, e.g. 8,16,32"),
])
def test_ks_errors(text, head_dim, message):
    with pytest.raises(HeadlensError) as info:
        parse_ks(text, head_dim)
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------- CLI view


def _error(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,line", [
    (["sweep", "--k", "0"], "headlens sweep: error: --k '0': latent sizes must be positive integers, e.g. 8,16,32"),
    (["sweep", "--k", "8,x"],
     "headlens sweep: error: --k '8,x': give positive integers separated by commas, e.g. 8,16,32"),
    (["sweep", "--k", "8,64"], "headlens sweep: error: --k 64 is above head_dim 32: a head's OV circuit has rank "
                               "<= 32; choose sizes in 1..32"),
    (["sweep", "--layers", "2:9"], "headlens sweep: error: --layers 2:9: stop 9 is out of range (valid layers are "
                                   "0..5)"),
    (["sweep", "--layers", "1:4:0"], "headlens sweep: error: --layers 1:4:0: the step must be positive"),
    (["sphere", "--prompt", "hi", "--layers", "4:2"],
     "headlens sphere: error: --layers 4:2 selects no layer (valid layers are 0..5)"),
    (["sweep", "--k", "8,,4"], "headlens sweep: error: --k '8,,4' has an empty item: separate the numbers by single "
                               "commas"),
    (["sweep", "--k", "8,8"], "headlens sweep: error: --k 8,8: 8 is given twice"),
    (["sweep", "--layers", "1,,0"], "headlens sweep: error: --layers '1,,0' has an empty item: separate the numbers "
                                    "by single commas"),
    (["sweep", "--layers", "1,1"], "headlens sweep: error: --layers 1,1: 1 is given twice"),
    (["sweep", "--layers", ""], "headlens sweep: error: --layers '' is empty: use a slice like 7:35, a list like "
                                "1,4,9, or all (every layer: all, or leave it out)"),
    (["sphere", "--prompt", "hi", "--layers", ""], "headlens sphere: error: --layers '' is empty: use a slice like "
                                                   "7:35, a list like 1,4,9, or all (every layer: all, or leave it out)"),
    (["sphere", "--prompt", "hi", "--layers", "one,two"],
     "headlens sphere: error: --layers 'one,two': use a slice like 7:35, a list like 1,4,9, or all"),
])
def test_cli_names_the_flags(capsys, tmp_path, argv, line):
    """On the embedded all-MiniLM-L6-v2 (6 layers, head_dim 32): the library's `ks`/`layers` become --k/--layers."""
    assert _error(capsys, *argv, "--out-dir", str(tmp_path / "out")) == line
