"""`headlens sphere` GIF frames: canvas size, token labels (auto / all / none) measured on the drawn Text artists,
axis labels against an independent float64 eigen-decomposition, colour bar and legend, and the CLI flag."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch
from pages import figure_from_page

from headlens.cli import main
from headlens.report.sphere import _frame_jobs
from headlens.report.sphere_figure import build_frame, display_token, greedy_labels
from headlens.residual.sphere import SphereConfig, project

PROMPT = "The true meaning of life is absurdity and suffering. Octopuses have three hearts, and two stop when they swim."
N, D, OUTLIER = 240, 24, 37
WIDTH, HEIGHT = (800, 1200), (700, 1000)  # px: the frames' stated bounds


def _stream(layers=3, n=N, d=D, seed=0) -> tuple[dict[int, torch.Tensor], list[str]]:
    """Synthetic residual streams drifting towards a common direction, token OUTLIER 40x longer than the rest."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    common = torch.randn(d, generator=g, dtype=torch.float64)
    hidden = {}
    for l in range(layers):
        X = base * 0.7**l + common * (1 - 0.7**l) + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
        X[OUTLIER] *= 40.0
        hidden[l] = X
    words = ["the", "cat", "sat", "on", "mat", "octopus", "hearts", "beat", "when", "they", "swim", "prime"]
    return hidden, ["[CLS]"] + [f"{words[i % len(words)]}{i}" for i in range(1, n)]


@pytest.fixture(scope="module")
def streams():
    hidden, tokens = _stream()
    return hidden, tokens, {align: project(hidden, tokens, SphereConfig(align=align)) for align in (True, False)}


def _job(result, layer_index=0, **extra):
    return {**_frame_jobs(result)[layer_index], **extra}


def _boxes(frame):
    renderer = frame.fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in frame.labels]


def _overlap(a, b) -> float:
    """Area (px^2) of the intersection of two display bboxes."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def _close(frame):
    import matplotlib.pyplot as plt

    plt.close(frame.fig)


def test_outlier_is_reported(streams):
    assert [o.position for o in streams[2][True].outliers] == [OUTLIER]


@pytest.mark.parametrize("layer_index", [0, 2])
def test_auto_labels_do_not_overlap_and_keep_first_token_and_outliers(streams, layer_index):
    result = streams[2][True]
    frame = build_frame(_job(result, layer_index, labels="auto"))
    try:
        assert WIDTH[0] <= frame.width <= WIDTH[1] and HEIGHT[0] <= frame.height <= HEIGHT[1]
        boxes = _boxes(frame)
        assert 20 <= len(boxes) < N  # a real subset: not every token fits
        for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
            assert _overlap(a, b) == 0.0, (frame.labels[i].get_text(), frame.labels[j].get_text())
        assert 0 in frame.labelled and OUTLIER in frame.labelled  # kept == positions here: index == position
        for b in boxes:
            assert 0 <= b.x0 and b.x1 <= frame.width and 0 <= b.y0 and b.y1 <= frame.height
        tokens = [result.tokens[p] for p in result.frames[layer_index].kept]
        assert [t.get_text() for t in frame.labels] == [display_token(tokens[i]) for i in frame.labelled]
        renderer = frame.fig.canvas.get_renderer()  # labels stay off the legend and the colour bar
        keep_off = [frame.fig.legends[0].get_window_extent(renderer), frame.cax.get_tightbbox(renderer)]
        assert all(_overlap(a, b) == 0.0 for a in boxes for b in keep_off)
    finally:
        _close(frame)


def test_all_labels_every_token_and_none_no_token(streams):
    result = streams[2][True]
    tokens = [result.tokens[p] for p in result.frames[0].kept]
    frame = build_frame(_job(result, labels="all"))
    try:
        assert frame.labelled == list(range(N))
        assert [t.get_text() for t in frame.labels] == [display_token(t) for t in tokens]
    finally:
        _close(frame)
    frame = build_frame(_job(result, labels="none"))
    try:
        assert frame.labels == [] and frame.labelled == []
        texts = {t.get_text() for t in frame.fig.texts}  # the title and the line under it only
        assert len(frame.fig.texts) == 2 and not texts & {display_token(t) for t in tokens}
    finally:
        _close(frame)


def test_bool_labels_of_older_callers(streams):
    result = streams[2][True]
    assert SphereConfig(labels=True).labels == "all" and SphereConfig(labels=False).labels == "none"
    frame = build_frame(_job(result, labels=False))
    try:
        assert frame.labels == []
    finally:
        _close(frame)


def _eigen(X: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues as fractions of the total (d,), descending; eigenvectors (d, d)) of the centred tokens'
    scatter matrix, in float64 with numpy: the code's PCA, computed another way (eigh, not torch's SVD)."""
    Xc = X.numpy().astype(np.float64)
    Xc = Xc - Xc.mean(0)
    lam, vec = np.linalg.eigh(Xc.T @ Xc)
    lam, vec = lam[::-1], vec[:, ::-1]
    return lam / lam.sum(), vec


def _percent(label: str) -> float:
    return float(re.search(r"\(([\d.]+)% var\)", label).group(1))


