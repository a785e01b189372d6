"""Text files of one text per line (``--eval``, ``--calib``, ``--prompt-file``): split at ``\\n`` and ``\\r\\n`` only.

Python's ``str.splitlines`` (and a file opened in text mode, which turns a lone ``\\r`` into a line end) also
splits at form feeds, ``\\x1c``-``\\x1e``, ``\\x85``, U+2028 and U+2029, which occur inside real texts (page breaks in
extracted documents, Unicode line separators in web text). Every reader of such files in the command line must
give the texts written here by hand, and sphere's prompt file (one prompt) must come back byte for byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from headlens.errors import HeadlensError
from headlens.io.files import read_text, read_text_lines, split_lines

# One text per line; inside the lines, every separator str.splitlines would also split at.
CONTENT = ("page one\fpage two\x1cfile sep\x1dgroup\x1erecord\u2028line sep\u2029para sep\x85next line\r\n"
           "second\rwith a lone carriage return\n"
           "\n"
           "   \t \n"
           "\ufeffthird, after a blank line\n")
EXPECTED = ["page one\fpage two\x1cfile sep\x1dgroup\x1erecord\u2028line sep\u2029para sep\x85next line",
            "second\rwith a lone carriage return",
            "\ufeffthird, after a blank line"]


def _file(tmp_path: Path, name: str = "texts.txt", content: str = CONTENT, bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes(("\ufeff" if bom else "").encode() + content.encode("utf-8"))
    return path


def test_split_lines_only_at_newlines():
    assert split_lines(CONTENT) == EXPECTED
    assert len(CONTENT.splitlines()) > len(EXPECTED) + 2  # what the old reader did: many more "texts"


def test_read_text_lines_keeps_the_texts_whole_and_drops_a_bom(tmp_path):
    assert read_text_lines(_file(tmp_path), "calib") == EXPECTED
    assert read_text_lines(_file(tmp_path, bom=True), "calib") == EXPECTED  # a leading byte-order mark is dropped
    assert read_text(_file(tmp_path), "prompt_file") == CONTENT  # line ends exactly as stored


@pytest.mark.parametrize("content,needle", [(b"\xff\xfe\x00a", "is not UTF-8 text"),
                                            (b"text\x00more\n", "is not a text file: it holds NUL bytes"),
                                            (b"\n \n\t\n", "is empty")])
def test_bad_text_files_name_the_parameter(tmp_path, content, needle):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(HeadlensError, match=rf"^`eval` {path} {needle}"):
        read_text_lines(path, "eval")


def test_every_command_line_reader_splits_the_same_way(tmp_path):
    from headlens.cli.compress import _texts as compress_texts
    from headlens.cli.router import _texts as router_texts
    from headlens.cli.sphere import read_prompt
    from headlens.cli.sweep import read_calibration
    from headlens.compress.run import CompressConfig
    from headlens.io.source import ModelSource

    path = _file(tmp_path)
    other = _file(tmp_path, "calib.txt", "a calibration text\fwith a page break\n")
    assert read_calibration(argparse.Namespace(calib=str(path), prompt=None)) == EXPECTED
    assert router_texts(argparse.Namespace(prompt_file=str(path), prompt=None)) == EXPECTED
    chosen = compress_texts(argparse.Namespace(eval_file=str(path), calib=str(other)),
                            ModelSource(weights=tmp_path), CompressConfig(latents="data-aware"))
    assert chosen.eval == EXPECTED and chosen.calib == ["a calibration text\fwith a page break"]
    assert read_prompt(argparse.Namespace(prompt_file=str(path), prompt=None)) == CONTENT  # one prompt, as stored
