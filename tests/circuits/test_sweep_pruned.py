"""`headlens sweep` on a model with a pruned (all-zero) head and a zero kv group: rank 0 for those, every other
number as dense float64 says, strict JSON, and the budget spends no latent on them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from reference import dense_svals, dense_wov, value_output_blocks
from tiny_models import PROMPT, build_model, save_checkpoint, tokenizer_for

from headlens.cli import main
from headlens.io.tables import read_table

HD = 16  # tiny_models.HEAD_DIM of qwen3


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """qwen3 GQA (H=4, G=2): layer 0 head 1 has W_O^h = 0; layer 1 kv head 0 has W_V^g = 0 (heads 0, 1)."""
    model = build_model("qwen3", "gqa")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, HD:2 * HD] = 0
        model.model.layers[1].self_attn.v_proj.weight[:HD] = 0
    out = tmp_path_factory.mktemp("pruned")
    return model, save_checkpoint(model, tokenizer_for("qwen3"), out, "hf_dir")


ZERO_HEADS = {(0, 1), (1, 0), (1, 1)}


@pytest.mark.parametrize("data", [False, True])
def test_pruned_heads_get_rank_zero_and_the_others_match_dense(pruned, capsys, tmp_path, data):
    model, path = pruned
    argv = ["sweep", "--weights", str(path), "--dtype", "float64", "--k", "2,4", "--out-dir", str(tmp_path)]
    code = main(argv + (["--prompt", PROMPT] if data else []))
    out, err = capsys.readouterr()
    assert code == 0, err
    heads = read_table(tmp_path / "sweep_heads.csv")
    assert heads == read_table(tmp_path / "sweep_heads.parquet")
    for row in heads:
        key = (row["layer"], row["head"])
        W = dense_wov(model, "qwen3", *key)
        if key in ZERO_HEADS:
            assert not W.any()
            assert row["ov_rank"] == 0 and row["ov_sigma_max"] == 0 and row["ov_condition"] == float("inf")
            assert all(row[f"ov_rank_e{p}"] == 0 for p in (50, 90, 95, 99))
            assert row["ov_energy_k2"] == 1 and row["ov_rel_error_k2"] == 0  # an empty latent keeps it exactly
            if data:
                assert row["plain_heldout_k2"] == row["white_heldout_k2"] == row["white_pred_k2"] == 0
            continue
        s = dense_svals(W, HD)
        assert row["ov_rank"] == np.linalg.matrix_rank(W) == HD
        assert row["ov_condition"] == pytest.approx(s[0] / s[-1], rel=1e-6)
        assert row["ov_rel_error_k4"] == pytest.approx(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)), rel=1e-7)
    groups = read_table(tmp_path / "sweep_groups.csv")
    zero = [g for g in groups if (g["layer"], g["kv_head"]) == (1, 0)][0]
    assert zero["stack_rank"] == zero["v_rank"] == zero["stack_rank_e90"] == 0 and zero["v_sigma_max"] == 0
    budget = read_table(tmp_path / "sweep_budget.csv")
    row = [b for b in budget if (b["layer"], b["kv_head"]) == (1, 0)][0]
    assert row["k_plain"] == 0 and row["err_plain"] == 0 and row["err_uniform_plain"] == 0
    if data:
        assert row["k_data"] == 0 and row["err_data"] == 0 and row["err_data_heldout"] == 0
    # every JSON strict; the zero head's condition number is null there
    part = _strict((tmp_path / "sweep_layers" / "layer_0000.json").read_text())
    assert part["head_rows"][1]["ov_condition"] is None and part["head_rows"][0]["ov_condition"] > 1
    _strict((tmp_path / "sweep_summary.json").read_text())
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", (tmp_path / "sweep.html").read_text())
    assert "NaN" not in page  # the text, not the pictures' base64, where 'NaN' can occur by chance


def test_pruned_heads_resume_to_the_same_tables(pruned, capsys, tmp_path):
    _, path = pruned
    argv = ["sweep", "--weights", str(path), "--k", "2,4", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    first = (tmp_path / "sweep_heads.csv").read_text()
    (tmp_path / "sweep_layers" / "layer_0001.json").unlink()  # layer 0 (with the null) is read back
    assert main(argv + ["--resume"]) == 0
    capsys.readouterr()
    assert (tmp_path / "sweep_heads.csv").read_text() == first


def test_ov_refuses_a_pruned_head_in_one_line(pruned, capsys, tmp_path):
    _, path = pruned
    for layer, head in ((0, 1), (1, 0)):
        code = main(["ov", "--weights", str(path), "--auto-infer", "--layer", str(layer), "--head", str(head),
                     "--out-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "numerically zero (rank 0)" in err
    assert not (tmp_path / "o").exists()
    _, _, H, G, _ = value_output_blocks(pruned[0], "qwen3", 0)
    assert (H, G) == (4, 2)
