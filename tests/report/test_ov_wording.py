"""``headlens ov``'s sentences about its inputs agree in number: "the prompt has 1 token", "the traces have 3
tokens", "exact on it / on them", and no "1 tokens" anywhere."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from headlens.circuits.ov import DataAwareReport, OVResult
from headlens.cli import main
from headlens.report.ov import extra_lines


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> tuple[OVResult, str]:
    """A real ``ov --prompt`` result on the embedded tiny-lm, read back from its JSON, and what the run printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ov")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["ov", "--model", "tiny-lm", "--prompt", "Hi", "--latent-dim", "4", "--out-dir", str(out),
                     "--json", str(out / "r.json")]) == 0
    d = json.loads((out / "r.json").read_text())
    d["data_aware"] = DataAwareReport(**d["data_aware"])
    d["shape"] = tuple(d["shape"])
    return OVResult(**d), buf.getvalue()


def _with_tokens(r: OVResult, n: int, inputs: str) -> OVResult:
    return dataclasses.replace(r, cache_inputs=inputs, cache_tokens=n,
                               data_aware=dataclasses.replace(r.data_aware, n_tokens=n))


def _note(lines: list[str]) -> str:
    (note,) = [x for x in lines if x.startswith("note:")]
    return note


def test_the_printed_note_for_several_prompt_tokens(tiny_result):
    r, printed = tiny_result
    n = r.data_aware.n_tokens
    assert 1 < n <= r.latent_dim  # the run exercises the note
    assert f"note: the prompt has {n} tokens <= latent_dim {r.latent_dim}, so the data-aware latent is exact on them;" \
        in printed
    assert f"the prompt's {n} tokens at the input" in printed and f"(in-sample, {n} tokens)" in printed


@pytest.mark.parametrize("inputs,subject", [("prompt", "the prompt has"), ("traces", "the traces have")])
def test_one_token_is_singular(tiny_result, inputs, subject):
    lines = extra_lines(_with_tokens(tiny_result[0], 1, inputs))
    note = _note(lines)
    assert note.startswith(f"note: {subject} 1 token <= latent_dim ")
    assert "exact on it;" in note
    text = "\n".join(lines)
    assert not re.search(r"\b1 (traced )?tokens\b", text), text
    assert "(in-sample, 1 token)" in text


@pytest.mark.parametrize("inputs,subject", [("prompt", "the prompt has"), ("traces", "the traces have")])
def test_several_tokens_are_plural(tiny_result, inputs, subject):
    note = _note(extra_lines(_with_tokens(tiny_result[0], 3, inputs)))
    assert note.startswith(f"note: {subject} 3 tokens <= latent_dim ") and "exact on them;" in note
