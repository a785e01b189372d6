"""`headlens ov --circuit qk|both` through the real command on tiny checkpoint directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import dense_svals, dense_wqk
from tiny_models import PROMPT

from headlens.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building a fixture printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_default_is_the_ov_circuit_and_both_keeps_its_lines(ckpts, capsys, tmp_path):
    """No --circuit and --circuit ov print the same bytes and write the same JSON; --circuit both prints those lines
    first, unchanged, then the QK circuit's, and writes the OV JSON unchanged plus the qk block."""
    d = str(ckpts.path("qwen3", "gqa", "hf_dir", perturb_norms=True))
    common = ["ov", "--weights", d, "--auto-infer", "--layer", "1", "--head", "3", "--latent-dim", "4", "--prompt",
              PROMPT, "--dtype", "float64", "--out-dir", str(tmp_path)]
    outs, jsons = {}, {}
    for circuit in (None, "ov", "both"):
        path = tmp_path / f"{circuit}.json"
        code, out, err = run(capsys, *common, *(["--circuit", circuit] if circuit else []), "--json", str(path))
        assert code == 0, err
        outs[circuit] = out.replace(str(path), "J")
        jsons[circuit] = json.loads(path.read_text().replace(str(path), "J"))
    assert outs[None] == outs["ov"] and jsons[None] == jsons["ov"]
    ov_lines = outs["ov"].splitlines()
    both_lines = outs["both"].splitlines()
    assert both_lines[:len(ov_lines) - 1] == ov_lines[:-1] and both_lines[-1] == ov_lines[-1] == "saved json -> J"
    qk_lines = both_lines[len(ov_lines) - 1:-1]
    assert qk_lines[0] == "W_QK shape: (48, 48) rank: 16"
    assert any(line.startswith("W_QK latent_dim=4 on the prompt's logits (") and "causal positions" in line
               and "attention KL(full || rank-k)=" in line for line in qk_lines)
    assert any("relative position 0" in line for line in qk_lines)
    assert any("--fold-norm" in line for line in qk_lines)  # the library's `fold_norm` as its flag
    assert {k: v for k, v in jsons["both"].items() if k not in ("qk", "circuit")} == jsons["ov"]
    qk = jsons["both"]["qk"]
    model, _ = ckpts.model("qwen3", "gqa", perturb_norms=True)
    ref = dense_svals(dense_wqk(model, "qwen3", 1, 3), 16)
    np.testing.assert_allclose(qk["singular_values"], ref, rtol=1e-6)
    assert qk["rel_error"] == pytest.approx(np.sqrt(np.sum(ref[4:] ** 2) / np.sum(ref**2)), rel=1e-9)
    for key in ("rank", "condition_number", "cumulative_energy", "latent_dim", "prompt_logit_rel_error",
                "prompt_attention_kl", "notes"):
        assert key in qk


def test_qk_only_prints_and_plots_the_qk_circuit(ckpts, capsys, tmp_path):
    d = ckpts.path("gpt2", "mha", "hf_dir")
    code, out, err = run(capsys, "ov", "--weights", str(d), "--auto-infer", "--layer", "0", "--head", "1",
                         "--circuit", "qk", "--plot", "--json", "--out-dir", str(tmp_path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "layer=0 head=1 num_heads=4 num_value_heads=4"
    assert lines[1] == "W_QK shape: (64, 64) rank: 16"
    assert not any(line.startswith(("W_OV", "cache_error", "latent_dim=")) for line in lines)
    assert any("b_Q, b_K" in line for line in lines) and not any("rotary" in line for line in lines)
    stem = f"{d.name}_layer0_head1"
    assert not (tmp_path / f"{stem}.png").exists()  # the OV plot was not asked for
    assert (tmp_path / f"{stem}_qk.png").read_bytes()[:8] == PNG_MAGIC
    assert f"saved qk plot -> {tmp_path / f'{stem}_qk.png'}" in lines
    js = json.loads((tmp_path / f"{stem}.json").read_text())
    assert js["circuit"] == "qk" and "singular_values" not in js and js["files"]["qk_plot"].endswith("_qk.png")
    assert js["qk"]["prompt_logit_rel_error"] is None and js["qk"]["position"] == "absolute"


def test_bad_circuit_is_one_line_exit_2(capsys, tmp_path):
    code = None
    try:
        code = main(["ov", "--circuit", "kq", "--out-dir", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's choices
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["headlens ov: error: argument --circuit: invalid choice: 'kq' "
                                        "(choose from 'ov', 'qk', 'both')"]
    assert not (tmp_path / "out").exists()
