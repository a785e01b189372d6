"""`sweep --resume` reuses a per-layer part only when it carries the fingerprint of the same model (content
included) and configuration; every other part is computed again. Checked against dense float64."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import dense_svals, dense_wov, norm_gain

import headlens.circuits.sweep as sweep_mod
from headlens.cli import main
from headlens.io.tables import read_table

FAMILY = "qwen3"


def _run(capsys, out, *argv) -> list[dict]:
    code = main(["sweep", *argv, "--dtype", "float64", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    return read_table(out / "sweep_heads.csv")


@pytest.fixture
def spy(monkeypatch):
    calls: list[int] = []
    orig = sweep_mod.analyze_layer

    def analyze(layer, *a, **k):
        calls.append(layer)
        return orig(layer, *a, **k)

    monkeypatch.setattr(sweep_mod, "analyze_layer", analyze)
    return calls


def _dense_sigma_max(model, layer: int, head: int, fold: bool) -> float:
    W = dense_wov(model, FAMILY, layer, head)
    if fold:
        W = W * norm_gain(model, FAMILY, layer)[None, :]  # W_OV diag(gamma)
    return float(dense_svals(W, 1)[0])


def test_interrupted_fold_norm_run_then_resume(ckpts, capsys, tmp_path, monkeypatch, spy):
    model, _ = ckpts.model(FAMILY, "gqa", perturb_norms=True)
    d = str(ckpts.path(FAMILY, "gqa", "hf_dir", perturb_norms=True))
    out = tmp_path / "sw"
    _run(capsys, out, "--weights", d)  # a full run, not folded: parts for layers 0 and 1

    orig = sweep_mod.analyze_layer

    def interrupt_at_layer_1(layer, *a, **k):
        if layer == 1:
            raise KeyboardInterrupt
        return orig(layer, *a, **k)

    monkeypatch.setattr(sweep_mod, "analyze_layer", interrupt_at_layer_1)
    assert main(["sweep", "--weights", d, "--fold-norm", "--dtype", "float64", "--out-dir", str(out)]) == 130
    monkeypatch.undo()
    # layer 0 is now folded, layer 1 still holds the full run's non-folded part
    parts = [json.loads((out / "sweep_layers" / f"layer_000{i}.json").read_text()) for i in (0, 1)]
    assert parts[0]["fingerprint"]["config"]["fold_norm"] and not parts[1]["fingerprint"]["config"]["fold_norm"]

    calls: list[int] = []

    def count(layer, *a, **k):
        calls.append(layer)
        return orig(layer, *a, **k)

    monkeypatch.setattr(sweep_mod, "analyze_layer", count)
    capsys.readouterr()
    heads = _run(capsys, out, "--weights", d, "--fold-norm", "--resume")
    assert calls == [1]  # layer 0 reused, layer 1 (another configuration) computed again
    for row in heads:
        folded = _dense_sigma_max(model, row["layer"], row["head"], fold=True)
        plain = _dense_sigma_max(model, row["layer"], row["head"], fold=False)
        assert abs(folded - plain) > 1e-3 * plain  # the test can tell the two apart
        assert row["ov_sigma_max"] == pytest.approx(folded, rel=1e-9)


def test_resume_with_another_k_recomputes_instead_of_crashing(ckpts, capsys, tmp_path, spy):
    model, _ = ckpts.model(FAMILY, "gqa")
    d = str(ckpts.path(FAMILY, "gqa", "hf_dir"))
    out = tmp_path / "sw"
    _run(capsys, out, "--weights", d, "--k", "8")
    spy.clear()
    heads = _run(capsys, out, "--weights", d, "--k", "4", "--resume")
    assert spy == [0, 1]
    for row in heads:
        s = dense_svals(dense_wov(model, FAMILY, row["layer"], row["head"]))
        assert row["ov_rel_error_k4"] == pytest.approx(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)), rel=1e-7)
    spy.clear()
    _run(capsys, out, "--weights", d, "--k", "4", "--resume")
    assert spy == []  # now every part matches


def test_resume_after_the_weights_changed_on_disk(ckpts, capsys, tmp_path, spy):
    from safetensors.torch import load_file, save_file

    src = ckpts.path("llama", "gqa", "safetensors")
    f = tmp_path / "m.safetensors"
    sd = load_file(str(src))
    save_file(sd, str(f))
    out = tmp_path / "sw"
    _run(capsys, out, "--weights", str(f), "--num-heads", "4")
    spy.clear()
    _run(capsys, out, "--weights", str(f), "--num-heads", "4", "--resume")
    assert spy == []
    key = "model.layers.1.self_attn.v_proj.weight"
    sd[key][5:9] *= 3.0  # a middle block of rows: the first and last rows are unchanged
    save_file(sd, str(f))
    heads = _run(capsys, out, "--weights", str(f), "--num-heads", "4", "--resume")
    assert spy == [0, 1]
    v = sd[key].double().numpy()
    o = sd["model.layers.1.self_attn.o_proj.weight"].double().numpy()
    hd = 16
    row = next(r for r in heads if r["layer"] == 1 and r["head"] == 0)
    W = o[:, :hd] @ v[:hd]
    assert row["ov_sigma_max"] == pytest.approx(dense_svals(W, 1)[0], rel=1e-9)
