"""`headlens router` on one-token texts: what is defined is computed, the consecutive-token overlap (undefined
without two tokens in one text) is null and said so, and every JSON is strict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import build_model, save_checkpoint, tokenizer_for

from headlens.cli import main
from headlens.moe.dump import load_dump


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    tok = tokenizer_for("qwen3_moe")
    assert len(tok("a")["input_ids"]) == 1
    return save_checkpoint(build_model("qwen3_moe"), tok, tmp_path_factory.mktemp("moe"), "hf_dir"), tok


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _run(capsys, tmp_path, *argv) -> str:
    code = main(["router", "--weights", str(argv[0]), *argv[1:], "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_one_token_prompt(moe_dir, capsys, tmp_path):
    out = _run(capsys, tmp_path, moe_dir[0], "--prompt", "a")
    raw = _strict((tmp_path / "router_dump.json").read_text())
    report, layers, _ = load_dump(tmp_path / "router_dump")
    assert report.tokens == 1 and "consecutive overlap n/a" in out and "no text has two tokens" in out
    for r, s in zip(layers, report.stats):
        counts = np.bincount(r.indices.flatten().numpy(), minlength=report.experts)
        np.testing.assert_allclose(s.load_share, counts / counts.sum(), rtol=1e-12)  # defined: computed
        assert s.repeat_consecutive is None
    assert all(s["repeat_consecutive"] is None for s in raw["stats"])
    rows = (tmp_path / "router_stats.csv").read_text().splitlines()
    col = rows[0].split(",").index("repeat_consecutive")
    assert all(row.split(",")[col] == "" for row in rows[1:])
    assert "n/a" in (tmp_path / "router.html").read_text()


def test_one_token_text_next_to_a_longer_one(moe_dir, capsys, tmp_path):
    d, tok = moe_dir
    pf = tmp_path / "texts.txt"
    pf.write_text("a\nThe octopus has three hearts\n")
    _run(capsys, tmp_path / "out", d, "--prompt-file", str(pf))
    _strict((tmp_path / "out" / "router_dump.json").read_text())
    report, layers, _ = load_dump(tmp_path / "out" / "router_dump")
    n = len(tok("The octopus has three hearts")["input_ids"])
    assert report.tokens == 1 + n
    k = report.top_k
    for r, s in zip(layers, report.stats):
        sets = [set(row) for row in r.indices.tolist()]
        ref = np.mean([len(sets[t] & sets[t + 1]) / k for t in range(1, n)])  # only the second text's pairs
        assert s.repeat_consecutive == pytest.approx(ref, rel=1e-12)
