"""Toy transformer of Geshkovski et al.: tokens on the sphere collapse through depth; the demo's outputs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from headlens.errors import HeadlensError
from headlens.report.cluster import write_cluster_demo
from headlens.residual.clustering import clustering_metrics
from headlens.toy.cluster import ClusterConfig, frame_layers, make_weights, origin_frames, run_cluster, run_demo


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tokens_collapse_through_depth(seed):
    cfg = ClusterConfig(seed=seed)  # default temperature and step
    hidden = run_cluster(cfg)
    assert sorted(hidden) == list(range(cfg.layers + 1))
    m = [clustering_metrics(hidden[l], l, 0.9, 0) for l in sorted(hidden)]
    cos = [x.mean_cos for x in m]
    clusters = [x.n_clusters for x in m]
    assert abs(cos[0]) < 0.1  # random directions in 16 dims: nearly orthogonal
    assert cos[-1] >= cos[0] + 0.5
    assert clusters[0] == cfg.tokens and clusters[-1] < clusters[0] / 4
    assert _spearman(cos, list(range(len(cos)))) > 0.8
    assert _spearman(clusters, list(range(len(clusters)))) < -0.8
    assert m[-1].effective_rank < m[0].effective_rank / 2


def test_random_weights_collapse_too():
    hidden = run_cluster(ClusterConfig(weights="random", seed=2))
    first = clustering_metrics(hidden[0], 0, 0.9, 0)
    last = clustering_metrics(hidden[max(hidden)], 0, 0.9, 0)
    assert last.mean_cos > first.mean_cos + 0.3 and last.n_clusters < first.n_clusters


@pytest.mark.parametrize("weights,heads", [("identity", 1), ("random", 3)])
def test_tokens_stay_on_the_sphere(weights, heads):
    hidden = run_cluster(ClusterConfig(weights=weights, heads=heads, layers=12))
    for x in hidden.values():
        assert x.dtype == torch.float64 and x.shape == (64, 16)
        assert torch.allclose(x.norm(dim=1), torch.ones(64, dtype=torch.float64), atol=1e-12, rtol=0)


def test_without_normalising_the_norms_grow():
    hidden = run_cluster(ClusterConfig(normalize=False, layers=5))
    assert float(hidden[5].norm(dim=1).min()) > 1.0


def test_random_weights_are_well_conditioned_and_shared():
    cfg = ClusterConfig(weights="random", heads=2, seed=5)
    w = make_weights(cfg)
    assert len(w) == 2
    for mats in w:
        for M in mats:
            s = torch.linalg.svdvals(M)
            assert float(s[0]) == pytest.approx(1.0, abs=1e-12) and float(s[-1]) >= 0.5 - 1e-12
    again = make_weights(cfg)
    assert all(torch.equal(a, b) for ma, mb in zip(w, again) for a, b in zip(ma, mb))


@pytest.mark.parametrize("weights,heads,normalize", [("identity", 1, True), ("random", 2, True),
                                                     ("random", 2, False)])
def test_first_layer_by_hand(weights, heads, normalize):
    cfg = ClusterConfig(tokens=9, dim=5, layers=2, heads=heads, beta=3.0, step=0.4, seed=7, weights=weights,
                        normalize=normalize)
    hidden = run_cluster(cfg)
    x = hidden[0].numpy()
    W = [tuple(M.numpy() for M in mats) for mats in make_weights(cfg)]
    n, d = x.shape
    expected = np.zeros_like(x)
    for i in range(n):
        upd = np.zeros(d)
        for Q, K, V in W:
            scores = [cfg.beta * float(np.dot(Q @ x[i], K @ x[j])) for j in range(n)]
            top = max(scores)
            e = [math.exp(s - top) for s in scores]
            z = sum(e)
            for j in range(n):
                upd += (e[j] / z) * (V @ x[j])
        y = x[i] + cfg.step * upd / len(W)
        expected[i] = y / np.linalg.norm(y) if normalize else y
    np.testing.assert_allclose(hidden[1].numpy(), expected, rtol=0, atol=1e-12)


def test_frame_layers():
    assert frame_layers(5, 30) == [0, 1, 2, 3, 4]
    f = frame_layers(101, 30)
    assert f[0] == 0 and f[-1] == 100 and len(f) == 30 and f == sorted(set(f))
    assert frame_layers(31, 30)[-1] == 30 and len(frame_layers(31, 30)) == 30


def test_bad_config():
    with pytest.raises(HeadlensError, match="weights"):
        run_cluster(ClusterConfig(weights="orthogonal"))
    with pytest.raises(HeadlensError, match="tokens"):
        run_cluster(ClusterConfig(tokens=2))


def test_cluster_demo_writes_files(tmp_path):
    cfg = ClusterConfig(layers=24, beta=4.0, step=0.35)
    demo = run_demo(cfg, max_frames=6)
    files = write_cluster_demo(demo, tmp_path / "demo", frame_seconds=0.2, workers=1)
    assert demo.frame_layers[0] == 0 and demo.frame_layers[-1] == 24 and len(demo.frame_layers) == 6
    with Image.open(files.gif) as im:
        assert im.format == "GIF" and im.n_frames == 6
    with Image.open(files.metrics_png) as im:
        assert im.format == "PNG"
    data = json.loads(files.metrics_json.read_text())
    assert [m["layer"] for m in data["metrics"]] == list(range(25))  # metrics at every layer
    assert data["config"]["layers"] == 24 and data["summary"] == demo.summary
    assert data["frame_layers"] == demo.frame_layers
    metrics = demo.sphere.metrics
    rows = list(csv.DictReader(files.metrics_csv.open()))
    assert len(rows) == 25 and float(rows[-1]["mean_cos"]) == pytest.approx(metrics[-1].mean_cos, rel=1e-5)
    first, last = metrics[0], metrics[-1]
    assert last.mean_cos > first.mean_cos + 0.5 and last.n_clusters < first.n_clusters
    text = " ".join(demo.summary)
    assert "64 tokens in 16 dimensions" in text and "beta = 4" in text
    assert f"{first.mean_cos:.2f}" in text and f"{last.mean_cos:.2f}" in text
    assert f"go from {first.n_clusters} to {last.n_clusters}" in text


def test_picture_about_the_origin_keeps_the_cluster_a_point():
    hidden = run_cluster(ClusterConfig())
    points, kept = origin_frames(hidden, [0, 30])
    for P in points:
        np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0, atol=1e-12)
    cos_last = points[1] @ points[1].T
    assert cos_last.min() > 0.8 and kept[1] > 0.95  # one tight cluster, the 3-D view keeps nearly everything
    assert (points[0] @ points[0].T).min() < 0


def test_cluster_demo_centred_picture(tmp_path):
    files = write_cluster_demo(run_demo(ClusterConfig(layers=3), center=True), tmp_path, workers=1)
    with Image.open(files.gif) as im:
        assert im.n_frames == 4


@pytest.mark.parametrize("center", [False, True])
def test_cluster_demo_page_carries_every_frame_and_token(tmp_path, center):
    """The page's own data: one plotly frame per pictured layer, each with every token's label, hover text,
    position and unit point, and a title naming its layer and picture."""
    from pages import figure_from_page

    demo = run_demo(ClusterConfig(tokens=16, dim=6, layers=40), center=center, max_frames=7)
    assert len(demo.frame_layers) == 7 and demo.frame_layers[0] == 0 and demo.frame_layers[-1] == 40
    files = write_cluster_demo(demo, tmp_path, workers=1)
    html = files.html.read_text(encoding="utf-8")
    assert "<script src=\"http" not in html
    data, layout, _config, frames = figure_from_page(html)
    names = [f"t{i}" for i in range(16)]
    picture = "centred PCA-3" if center else "PCA-3 about the origin"
    assert [f["name"] for f in frames] == [str(layer) for layer in demo.frame_layers]
    assert [s["label"] for s in layout["sliders"][0]["steps"]] == [str(layer) for layer in demo.frame_layers]
    assert data[2]["text"] == names and data[2]["marker"]["color"] == list(range(16))
    for fr, shown in zip(frames, demo.frames):
        (points,) = fr["data"]
        assert points["text"] == names
        assert [h.split("<br>")[0] for h in points["hovertext"]] == [f'<b>"{t}"</b>' for t in names]
        assert all(f"<br>position {i}<br>" in h for i, h in enumerate(points["hovertext"]))
        xyz = np.column_stack([points["x"], points["y"], points["z"]])
        np.testing.assert_allclose(xyz, np.round(shown.points, 5), atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(xyz, axis=1), 1.0, atol=1e-4)
        title = fr["layout"]["title"]["text"]
        assert f"layer {shown.layer} ({picture})" in title and "16 tokens" in title
        m = demo.sphere.metrics[shown.layer]
        assert f"clusters {m.n_clusters}" in title
    assert frames[0]["layout"]["title"]["text"] == layout["title"]["text"]
