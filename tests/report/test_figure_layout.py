"""The figures' layout, measured on the drawn figure: the attention heatmap, the router's load heatmap and
co-activation grid and the ov spectrum plot stay within a bounded pixel size whatever the input size, label at
most 40 positions an axis, and no text box (``Text.get_window_extent`` after ``fig.canvas.draw()``) overlaps
another, a neighbouring panel, or the figure's edge. Pixel sizes are read back from the PNG with PIL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headlens.cli import main
from headlens.moe.statistics import LayerStats
from headlens.report import ov as ov_report
from headlens.report import router as router_report

# the tokens below include CJK, which DejaVu Sans draws as boxes (and says so): the layout is what is tested
pytestmark = pytest.mark.filterwarnings("ignore:Glyph .* missing from font")

MAX_PX = 1400  # neither side of any of these PNGs may exceed this
MIN_PX = 300  # nor be smaller (a readable picture)
MAX_LABELS = 40
MIN_FONT_PT = 7

# Tokens of every awkward kind: long, whitespace-only, a newline, '$' (mathtext), non-Latin, empty.
TOKENS = ["The", " cat", "Ġsupercalifragilisticexpialidocious", " ", "\n", "$x$", "日本語", "", " on", "mat."]


def _softmax_rows(n: int, seed: int = 0) -> np.ndarray:
    """(n, n) causal attention probabilities: each row a softmax over the keys up to the query."""
    x = np.random.default_rng(seed).normal(size=(n, n))
    x = np.where(np.tril(np.ones((n, n), bool)), x, -np.inf)
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _tokens(n: int) -> list[str]:
    return [TOKENS[i % len(TOKENS)] for i in range(n)]


def _drawn(fig, dpi: int):
    """Draw ``fig`` at the dpi it is saved with; returns the renderer."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _drawn_labels(axis) -> list:
    """The tick labels ``axis`` draws: visible, non-empty, at a tick inside the view interval (matplotlib keeps
    labels of ticks beyond it that it does not draw)."""
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-9 * max(abs(lo), abs(hi), 1.0)
    out = []
    for tick, loc in zip(axis.get_major_ticks(), axis.get_majorticklocs()):
        if lo - eps <= loc <= hi + eps:
            out += [t for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text().strip()]
    return out


