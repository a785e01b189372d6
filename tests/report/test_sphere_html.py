"""The `headlens sphere` page: structure of the plotly figure in the written HTML, escaping, validation,
and a headless-Chromium render (skipped with a message where Chromium is not installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from headlens.errors import HeadlensError
from headlens.report.sphere_html import write_sphere_html
from pages import figure_from_page

NASTY = [
    "<s>",
    " The",
    "</script><script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    " &amp; and &",
    ' "quoted" \'single\'',
    "\n",
    "line\nbreak\t",
    "\U0001f419 octopus",
    "<b>bold</b>",
    "'s",
    "   ",
]
LAYERS = [0, 1, 2, 3, 4, 5]


def make_frames(layers=LAYERS, tokens=NASTY, seed=0, drop=True, site="resid_pre"):
    """Random unit vectors; every other layer drops a token (frames of different N)."""
    rng = np.random.default_rng(seed)
    frames = []
    for j, layer in enumerate(layers):
        keep = list(range(len(tokens)))
        if drop and j % 2 == 1:
            keep = keep[1:]  # e.g. a BOS token dropped from some layers
        raw = rng.normal(size=(len(keep), 3)) * (1 + layer)
        norms = np.linalg.norm(raw, axis=1)
        frame = {
            "layer": layer,
            "points": raw / norms[:, None],
            "tokens": [tokens[k] for k in keep],
            "positions": keep,
            "norms": norms,
            "full_norms": norms * 7.5,
            "explained_variance": 0.25 + 0.05 * j,
        }
        if site:
            frame["site"] = site
        frames.append(frame)
    return frames


def make_metrics(layers=LAYERS):
    return [{"layer": L, "mean_cos": 0.1 * L, "n_clusters": L % 3 + 1, "effective_rank": 2.9 - 0.1 * L}
            for L in layers]


def figure_json_part(html: str) -> str:
    """The page after the inlined plotly.js bundle: the figure and the calls that draw it."""
    return html[html.rindex('<div id="headlens-sphere"'):]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("sphere") / "sphere.html"
    frames = make_frames()
    path = write_sphere_html(out, frames, "tiny <model> & \"demo\"", metrics=make_metrics())
    html = path.read_text(encoding="utf-8")
    return {"path": path, "html": html, "frames": frames, "figure": figure_from_page(html)}


# ------------------------------------------------------------------------------------------- the page

def test_returns_path_and_self_contained(page):
    path, html = page["path"], page["html"]
    assert path.name == "sphere.html" and path.is_file()
    assert html.lstrip().lower().startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    head = html[:html.index("</head>")]
    assert head.index('<meta charset="utf-8"') < head.index("<title>")
    # plotly.js inlined, nothing fetched from the network
    assert len(html) > 1_000_000
    assert re.search(r"<script[^>]*\bsrc\s*=", html) is None
    assert 'src="http' not in html
    assert "plotly.js v" in html.lower() or "plotly.js" in html.lower()
    assert "Plotly.newPlot" in html and "Plotly.addFrames" in html
    # the figure itself carries no NaN/Infinity and is not set to auto-play
    tail = figure_json_part(html)
    for bad in ("NaN", "Infinity"):
        assert bad not in tail
    assert "Plotly.animate" not in tail


def test_no_temporary_files_left(page):
    assert sorted(p.name for p in page["path"].parent.iterdir()) == ["sphere.html"]


def test_one_plotly_frame_per_layer_with_varying_token_counts(page):
    data, layout, _, frames = page["figure"]
    assert len(frames) == len(LAYERS)
    points_index = next(i for i, tr in enumerate(data) if tr.get("name") == "tokens")
    for fr_in, fr_out in zip(page["frames"], frames):
        assert fr_out["traces"] == [points_index]
        (tr,) = fr_out["data"]
        n = len(fr_in["tokens"])
        assert len(tr["x"]) == len(tr["y"]) == len(tr["z"]) == len(tr["hovertext"]) == len(tr["text"]) == n
        assert tr["marker"]["color"] == fr_in["positions"]
        pts = np.column_stack([tr["x"], tr["y"], tr["z"]])
        np.testing.assert_allclose(pts, fr_in["points"], atol=1e-4)
        assert "mode" not in tr  # the label toggle must survive the animation
    assert {len(f["data"][0]["x"]) for f in frames} == {len(NASTY), len(NASTY) - 1}


def test_slider_play_pause_and_label_toggle(page):
    data, layout, _, frames = page["figure"]
    (slider,) = layout["sliders"]
    steps = slider["steps"]
    assert [s["label"] for s in steps] == [str(L) for L in LAYERS]
    assert [s["args"][0] for s in steps] == [[f["name"]] for f in frames]
    assert all(s["method"] == "animate" for s in steps)
    assert all(s["args"][1]["frame"]["redraw"] for s in steps)  # 3-D scenes only repaint with redraw
    buttons = [b for menu in layout["updatemenus"] for b in menu["buttons"]]
    play = next(b for b in buttons if "Play" in b["label"])
    pause = next(b for b in buttons if "Pause" in b["label"])
    assert play["method"] == "animate" and play["args"][0] is None and play["args"][1]["fromcurrent"]
    assert pause["method"] == "animate" and pause["args"][0] == [None]
    modes = {b["args"][0].get("mode") for b in buttons if b["method"] == "restyle"}
    assert modes == {"markers", "markers+text"}


def test_fixed_cube_axes_sphere_and_colour_by_position(page):
    data, layout, _, _ = page["figure"]
    scene = layout["scene"]
    assert scene["aspectmode"] == "cube"
    for ax in ("xaxis", "yaxis", "zaxis"):
        assert scene[ax]["range"] == [-1.1, 1.1] and scene[ax]["autorange"] is False
    sphere = next(tr for tr in data if tr["type"] in ("surface", "mesh3d"))
    assert sphere["opacity"] < 0.5
    n_vertices = np.asarray(sphere["x"]).size
    assert 100 < n_vertices < 5000
    radius = np.sqrt(np.asarray(sphere["x"]) ** 2 + np.asarray(sphere["y"]) ** 2 + np.asarray(sphere["z"]) ** 2)
    np.testing.assert_allclose(radius, 1.0, atol=1e-3)
    pts = next(tr for tr in data if tr.get("name") == "tokens")
    assert pts["type"] == "scatter3d" and pts["mode"] == "markers"
    marker = pts["marker"]
    assert marker["colorscale"] and marker["showscale"]
    all_positions = [p for f in page["frames"] for p in f["positions"]]
    assert (marker["cmin"], marker["cmax"]) == (min(all_positions), max(all_positions))


def test_titles_show_layer_explained_variance_and_metrics(page):
    data, layout, _, frames = page["figure"]
    assert "layer 0" in layout["title"]["text"]
    assert "PCA-3 explains 25.0% of variance" in layout["title"]["text"]
    for j, (fr_in, fr_out) in enumerate(zip(page["frames"], frames)):
        text = fr_out["layout"]["title"]["text"]
        assert f"layer {fr_in['layer']} (resid_pre)" in text
        assert f"PCA-3 explains {100 * fr_in['explained_variance']:.1f}% of variance" in text
        assert "mean cos" in text and "clusters" in text and "effective rank" in text
        assert f"clusters {fr_in['layer'] % 3 + 1}" in text
    # the user title is escaped for plotly's pseudo-HTML
    assert layout["title"]["text"].startswith('tiny &lt;model&gt; &amp; "demo"')
    assert "<title>tiny &lt;model&gt; &amp; \"demo\"</title>" in page["html"]


def test_token_text_is_escaped(page):
    html = page["html"]
    data, layout, _, frames = page["figure"]
    # nothing from the tokens reaches the page as markup
    for needle in ("<script>alert", "alert(1)</script>", "<img", "onerror=alert(2)>"):
        assert needle not in html
    clean = make_frames(tokens=[f"tok{i}" for i in range(len(NASTY))])
    benign = write_sphere_html(page["path"].parent / "benign.html", clean, "benign").read_text(encoding="utf-8")
    (page["path"].parent / "benign.html").unlink()
    assert html.count("<script") == benign.count("<script")
    assert html.lower().count("</script") == benign.lower().count("</script")
    hovers = [h for f in frames for h in f["data"][0]["hovertext"]]
    labels = [t for f in frames for t in f["data"][0]["text"]]
    for h in hovers:
        assert "<" not in re.sub(r"</?b>|<br>", "", h), h  # only our own tags
        assert "\n" not in h and "\t" not in h
    for t in labels:  # WebGL labels obey <b>/<br>/<sup> but not entities: no angle brackets at all
        assert "<" not in t and ">" not in t
    first = frames[0]["data"][0]["hovertext"]
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in first[2]
    assert "&amp;amp;" in first[4]
    assert '"quoted"' in first[5]
    assert "\\n" in first[6] and "line\\nbreak\\t" in first[7]
    assert "\U0001f419" in first[8]
    assert "&lt;b&gt;bold&lt;/b&gt;" in first[9]
    assert "\u2423\u2423\u2423" in first[11]  # visible spaces
    assert "position 2" in first[2] and "|PCA-3 projection|" in first[2] and "|residual|" in first[2]
    norm = page["frames"][0]["norms"][2]
    assert f"{norm:.4g}" in first[2]


def test_deterministic_output(tmp_path):
    a = write_sphere_html(tmp_path / "a.html", make_frames(), "t", make_metrics()).read_bytes()
    b = write_sphere_html(tmp_path / "b.html", make_frames(), "t", make_metrics()).read_bytes()
    assert a == b


def test_minimal_frames_and_nan_metrics(tmp_path):
    frames = make_frames(layers=[3, 7], drop=False, site=None)
    for f in frames:
        del f["full_norms"]
    frames[0]["positions"] = np.arange(len(NASTY))  # numpy ints are fine
    metrics = [{"mean_cos": float("nan"), "effective_rank": 1.5}, {"mean_cos": 0.5, "note": [1, 2]}]
    path = write_sphere_html(tmp_path / "sub" / "m.html", frames, "t", metrics)
    html = path.read_text(encoding="utf-8")
    tail = figure_json_part(html)
    assert "NaN" not in tail
    _, layout, _, plotly_frames = figure_from_page(html)
    assert "mean cos n/a" in plotly_frames[0]["layout"]["title"]["text"]
    assert [s["label"] for s in layout["sliders"][0]["steps"]] == ["3", "7"]
    assert "|residual|" not in plotly_frames[0]["data"][0]["hovertext"][0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.html"]


def test_duplicate_layers_get_distinct_frames(tmp_path):
    frames = make_frames(layers=[1, 1], site=None)
    frames[0]["site"], frames[1]["site"] = "resid_pre", "resid_post"
    _, layout, _, plotly_frames = figure_from_page(
        write_sphere_html(tmp_path / "d.html", frames, "t").read_text(encoding="utf-8"))
    names = [f["name"] for f in plotly_frames]
    assert len(set(names)) == 2
    assert [s["label"] for s in layout["sliders"][0]["steps"]] == ["1 resid_pre", "1 resid_post"]


# ----------------------------------------------------------------------------------------- bad input

def _bad(mutate):
    frames = make_frames()
    mutate(frames)
    return frames


@pytest.mark.parametrize("mutate, message", [
    (lambda fr: fr[2]["points"].__setitem__((1, 0), np.nan), "non-finite"),
    (lambda fr: fr[2]["points"].__setitem__((1, 0), np.inf), "non-finite"),
    (lambda fr: fr[0]["norms"].__setitem__(0, np.nan), "non-finite"),
    (lambda fr: fr[0].__setitem__("full_norms", np.full(len(fr[0]["tokens"]), np.inf)), "non-finite"),
    (lambda fr: fr[1].__setitem__("explained_variance", float("nan")), "explained_variance"),
    (lambda fr: fr[1].__setitem__("explained_variance", 41.2), "explained_variance"),
    (lambda fr: fr[3]["tokens"].pop(), "mismatched lengths"),
    (lambda fr: fr[3]["positions"].pop(), "mismatched lengths"),
    (lambda fr: fr[3].__setitem__("norms", fr[3]["norms"][:-1]), "mismatched lengths"),
    (lambda fr: fr[3].__setitem__("full_norms", fr[3]["full_norms"][:-2]), "mismatched lengths"),
    (lambda fr: fr[0].__setitem__("points", fr[0]["points"][:, :2]), "shape"),
    (lambda fr: fr[0].__setitem__("points", fr[0]["points"] * 2), "unit vectors"),
    (lambda fr: fr[0].__delitem__("norms"), "lacks key"),
    (lambda fr: fr[0].__setitem__("layer", "3"), "layer must be an int"),
    (lambda fr: fr[0].__setitem__("positions", [0.5] * len(fr[0]["tokens"])), "positions"),
    (lambda fr: fr[0].__setitem__("tokens", "abc"), "tokens"),
])
def test_bad_frames_raise(tmp_path, mutate, message):
    target = tmp_path / "bad.html"
    target.write_text("previous")
    with pytest.raises(HeadlensError, match=message):
        write_sphere_html(target, _bad(mutate), "t")
    assert target.read_text() == "previous"  # an old page survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.html"]


def test_bad_frames_list_and_metrics_raise(tmp_path):
    with pytest.raises(HeadlensError, match="non-empty"):
        write_sphere_html(tmp_path / "x.html", [], "t")
    with pytest.raises(HeadlensError, match="metrics has 2 entries"):
        write_sphere_html(tmp_path / "x.html", make_frames(), "t", metrics=make_metrics()[:2])
    wrong = make_metrics()
    wrong[1]["layer"] = 9
    with pytest.raises(HeadlensError, match="metrics\\[1\\] is for layer 9"):
        write_sphere_html(tmp_path / "x.html", make_frames(), "t", metrics=wrong)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- browser

def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium not installed: .ci/run installs Debian's chromium package; install it to run this test")
    return exe


def _run_chromium(exe: str, profile: Path, html: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900",
           "--virtual-time-budget=5000", *extra, html.resolve().as_uri()]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish within 60 s")


def test_page_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    html = write_sphere_html(tmp_path / "page" / "sphere.html", make_frames(), "browser check", make_metrics())

    png = tmp_path / "shot.png"
    shot = _run_chromium(exe, tmp_path / "profile-shot", html, f"--screenshot={png}")
    assert png.is_file() and png.stat().st_size > 0, f"no screenshot (rc={shot.returncode}): {shot.stderr[-2000:]}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1200, 900)
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    background = rgb[2, 2]
    differs = np.any(np.abs(rgb - background) > 12, axis=-1)
    assert differs.mean() > 0.03, f"screenshot looks blank ({differs.mean():.3%} non-background pixels)"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 200, "screenshot has too few distinct colours"
    # the translucent sphere fills the middle of the 3-D scene; saturated marker colours (Viridis) appear
    h, w = rgb.shape[:2]
    middle = differs[int(0.3 * h):int(0.55 * h), int(0.35 * w):int(0.65 * w)]
    assert middle.mean() > 0.5, f"no sphere in the middle of the scene ({middle.mean():.1%} non-background)"
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert np.count_nonzero(saturation > 80) > 300, "no coloured markers in the screenshot"

    dom = _run_chromium(exe, tmp_path / "profile-dom", html, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the DOM keeps the inlined plotly.js source: look only at the markup it drew
    out = re.sub(r"<script\b.*?</script>", "", dom.stdout, flags=re.S | re.I)
    assert len(out) < len(dom.stdout) // 4
    assert 'id="headlens-sphere"' in out and "plotly-graph-div" in out
    assert "js-plotly-plot" in out, "plotly did not draw the graph"
    assert "slider-container" in out or re.search(r'class="[^"]*slider', out)
    assert "updatemenu" in out and "Play" in out and "Pause" in out
    assert "gl-container" in out, "no WebGL 3-D scene in the DOM"
    assert "WebGL is not supported" not in out and "webgl not supported" not in out.lower()
    for L in LAYERS:
        assert f">{L}</text>" in out  # slider tick labels
    assert "PCA-3 explains 25.0% of variance" in out
