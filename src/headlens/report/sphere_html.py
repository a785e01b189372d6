"""The interactive page of `headlens sphere`: tokens on the unit sphere, one animation frame per layer.

A pure function of its inputs: plain arrays and strings in, one self-contained HTML file out (plotly.js
inlined, so the page works offline). No model code here. The caller projects each layer's residual stream
onto its top 3 principal components and normalises every token onto the unit sphere; this module checks
those arrays, escapes the token text for plotly's pseudo-HTML and lays out the figure.
"""

from __future__ import annotations

import html
import math
import os
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from headlens.errors import HeadlensError
from headlens.io.files import atomic_path

__all__ = ["write_sphere_html"]

# Trace order in the figure; frames update only the token traces.
_SPHERE, _GRID, _POINTS = 0, 1, 2
_UNIT_TOL = 1e-3          # rows of `points` must be unit vectors to this tolerance
_LABEL_MAX = 16           # characters of a token shown as an on-plot label
_DIV_ID = "headlens-sphere"
_METRIC_NAMES = {"mean_cos": "mean cos", "n_clusters": "clusters", "effective_rank": "effective rank"}


# ---------------------------------------------------------------------------------------------- validation

def _finite_array(value: Any, what: str, shape_tail: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise HeadlensError(f"{what} must be numeric") from None
    if arr.ndim != 1 + len(shape_tail) or tuple(arr.shape[1:]) != shape_tail:
        want = "(N, " + ", ".join(map(str, shape_tail)) + ")" if shape_tail else "(N,)"
        raise HeadlensError(f"{what} must have shape {want}, got {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise HeadlensError(f"{what} contains {bad} non-finite value(s) (NaN or inf)")
    return arr


def _check_frame(i: int, frame: dict) -> dict:
    if not isinstance(frame, dict):
        raise HeadlensError(f"frame {i} must be a dict, got {type(frame).__name__}")
    missing = [k for k in ("layer", "points", "tokens", "positions", "norms", "explained_variance")
               if k not in frame]
    if missing:
        raise HeadlensError(f"frame {i} lacks key(s): {', '.join(missing)}")
    layer = frame["layer"]
    if isinstance(layer, bool) or not isinstance(layer, Integral):
        raise HeadlensError(f"frame {i}: layer must be an int, got {layer!r}")
    where = f"frame {i} (layer {int(layer)})"
    points = _finite_array(frame["points"], f"{where}: points", (3,))
    n = points.shape[0]
    if n:
        radius = np.linalg.norm(points, axis=1)
        worst = float(np.max(np.abs(radius - 1.0)))
        if worst > _UNIT_TOL:
            raise HeadlensError(f"{where}: points must be unit vectors (a row has norm "
                                f"{radius[int(np.argmax(np.abs(radius - 1.0)))]:.4g})")
    tokens = frame["tokens"]
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise HeadlensError(f"{where}: tokens must be a list of strings")
    if not all(isinstance(t, str) for t in tokens):
        raise HeadlensError(f"{where}: tokens must be a list of strings")
    positions = frame["positions"]
    if isinstance(positions, np.ndarray):
        positions = positions.tolist()
    if (isinstance(positions, str) or not isinstance(positions, Sequence)
            or not all(isinstance(p, Integral) and not isinstance(p, bool) for p in positions)):
        raise HeadlensError(f"{where}: positions must be a list of ints")
    pos = [int(p) for p in positions]
    norms = _finite_array(frame["norms"], f"{where}: norms", ())
    full = frame.get("full_norms")
    full_norms = None if full is None else _finite_array(full, f"{where}: full_norms", ())
    lengths = {"points": n, "tokens": len(tokens), "positions": len(pos), "norms": len(norms)}
    if full_norms is not None:
        lengths["full_norms"] = len(full_norms)
    if len(set(lengths.values())) != 1:
        detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise HeadlensError(f"{where}: mismatched lengths ({detail}); all must equal the number of tokens")
    ev = frame["explained_variance"]
    if isinstance(ev, bool) or not isinstance(ev, Real) or not math.isfinite(float(ev)):
        raise HeadlensError(f"{where}: explained_variance must be a finite number, got {ev!r}")
    ev = float(ev)
    if not -1e-6 <= ev <= 1 + 1e-6:
        raise HeadlensError(f"{where}: explained_variance must be a fraction in [0, 1], got {ev:.4g}")
    site = frame.get("site")
    if site is not None and not isinstance(site, str):
        raise HeadlensError(f"{where}: site must be a string, got {site!r}")
    return {"layer": int(layer), "points": points, "tokens": list(tokens), "positions": pos, "norms": norms,
            "full_norms": full_norms, "explained_variance": min(max(ev, 0.0), 1.0), "site": site}


# ------------------------------------------------------------------------------------------------ text

def _visible(token: str) -> str:
    """Make whitespace and control characters visible; drop what UTF-8 cannot carry (lone surrogates)."""
    token = token.encode("utf-8", "replace").decode("utf-8")
    out = []
    for ch in token:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == " ":
            out.append("\u2423")  # OPEN BOX: a visible space, so " the" and "the" differ
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _esc(text: str) -> str:
    """Escape for plotly's pseudo-HTML (which decodes &amp; &lt; &gt; back): no tag survives from data.

    Quotes need no escaping (plotly writes text nodes, and the JSON in the page escapes quotes and '<').
    """
    return html.escape(text, quote=False)


def _label_safe(text: str) -> str:
    """On-plot 3-D labels are WebGL text: plotly draws entities literally but still obeys <b>, <br>, <sup>.

    So '<' and '>' become the look-alikes U+2039/U+203A: no tag can form and "<s>" still reads as a tag.
    """
    return text.replace("<", "\u2039").replace(">", "\u203a")


def _num(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _metrics_line(metrics: dict | None) -> str:
    if not metrics:
        return ""
    parts = []
    for key, value in metrics.items():
        if key in ("layer", "site"):
            continue
        name = _METRIC_NAMES.get(key, str(key).replace("_", " "))
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, Integral):
            text = str(int(value))
        elif isinstance(value, Real):
            text = _num(float(value)) if math.isfinite(float(value)) else "n/a"
        elif isinstance(value, str):
            text = value
        else:
            continue  # lists, arrays: not a one-line figure
        parts.append(f"{_esc(name)} {_esc(text)}")
    return " \u00b7 ".join(parts)


def _frame_title(title: str, fr: dict, metrics: dict | None) -> str:
    site = f" ({_esc(fr['site'])})" if fr["site"] else ""
    line = (f"layer {fr['layer']}{site} \u2014 PCA-3 explains {100 * fr['explained_variance']:.1f}% "
            f"of variance \u00b7 {len(fr['tokens'])} tokens")
    text = f"{_esc(title)}<br><span style='font-size:14px'>{line}</span>"
    extra = _metrics_line(metrics)
    if extra:
        text += f"<br><span style='font-size:12px'>{extra}</span>"
    return text


# ---------------------------------------------------------------------------------------------- figure

def _sphere_traces(go) -> list:
    # 37 x 19 grid: a smooth silhouette at opacity 0.12, about 20 kB of the file.
    u = np.linspace(0, 2 * np.pi, 37)
    v = np.linspace(0, np.pi, 19)
    xs = np.round(np.outer(np.cos(u), np.sin(v)), 4)
    ys = np.round(np.outer(np.sin(u), np.sin(v)), 4)
    zs = np.round(np.outer(np.ones_like(u), np.cos(v)), 4)
    surface = go.Surface(x=xs.tolist(), y=ys.tolist(), z=zs.tolist(), opacity=0.12, showscale=False,
                         colorscale=[[0, "#7f8fa6"], [1, "#7f8fa6"]], hoverinfo="skip",
                         name="unit sphere", showlegend=False, lighting={"ambient": 0.9})
    # Equator and two meridians as thin lines: they give the eye the sphere's orientation.
    t = np.linspace(0, 2 * np.pi, 73)
    c, s, zero = np.round(np.cos(t), 4), np.round(np.sin(t), 4), np.zeros_like(t)
    gx, gy, gz = [], [], []
    for x, y, z in ((c, s, zero), (c, zero, s), (zero, c, s)):
        gx += x.tolist() + [None]
        gy += y.tolist() + [None]
        gz += z.tolist() + [None]
    grid = go.Scatter3d(x=gx, y=gy, z=gz, mode="lines", line={"color": "rgba(90,100,120,0.35)", "width": 2},
                        hoverinfo="skip", name="great circles", showlegend=False)
    return [surface, grid]


def _points_data(fr: dict) -> dict:
    pts = np.round(fr["points"], 5)
    hover, labels = [], []
    for k, tok in enumerate(fr["tokens"]):
        vis = _visible(tok)
        label = vis if len(vis) <= _LABEL_MAX else vis[: _LABEL_MAX - 1] + "\u2026"
        labels.append(_label_safe(label))
        h = (f"<b>\"{_esc(vis)}\"</b><br>position {fr['positions'][k]}"
             f"<br>|PCA-3 projection| {_num(float(fr['norms'][k]))}")
        if fr["full_norms"] is not None:
            h += f"<br>|residual| {_num(float(fr['full_norms'][k]))}"
        hover.append(h)
    return {
        "x": pts[:, 0].tolist(), "y": pts[:, 1].tolist(), "z": pts[:, 2].tolist(),
        "text": labels, "hovertext": hover, "marker_color": list(fr["positions"]),
    }


def _points_trace(go, fr: dict, cmin: int, cmax: int):
    d = _points_data(fr)
    return go.Scatter3d(
        x=d["x"], y=d["y"], z=d["z"], mode="markers", text=d["text"], hovertext=d["hovertext"],
        hovertemplate="%{hovertext}<extra></extra>", textposition="top center",
        textfont={"size": 10, "color": "#333"}, name="tokens", showlegend=False,
        marker={"size": 5, "color": d["marker_color"], "colorscale": "Viridis", "cmin": cmin, "cmax": cmax,
                "showscale": True, "line": {"width": 0.5, "color": "#222"},
                "colorbar": {"title": {"text": "token position"}, "thickness": 14, "len": 0.6}},
    )


def _frame_points(go, fr: dict):
    d = _points_data(fr)
    # No `mode` here: the label toggle's restyle survives the animation.
    return go.Scatter3d(x=d["x"], y=d["y"], z=d["z"], text=d["text"], hovertext=d["hovertext"],
                        marker={"color": d["marker_color"]})


def _frame_names(frames: list[dict]) -> tuple[list[str], list[str]]:
    """(unique plotly frame names, slider labels): the layer, with the site when a layer repeats."""
    layers = [fr["layer"] for fr in frames]
    duplicated = len(set(layers)) != len(layers)
    names, labels = [], []
    for i, fr in enumerate(frames):
        label = str(fr["layer"])
        if duplicated and fr["site"]:
            label = f"{fr['layer']} {fr['site']}"
        labels.append(label)
        names.append(label if label not in names else f"{label} #{i}")
    return names, labels


def _build_figure(title: str, frames: list[dict], metrics: list[dict | None]):
    import plotly.graph_objects as go

    all_pos = [p for fr in frames for p in fr["positions"]]
    cmin = min(all_pos) if all_pos else 0
    cmax = max(all_pos) if all_pos else 1
    if cmax <= cmin:
        cmax = cmin + 1
    names, labels = _frame_names(frames)

    plotly_frames = [
        go.Frame(name=names[i], data=[_frame_points(go, fr)], traces=[_POINTS],
                 layout={"title": {"text": _frame_title(title, fr, metrics[i])}})
        for i, fr in enumerate(frames)
    ]
    fig = go.Figure(data=_sphere_traces(go) + [_points_trace(go, frames[0], cmin, cmax)], frames=plotly_frames)

    axis = {"range": [-1.1, 1.1], "autorange": False, "showspikes": False, "zeroline": False,
            "backgroundcolor": "rgba(0,0,0,0)", "gridcolor": "#dde"}
    step_args = {"mode": "immediate", "frame": {"duration": 0, "redraw": True}, "transition": {"duration": 0}}
    fig.update_layout(
        title={"text": _frame_title(title, frames[0], metrics[0]), "x": 0.5, "xanchor": "center",
               "y": 0.97, "yanchor": "top", "font": {"size": 17}},
        scene={"xaxis": {**axis, "title": {"text": "PC1"}}, "yaxis": {**axis, "title": {"text": "PC2"}},
               "zaxis": {**axis, "title": {"text": "PC3"}}, "aspectmode": "cube",
               "domain": {"x": [0, 1], "y": [0.12, 1]},
               "camera": {"eye": {"x": 1.35, "y": 1.35, "z": 0.9}}},
        margin={"l": 10, "r": 10, "t": 100, "b": 10},
        paper_bgcolor="white",
        hoverlabel={"align": "left"},
        updatemenus=[
            {"type": "buttons", "direction": "left", "x": 0.0, "y": 0.07, "xanchor": "left", "yanchor": "middle",
             "showactive": False,
             "buttons": [
                 {"label": "\u25b6 Play", "method": "animate",
                  "args": [None, {"mode": "immediate", "fromcurrent": True,
                                  "frame": {"duration": 900, "redraw": True}, "transition": {"duration": 0}}]},
                 {"label": "\u275a\u275a Pause", "method": "animate",
                  "args": [[None], {"mode": "immediate", "frame": {"duration": 0, "redraw": False},
                                    "transition": {"duration": 0}}]},
             ]},
            {"type": "buttons", "direction": "left", "x": 1.0, "y": 0.07, "xanchor": "right", "yanchor": "middle",
             "showactive": True, "active": 0,
             "buttons": [
                 {"label": "markers", "method": "restyle", "args": [{"mode": "markers"}, [_POINTS]]},
                 {"label": "token labels", "method": "restyle", "args": [{"mode": "markers+text"}, [_POINTS]]},
             ]},
        ],
        sliders=[{
            "active": 0, "x": 0.16, "len": 0.66, "y": 0.12, "yanchor": "top", "pad": {"t": 10, "b": 0},
            "currentvalue": {"prefix": "layer ", "visible": True, "xanchor": "left"},
            "transition": {"duration": 0},
            "steps": [{"label": labels[i], "method": "animate", "args": [[names[i]], step_args]}
                      for i in range(len(frames))],
        }],
    )
    return fig


def write_sphere_html(path: str | os.PathLike, frames: list[dict], title: str,
                      metrics: list[dict] | None = None) -> Path:
    """Write the self-contained animated sphere page to ``path`` (atomically) and return that path.

    ``frames``: one dict per layer, in slider order, with ``layer`` (int), ``points`` ((N, 3) unit rows),
    ``tokens`` (N decoded strings), ``positions`` (N ints), ``norms`` ((N,) norm of each token's 3-D
    projection before normalising), ``explained_variance`` (fraction of variance the 3 components carry),
    and optionally ``full_norms`` ((N,) residual-stream norms) and ``site`` (str). N may differ between
    frames. ``metrics``: optional, one dict per frame (e.g. ``mean_cos``, ``n_clusters``,
    ``effective_rank``), shown under the frame's title. Raises HeadlensError on non-finite or mismatched
    input; the page never contains NaN.
    """
    if not isinstance(title, str):
        raise HeadlensError(f"title must be a string, got {type(title).__name__}")
    if isinstance(frames, dict) or not isinstance(frames, Sequence) or len(frames) == 0:
        raise HeadlensError("frames must be a non-empty list of per-layer dicts")
    checked = [_check_frame(i, fr) for i, fr in enumerate(frames)]
    if metrics is None:
        per_frame: list[dict | None] = [None] * len(checked)
    else:
        if isinstance(metrics, dict) or not isinstance(metrics, Sequence):
            raise HeadlensError("metrics must be a list with one dict per frame")
        if len(metrics) != len(checked):
            raise HeadlensError(f"metrics has {len(metrics)} entries but there are {len(checked)} frames")
        per_frame = []
        for i, (m, fr) in enumerate(zip(metrics, checked)):
            if m is not None and not isinstance(m, dict):
                raise HeadlensError(f"metrics[{i}] must be a dict, got {type(m).__name__}")
            if m and "layer" in m and m["layer"] != fr["layer"]:
                raise HeadlensError(f"metrics[{i}] is for layer {m['layer']} but frame {i} is layer {fr['layer']}")
            per_frame.append(m)

    fig = _build_figure(title, checked, per_frame)
    page = fig.to_html(include_plotlyjs=True, full_html=True, auto_play=False, div_id=_DIV_ID,
                       default_width="100%", default_height="100vh",
                       config={"displaylogo": False, "responsive": True})
    head_extra = f"<title>{_esc(title)}</title><style>body{{margin:0}}</style>"
    charset = '<meta charset="utf-8" />'
    if charset in page:  # keep the charset declaration first in <head>
        page = page.replace(charset, charset + head_extra, 1)
    else:
        page = page.replace("<head>", "<head>" + head_extra, 1)
    final = Path(path)
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(page)
    return final