def _texts(fig, renderer) -> list:
    """Every drawn, non-empty text of ``fig`` with its box: the figure's own (the suptitle), and of each shown
    axes (the colour bar's too) its title, axis labels and visible tick labels."""
    texts = list(fig.texts)
    for ax in fig.axes:
        if ax.axison:
            texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *_drawn_labels(ax.xaxis), *_drawn_labels(ax.yaxis)]
    return [(t, t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


CLEARANCE_PX = 2.0  # boxes closer than this count as running into each other (touching is not readable)


def _overlap(a, b, clearance: float = CLEARANCE_PX) -> bool:
    """Whether boxes ``a`` and ``b`` overlap, or come closer than ``clearance`` pixels, both ways."""
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > -clearance
            and min(a.y1, b.y1) - max(a.y0, b.y0) > -clearance)


def _assert_inside(fig, boxes) -> None:
    w, h = fig.bbox.width, fig.bbox.height
    for t, b in boxes:
        assert b.x0 >= -0.5 and b.y0 >= -0.5 and b.x1 <= w + 0.5 and b.y1 <= h + 0.5, \
            (t.get_text(), tuple(b.bounds), (w, h))


def _assert_disjoint(boxes) -> None:
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            assert not _overlap(a, b), (ta.get_text(), tb.get_text(), tuple(a.bounds), tuple(b.bounds))


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


# ------------------------------------------------------------------------------------------ attention heatmap


@pytest.mark.parametrize("n", [5, 40, 256, 1000])
def test_attention_heatmap_bounded_and_labels_readable(n, tmp_path):
    probs, tokens = _softmax_rows(n), _tokens(n)
    fig = ov_report.attention_heatmap_figure(probs, tokens, "some-org/some-rather-long-model-name layer 11 head 7 "
                                                            "(kv head 3): attention")
    renderer = _drawn(fig, ov_report.HEATMAP_DPI)
    ax = fig.axes[0]
    xs, ys = _drawn_labels(ax.xaxis), _drawn_labels(ax.yaxis)
    for labels, locs in ((xs, ax.get_xticks()), (ys, ax.get_yticks())):
        assert len(labels) == len(locs)
        if n <= MAX_LABELS:  # every token, in order
            assert [round(v) for v in locs] == list(range(n))
        else:
            assert 10 <= len(labels) <= MAX_LABELS
            steps = np.diff(locs)
            assert locs[0] == 0 and np.all(steps == steps[0])  # every s-th position
        for t, pos in zip(labels, locs):  # each label names the token at its position
            tok = tokens[int(round(pos))]
            visible = repr(tok)[1:-1] if tok.strip() else repr(tok)
            text = t.get_text().replace("\\$", "$")
            assert visible[:9] in text, (pos, tok, text)
            if n > MAX_LABELS:
                assert text.startswith(f"{int(round(pos))}: ")
            assert t.get_fontsize() >= MIN_FONT_PT
    boxes = _texts(fig, renderer)
    _assert_inside(fig, boxes)
    _assert_disjoint(boxes)
    image_box = ax.get_window_extent(renderer)
    assert image_box.width >= 200 and image_box.height >= 200  # the matrix itself is not squeezed away
    for t, b in boxes:  # no text lies on the matrix
        assert not _overlap(b, image_box), t.get_text()
    path = _save(fig, tmp_path / "h.png", ov_report.HEATMAP_DPI)
    w, h = _png_size(path)
    assert MIN_PX <= w <= MAX_PX and MIN_PX <= h <= MAX_PX, (n, w, h)


def test_attention_heatmap_saved_size_through_the_public_function(tmp_path):
    """``save_attention_heatmap`` (what ``ov --heatmap`` calls) writes a bounded PNG for 1000 tokens."""
    path = ov_report.save_attention_heatmap(tmp_path / "a.png", _softmax_rows(1000), _tokens(1000), "t")
    w, h = _png_size(path)
    assert MIN_PX <= w <= MAX_PX and MIN_PX <= h <= MAX_PX


def test_ov_heatmap_on_toy_traces_bounded_and_json_keeps_the_full_matrix(tmp_path, capsys):
    """A real run: a toy traced over 300 tokens, ``ov --traces --heatmap --json``: the PNG is bounded and the JSON's
    attention is the whole (300, 300) matrix, equal to the traced probabilities read straight from the file."""
    from safetensors.numpy import load_file

    toy, traces, out = tmp_path / "toy.safetensors", tmp_path / "tr", tmp_path / "out"
    assert main(["toy", "create", "--out", str(toy), "--d-model", "16", "--heads", "2", "--head-dim", "8",
                 "--layers", "1"]) == 0
    assert main(["toy", "trace", "--weights", str(toy), "--tokens", "300", "--out", str(traces)]) == 0
    assert main(["ov", "--weights", str(toy), "--num-heads", "2", "--traces", str(traces), "--head", "1",
                 "--latent-dim", "2", "--heatmap", "--json", "--out-dir", str(out)]) == 0
    capsys.readouterr()
    png = out / "toy_layer0_head1_heatmap.png"
    w, h = _png_size(png)
    assert MIN_PX <= w <= MAX_PX and MIN_PX <= h <= MAX_PX, (w, h)
    js = out / "toy_layer0_head1.json"
    attn = np.array(json.loads(js.read_text())["attention"])
    expected = load_file(str(traces) + ".safetensors")["layer0.probs"][1]  # (N, N) of head 1
    assert attn.shape == (300, 300)
    np.testing.assert_allclose(attn, expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ router


def _stats(layers: int, experts: int, seed: int = 0) -> list[LayerStats]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(layers):
        c = rng.random((experts, experts))
        np.fill_diagonal(c, 0)
        f = rng.random(experts)
        out.append(LayerStats(layer=2 * i + 1, tokens=100, experts=experts, top_k=2, load_share=(f / f.sum()).tolist(),
                              load_cv=0.1, load_max_over_mean=1.5, dead_experts=[], load_entropy_norm=0.9,
                              routing_entropy_norm=0.5, routing_entropy_kind="softmax of the router logits",
                              repeat_consecutive=None, coactivation=c.tolist()))
    return out


def _panel_texts(ax, renderer) -> list:
    """A panel's own texts with their boxes: title, axis labels, visible tick labels."""
    texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *_drawn_labels(ax.xaxis), *_drawn_labels(ax.yaxis)]
    return [(t, t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("layers,experts", [(1, 8), (2, 8), (3, 8), (4, 64), (6, 8), (6, 128)])
def test_coactivation_panels_do_not_run_into_each_other(layers, experts, tmp_path):
    fig = router_report.coactivation_figure(_stats(layers, experts), "some-org/Some-MoE-30B-A3B")
    renderer = _drawn(fig, router_report.COACTIVATION_DPI)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == layers
    colorbars = {im.colorbar.ax for ax in panels for im in ax.get_images() if im.colorbar is not None}
    assert len(colorbars) == 1  # one shared scale
    colorbars = list(colorbars)
    for i, a in enumerate(panels):
        a_texts = _panel_texts(a, renderer)
        assert a.yaxis.label.get_text() or i % min(layers, 4) != 0  # the first column names its axis
        for j, b in enumerate(panels):
            if i == j:
                continue
            b_box = b.get_window_extent(renderer)
            for t, box in a_texts:
                assert not _overlap(box, b_box), (i, j, t.get_text())
                for u, other in _panel_texts(b, renderer):
                    assert not _overlap(box, other), (i, j, t.get_text(), u.get_text())
        for t, box in a_texts:  # nor into the colour bar
            assert not _overlap(box, colorbars[0].get_window_extent(renderer)), t.get_text()
    boxes = _texts(fig, renderer)
    _assert_inside(fig, boxes)
    _assert_disjoint(boxes)
    w, h = _png_size(_save(fig, tmp_path / "c.png", router_report.COACTIVATION_DPI))
    assert MIN_PX <= w <= MAX_PX and MIN_PX <= h <= MAX_PX, (layers, w, h)


def _save(fig, path: Path, dpi: int) -> Path:
    from headlens.report.figures import save_figure

    return save_figure(fig, path, dpi=dpi)


@pytest.mark.parametrize("layers", [1, 48])
def test_coactivation_saved_size_bounded_for_many_layers(layers, tmp_path):
    path = router_report.save_coactivation(tmp_path / "c.png", _stats(layers, 16), "m")
    w, h = _png_size(path)
    assert MIN_PX <= w <= MAX_PX and MIN_PX <= h <= MAX_PX, (layers, w, h)


@pytest.mark.parametrize("layers,experts", [(1, 8), (94, 128)])
def test_load_heatmap_bounded_and_labels_readable(layers, experts, tmp_path):
    fig = router_report.load_heatmap_figure(_stats(layers, experts), "some-org/Some-MoE-30B-A3B")
    renderer = _drawn(fig, router_report.LOAD_DPI)
    ax = fig.axes[0]
    ys, xs = _drawn_labels(ax.yaxis), _drawn_labels(ax.xaxis)
    if layers <= MAX_LABELS:  # every layer, by its decoder index
        assert [t.get_text() for t in ys] == [str(2 * i + 1) for i in range(layers)]
    assert 1 <= len(ys) <= MAX_LABELS and 1 <= len(xs) <= MAX_LABELS
    boxes = _texts(fig, renderer)
    _assert_inside(fig, boxes)
    _assert_disjoint(boxes)
    w, h = _png_size(_save(fig, tmp_path / "l.png", router_report.LOAD_DPI))
    assert MIN_PX // 2 <= h and w <= MAX_PX and h <= MAX_PX, (w, h)


def test_spectrum_plot_bounded_for_a_long_spectrum(tmp_path):
    s = np.sort(np.random.default_rng(0).random(4096))[::-1]
    e = np.cumsum(s**2) / np.sum(s**2)
    path = ov_report.save_spectrum_plot(tmp_path / "s.png", s, e, 1024, "a long spectrum", rank=4000)
    w, h = _png_size(path)
    assert w <= MAX_PX and h <= MAX_PX