def test_axis_labels_are_the_principal_components_variance(streams):
    hidden, _, results = streams
    result = results[False]  # no alignment: the axes are the components themselves
    rows = result.metrics_json()
    for k, f in enumerate(result.frames):
        frac, _ = _eigen(hidden[f.layer])
        frame = build_frame(_job(result, k, labels="none"))
        try:
            labels = [frame.ax.get_xlabel(), frame.ax.get_ylabel(), frame.ax.get_zlabel()]
        finally:
            _close(frame)
        for j, label in enumerate(labels):
            assert label.startswith(f"PC{j + 1} (")
            assert abs(_percent(label) - 100 * frac[j]) <= 0.05 + 1e-9, (label, frac[:3])
        np.testing.assert_allclose(rows[k]["explained_variance_pcs"], frac[:3], rtol=1e-10)
        np.testing.assert_allclose(rows[k]["explained_variance_axes"], frac[:3], rtol=1e-10)


def test_aligned_axis_labels_carry_the_rotated_variance(streams):
    """With alignment the drawn axes are rotations of the components: axis j carries sum_k M[k, j]^2 lambda_k of
    the variance, M recovered here by least squares from the independent PCA coordinates and the drawn points."""
    hidden, _, results = streams
    result = results[True]
    rows = result.metrics_json()
    rotated = 0
    for k, f in enumerate(result.frames):
        frac, vec = _eigen(hidden[f.layer])
        X = hidden[f.layer].numpy()
        Y = (X - X.mean(0)) @ vec[:, :3]  # (N, 3) coordinates on the top components
        P = Y / np.linalg.norm(Y, axis=1, keepdims=True)
        M, *_ = np.linalg.lstsq(P, f.points, rcond=None)  # points = P @ M
        np.testing.assert_allclose(M.T @ M, np.eye(3), atol=1e-8)
        want = (M**2).T @ frac[:3]
        rotated += not np.allclose(np.abs(M), np.eye(3), atol=1e-3)
        frame = build_frame(_job(result, k, labels="none"))
        try:
            labels = [frame.ax.get_xlabel(), frame.ax.get_ylabel(), frame.ax.get_zlabel()]
        finally:
            _close(frame)
        for j, label in enumerate(labels):
            assert abs(_percent(label) - 100 * want[j]) <= 0.05 + 1e-9, (label, want)
        np.testing.assert_allclose(rows[k]["explained_variance_axes"], want, rtol=1e-8)
        np.testing.assert_allclose(rows[k]["explained_variance_pcs"], frac[:3], rtol=1e-10)
    assert rotated >= 1  # the test saw a rotation, not only the identity


def test_colour_bar_and_legend(streams):
    result = streams[2][True]
    frame = build_frame(_job(result, labels="none"))
    try:
        assert "position" in frame.cax.get_ylabel()
        lo, hi = frame.cax.get_ylim()
        assert lo == 0 and hi == N - 1  # the colours span the prompt's positions
        legend = [t.get_text() for t in frame.fig.legends[0].get_texts()]
        assert any("first token" in t for t in legend) and any("outlier" in t for t in legend)
        renderer = frame.fig.canvas.get_renderer()  # tick and axis labels inside the canvas (none clipped)
        box = frame.ax.get_tightbbox(renderer)
        assert 0 <= box.x0 and box.x1 <= frame.width and 0 <= box.y0 and box.y1 <= frame.height
    finally:
        _close(frame)


def test_greedy_labels_against_brute_force_overlap():
    rng = np.random.default_rng(1)
    anchors = rng.uniform(50, 450, size=(150, 2))
    sizes = rng.uniform([10, 8], [60, 12], size=(150, 2))
    placed = greedy_labels(anchors, sizes, range(150), {3, 7}, (0, 0, 500, 500), np.array([[0, 0, 100, 100]]))
    assert 3 in placed and 7 in placed
    boxes = [(x, y, x + sizes[i, 0], y + sizes[i, 1]) for i, (x, y, _) in placed.items()] + [(0, 0, 100, 100)]
    for a, b in itertools.combinations(boxes, 2):
        assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
    assert all(0 <= b[0] and b[2] <= 500 and 0 <= b[1] and b[3] <= 500 for b in boxes)


# --------------------------------------------------------------------------------------------------- CLI


def test_help_lists_the_label_choices(capsys):
    assert main(["sphere", "--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"--labels\s+\{auto,all,none\}", out) and "--no-labels" in out


@pytest.mark.parametrize("labels", ["none", "all", "auto"])
def test_cli_labels_run(ckpts, capsys, tmp_path, labels):
    from PIL import Image

    d = ckpts.path("llama", "gqa", "hf_dir")
    code = main(["sphere", "--weights", str(d), "--prompt", PROMPT, "--layers", "1", "--labels", labels,
                 "--outlier-factor", "1.5", "--out-dir", str(tmp_path), "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    with Image.open(tmp_path / "tokens.gif") as im:
        assert WIDTH[0] <= im.size[0] <= WIDTH[1] and HEIGHT[0] <= im.size[1] <= HEIGHT[1]
    full = json.loads((tmp_path / "sphere.json").read_text())
    tokens = full["tokens"]
    _, _, _, frames = figure_from_page((tmp_path / "tokens.html").read_text(encoding="utf-8"))
    hovers = frames[0]["data"][0]["hovertext"]  # the page keeps every token on hover, whatever --labels says
    assert len(hovers) == len(tokens) and all(f"position {i}<" in h for i, h in enumerate(hovers))
    rows = json.loads((tmp_path / "sphere_metrics.json").read_text())["metrics"]
    assert len(rows[0]["explained_variance_pcs"]) == 3 and len(rows[0]["explained_variance_axes"]) == 3
