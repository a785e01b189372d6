"""Every command prints what it printed before the package was reorganised (issue 9).

The cases and the recordings live in ``tests/golden/``: ``record.py`` holds the table of ``headlens`` invocations
(the README's tour on the embedded all-MiniLM-L6-v2 and on tiny checkpoints of several families, the toy
subcommands, ``--help`` and bad input) and ``<case>.txt`` what the pre-redesign code printed for each: return code,
normalised stdout and stderr, warnings and the names of the files written. Here each case runs again against the
current code through ``headlens.cli.main`` and must give the same text.

A deliberate change of output is re-recorded with ``python tests/golden/record.py --record --only CASE`` (review
the diff of ``tests/golden/CASE.txt``).
"""

from __future__ import annotations

import pytest
from golden.record import CASES, build_inputs, diff, golden_path, run_case

MAX_DIFF_LINES = 120


@pytest.fixture(scope="module")
def golden_inputs(tmp_path_factory):
    """The checkpoints and text files every case reads, built once for the module (a few seconds)."""
    return build_inputs(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_output_matches_golden(case, golden_inputs):
    path = golden_path(case.name)
    assert path.is_file(), f"no recording {path}: run python tests/golden/record.py --record --only {case.name}"
    want = path.read_text(encoding="utf-8")
    got = run_case(case, golden_inputs)
    if got != want:
        lines = diff(want, got, case.name).splitlines()
        if len(lines) > MAX_DIFF_LINES:
            lines = lines[:MAX_DIFF_LINES] + [f"... ({len(lines) - MAX_DIFF_LINES} more diff lines)"]
        pytest.fail(f"headlens output changed for case {case.name} ({path.name}):\n" + "\n".join(lines),
                    pytrace=False)


def test_every_recording_has_a_case():
    names = {c.name for c in CASES}
    stale = sorted(p.stem for p in golden_path("x").parent.glob("*.txt") if p.stem not in names)
    assert not stale, f"recordings without a case (remove them or re-record): {stale}"
