"""`headlens sweep`'s QK side (issue 23): per-head QK forms and stacked key operators against dense float64 SVDs of
matrices built here from the raw state dict, q/k norm gains folded as HuggingFace applies them, and the key budget.

The per-family splits and the q/k norm folds are written out again here (not through headlens.arch) so that a
layout or folding mistake cannot hide behind a shared helper; the folds are also checked against the HuggingFace
modules themselves.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from headlens.cli import main
from headlens.io.tables import read_table

KS = (2, 4, 16)
# family -> how its query/key norm gain folds: (offset, over every head at once, centred); None: no q/k norms
QK_NORMS = {"qwen3": (0.0, False, False), "gemma3": (1.0, False, False), "olmo2": (0.0, True, False),
            "cohere": (0.0, True, True)}
CASES = [("qwen3", "gqa", True),  # GQA, per-head q/k RMSNorm gains
         ("llama", "mqa", False),  # MQA
         ("phi3", "gqa", False),  # fused q|k|v
         ("gpt_neox", "mha", False),  # fused, interleaved per head
         ("gpt2", "mha", False),  # Conv1D
         ("gemma3", "gqa", True),  # (1 + w) q/k gains
         ("olmo2", "gqa", True),  # q/k norms over all heads
         ("cohere", "gqa", True)]  # LayerNorm q/k norms: centring and a gain per head


def _sweep(capsys, out, path, *argv) -> tuple[list[dict], list[dict], list[dict], dict]:
    code = main(["sweep", "--weights", str(path), *argv, "--out-dir", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    return (read_table(out / "sweep_heads.csv"), read_table(out / "sweep_groups.csv"),
            read_table(out / "sweep_budget.csv"), json.loads((out / "sweep_summary.json").read_text()))


def _query_key(sd: dict, family: str, layer: int, H: int, hd: int) -> tuple[np.ndarray, np.ndarray]:
    """(W_Q (H, hd, d), W_K (G, hd, d)) in float64, split as each modeling file does, q/k norm gains folded."""
    if family == "gpt2":  # Conv1D c_attn stores [in, out]: q | k | v columns
        W = sd[f"transformer.h.{layer}.attn.c_attn.weight"].astype(np.float64).T  # (3 H hd, d)
        q, k = W[:H * hd], W[H * hd:2 * H * hd]
    elif family == "gpt_neox":  # per head [q_h; k_h; v_h]
        W = sd[f"gpt_neox.layers.{layer}.attention.query_key_value.weight"].astype(np.float64)
        W = W.reshape(H, 3, hd, -1)
        q, k = W[:, 0].reshape(H * hd, -1), W[:, 1].reshape(H * hd, -1)
    elif family == "phi3":  # q | k | v rows
        W = sd[f"model.layers.{layer}.self_attn.qkv_proj.weight"].astype(np.float64)
        G = (W.shape[0] // hd - H) // 2
        q, k = W[:H * hd], W[H * hd:(H + G) * hd]
    else:
        q = sd[f"model.layers.{layer}.self_attn.q_proj.weight"].astype(np.float64)
        k = sd[f"model.layers.{layer}.self_attn.k_proj.weight"].astype(np.float64)
    d = q.shape[1]
    Wq, Wk = q.reshape(H, hd, d), k.reshape(-1, hd, d)
    if family in QK_NORMS:
        offset, _, centred = QK_NORMS[family]
        folded = []
        for W, name in ((Wq, "q_norm"), (Wk, "k_norm")):
            gain = sd[f"model.layers.{layer}.self_attn.{name}.weight"].astype(np.float64) + offset
            gain = np.broadcast_to(gain.reshape(-1, hd), (W.shape[0], hd))  # (hd,) shared or one row per head
            if centred:
                W = W - W.mean(axis=1, keepdims=True)  # LayerNorm subtracts each head's mean over its hd dims
            folded.append(W * gain[:, :, None])
        Wq, Wk = folded
    return Wq, Wk


def _cells(prefix: str, s: np.ndarray, levels) -> dict:
    E = np.cumsum(s**2) / np.sum(s**2)
    out = {f"{prefix}_rank_e{p}": next(i + 1 for i, e in enumerate(E) if e >= p / 100 - 1e-12) for p in levels}
    for k in KS:
        out[f"{prefix}_energy_k{k}"] = E[k - 1]
        out[f"{prefix}_rel_error_k{k}"] = np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))
    return out


def _check(row: dict, want: dict) -> None:
    for key, value in want.items():
        if isinstance(value, (int, np.integer)):
            assert row[key] == value, (key, row[key], value)
        else:
            assert row[key] == pytest.approx(float(value), rel=1e-7, abs=1e-10), key


@pytest.mark.parametrize("family,variant,perturb", CASES, ids=[f"{f}-{v}" for f, v, _ in CASES])
def test_qk_columns_against_dense_float64(ckpts, capsys, tmp_path, family, variant, perturb):
    path = ckpts.path(family, variant, "hf_dir", perturb_norms=perturb)
    model, _ = ckpts.model(family, variant, perturb)
    heads, groups, _, summary = _sweep(capsys, tmp_path, path, "--dtype", "float64", "--k", ",".join(map(str, KS)))
    sd = load_file(str(path / "model.safetensors"))
    H, hd = model.config.num_attention_heads, 16
    L = model.config.num_hidden_layers
    dense = {layer: _query_key(sd, family, layer, H, hd) for layer in range(L)}
    G = dense[0][1].shape[0]
    assert len(heads) == L * H and len(groups) == L * G
    for row in heads:
        Wq, Wk = dense[row["layer"]]
        h, g = row["head"], row["head"] // (H // G)
        W = Wq[h].T @ Wk[g]  # the d x d QK form, formed here on purpose
        s = np.linalg.svd(W, compute_uv=False)[:hd]
        r = np.linalg.matrix_rank(W)  # hd, or hd - 1 where a LayerNorm centres each head (Cohere)
        assert row["kv_head"] == g and row["qk_rank"] == r == (hd - 1 if QK_NORMS.get(family, (0, 0, 0))[2] else hd)
        _check(row, {"qk_sigma_max": s[0], "qk_frobenius": np.linalg.norm(s), "qk_condition": s[0] / s[r - 1],
                     **_cells("qk", s, (90,))})
    for row in groups:
        Wq, Wk = dense[row["layer"]]
        g = row["kv_head"]
        M = np.vstack([Wq[h].T @ Wk[g] for h in range(H) if h // (H // G) == g])  # ((H/G) d, d)
        s = np.linalg.svd(M, compute_uv=False)[:hd]
        assert row["qk_stack_rank"] == np.linalg.matrix_rank(M)
        _check(row, _cells("qk_stack", s, (50, 90, 95, 99)))
    if perturb:  # the gains matter: without them the numbers differ
        Wq = sd["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)[:hd]
        Wk = sd["model.layers.0.self_attn.k_proj.weight"].astype(np.float64)[:hd]
        unfolded = np.linalg.svd(Wq.T @ Wk, compute_uv=False)[0]
        assert heads[0]["qk_sigma_max"] != pytest.approx(unfolded, rel=1e-3)
    per_layer = summary["per_layer"][0]
    assert per_layer["qk_rank_e90_mean"] == pytest.approx(np.mean([r["qk_rank_e90"] for r in heads[:H]]))
    assert any("rotary" in n and "per-token RMS scale is left out" in n for n in summary["notes"])


@pytest.mark.parametrize("family", sorted(QK_NORMS))
def test_folded_qk_norms_match_huggingface(ckpts, family):
    """Each head's folded query (key) times the token is parallel to what the HF module computes after its q/k norm:
    the fold is right up to the per-token scale it leaves out."""
    from headlens.circuits.heads import read_layer
    from headlens.io.checkpoint import open_model

    model, _ = ckpts.model(family, "gqa", True)
    ck = open_model(weights=ckpts.path(family, "gqa", "hf_dir", perturb_norms=True), auto_infer=True)
    f = read_layer(ck, 1, fold_qk_norm=True, load_dtype=torch.float64)
    attn = copy.deepcopy(model.model.layers[1].self_attn).double()
    hd = 16
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for proj, norm, W in ((attn.q_proj, attn.q_norm, f.W_Q), (attn.k_proj, attn.k_norm, f.W_K)):
        n = W.shape[0]
        with torch.no_grad():
            y = proj(x)  # (N, n hd)
            over_all = norm.weight.dim() == 1 and norm.weight.numel() == n * hd  # OLMo 2: before the head split
            hf = (norm(y) if over_all else norm(y.view(7, n, hd))).reshape(7, n, hd)
        ours = torch.einsum("gid,nd->ngi", W, x)  # (N, n, hd)
        cos = torch.nn.functional.cosine_similarity(hf, ours, dim=-1)
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-10)
        unfolded = torch.einsum("gid,nd->ngi", proj.weight.detach().view(n, hd, -1), x)
        assert (torch.nn.functional.cosine_similarity(hf, unfolded, dim=-1) < 1 - 1e-6).any()  # the fold mattered


def test_unplaced_qk_norms_are_refused(ckpts, capsys, tmp_path):
    path = ckpts.path("stablelm", "gqa", "hf_dir")  # qk_layernorm: per-head LayerNorms with biases
    capsys.readouterr()
    code = main(["sweep", "--weights", str(path), "--out-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "_layernorm.norms.0.weight" in err and "--no-qk" in err and not (tmp_path / "a").exists()
    assert main(["sweep", "--weights", str(path), "--no-qk", "--out-dir", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize("target", [("--target-error", 0.3), ("--target-energy", 0.95)])
def test_key_budget_is_the_smallest_k_of_the_dense_stacked_spectrum(ckpts, capsys, tmp_path, target):
    path = ckpts.path("qwen3", "gqa", "hf_dir", perturb_norms=True)
    model, _ = ckpts.model("qwen3", "gqa", True)
    _, _, budget, summary = _sweep(capsys, tmp_path, path, "--dtype", "float64", target[0], str(target[1]))
    sd = load_file(str(path / "model.safetensors"))
    H, hd = model.config.num_attention_heads, 16
    for row in budget:
        Wq, Wk = _query_key(sd, "qwen3", row["layer"], H, hd)
        G = Wk.shape[0]
        g = row["kv_head"]
        s = np.linalg.svd(np.vstack([Wq[h].T @ Wk[g] for h in range(H) if h // (H // G) == g]), compute_uv=False)[:hd]
        tails = np.sqrt([np.sum(s[k:] ** 2) / np.sum(s**2) for k in range(hd + 1)])  # error at k = 0..hd
        if target[0] == "--target-error":
            want = next(k for k in range(hd + 1) if tails[k] <= target[1] + 1e-12)
        else:
            want = next(k for k in range(1, hd + 1) if 1 - tails[k] ** 2 >= target[1] - 1e-12)
        assert row["key_k_plain"] == want, (row, tails)
        assert row["key_err_plain"] == pytest.approx(tails[want], rel=1e-7, abs=1e-12)
        assert row["key_k_data"] is None  # weight-only
    t = summary["budget"]["totals"]
    assert t["key_latent_dims_plain"] == sum(r["key_k_plain"] for r in budget)
    assert t["kv_bytes_after_plain_with_keys"] == 2 * sum(r["key_k_plain"] + r["k_plain"] for r in budget)
    assert list(budget[0])[:12] == ["layer", "kv_head", "k_plain", "err_plain", "k_data", "err_data",
                                    "err_data_heldout", "k_uniform", "err_uniform_plain", "err_uniform_data",
                                    "err_uniform_data_heldout", "model_weights"]  # today's columns first


def test_budget_files_with_and_without_key_columns_read_the_same(ckpts, capsys, tmp_path):
    """`compress --budget` reads a new sweep_budget.csv (key columns appended) and an old one (without them) alike,
    and the data-aware key budget is there with calibration."""
    from headlens.compress.allocate import read_budget
    from headlens.io.checkpoint import open_model
    from headlens.io.tables import write_csv
    from tiny_models import PROMPT

    path = ckpts.path("qwen3", "gqa", "hf_dir")
    _, _, budget, _ = _sweep(capsys, tmp_path / "s", path, "--prompt", PROMPT * 4, "--target-error", "0.5")
    assert all(r["key_k_data"] is not None and r["key_err_data"] <= 0.5 + 1e-12 for r in budget)
    assert all(0 <= r["key_err_data_heldout"] <= 1 for r in budget)
    ck = open_model(weights=path)
    weights = budget[0]["model_weights"]
    new = read_budget(tmp_path / "s" / "sweep_budget.csv", ck, weights, ("plain", "data-aware"))
    old = write_csv(tmp_path / "old" / "sweep_budget.csv",
                    [{k: v for k, v in r.items() if not k.startswith("key_")} for r in budget])
    assert read_budget(old, ck, weights, ("plain", "data-aware")) == new
    assert new["plain"] == {layer: [r["k_plain"] for r in budget if r["layer"] == layer] for layer in (0, 1)}
