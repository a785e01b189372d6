"""``headlens compress`` on a tiny checkpoint of every family in the spec table: with a full-size latent
(k = head_dim) the compressed model is the original (KL or embedding-cosine loss at round-off), with a small one it
loses something, for plain and data-aware latents, through the command line (loader, layout, hooks, the batched
re-run and its check, the report)."""

from __future__ import annotations

import json

import pytest
from tiny_models import FAMILIES, PROMPT, variants_of

from headlens.cli import main

TEXTS = [PROMPT, "Octopuses have three hearts and blue blood.", "The rain in Spain stays mainly in the plain.",
         "Sorting algorithms have different worst cases."]
CALIB = ["A dog ran in the park, barking at every bird it saw.", "Three and seven are prime numbers; nine is not.",
         "The sun rises in the east and sets in the west.", "She wrote the letter slowly, then read it twice."] * 3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_compresses(ckpts, capsys, tmp_path, family):
    from headlens.io.source import ModelSource

    path = ckpts.path(family, variants_of(family)[0], "hf_dir")
    hd = ModelSource(weights=str(path)).checkpoint().shape.head_dim
    (tmp_path / "eval.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "calib.txt").write_text("\n".join(CALIB) + "\n")
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["compress", "--weights", str(path), "--k", f"2,{hd}", "--eval", str(tmp_path / "eval.txt"),
                 "--calib", str(tmp_path / "calib.txt"), "--out-dir", str(out)])
    o, e = capsys.readouterr()
    assert code == 0, (o, e)
    s = json.loads((out / "compress_summary.json").read_text())
    assert len(s["configurations"]) == 4
    for r in s["configurations"]:
        loss = r["kl_mean"] if s["task"] == "causal-lm" else 1 - r["embedding_cosine_mean"]
        if r["target"] == hd:
            assert abs(loss) < 1e-6 and r["saving"] == 0.0, (family, r["name"], loss)
            assert all(e["value_path_error"] < 1e-5 for e in r["layers"]), family
        else:
            assert loss > 1e-7 and r["saving"] > 0, (family, r["name"], loss)
            assert all(e["value_path_error"] > 1e-3 for e in r["layers"]), family
