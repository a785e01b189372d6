"""One GIF frame of ``headlens sphere`` as a matplotlib figure.

The translucent unit sphere; the tokens coloured by their position in the prompt (a colour bar says so); the
first token (a decoder's attention sink) and the reported outliers marked, with a legend; each axis labelled with
the share of the layer's variance along it; and token labels: ``all`` (the notebook's look), ``none``, or ``auto``,
a subset that does not overlap, chosen greedily from the labels' text extents (first token and outliers first).

Labels are 2-D matplotlib ``Text`` artists in figure coordinates, placed where the 3-D projection puts each point
(400 ``Text3D`` artists cost ~0.6 s a frame). The scene is drawn once; the labels are then drawn on top of it
with ``draw_artist``, so they cost no second full draw. This module imports no torch (it runs in worker processes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from headlens.report.figures import _pyplot
from headlens.selection import LABEL_CHOICES

FRAME_INCHES = (10.0, 8.5)  # 1000 x 850 px at the default 100 dpi
ZOOM = 1.04  # the 3-D box fills a little more of its axes; tick and axis labels stay inside the canvas
TICKS = (-1.0, -0.5, 0.0, 0.5, 1.0)
SPHERE_GRID = 40  # the notebook drew a 100 x 100 surface; 40 x 40 looks the same at alpha 0.1
FIRST_COLOUR, OUTLIER_COLOUR = "#e8590c", "#c92a2a"
LABEL_GAP = 3.0  # px kept free around every auto label
# auto labels sit on a faint white box, legible over the dots (all: the notebook's bare text, cheaper to draw)
LABEL_BOX = {"boxstyle": "square,pad=0.08", "facecolor": "white", "alpha": 0.6, "linewidth": 0}
AUTO_MAX_LABELS = 120  # auto labels at most this many tokens besides the first and the outliers (legible, and each
# label costs ~2 ms to draw)
_NEAR, _MARKED = 4.0, 10.0  # px from a point to its label's first tries (a marked point's mark is ~9 px wide)
_RINGS = (18.0, 32.0, 48.0)  # px: further tries for a label that must be drawn


@dataclass
class FrameFigure:
    """A frame drawn and ready to encode. ``labels[i]`` is the ``Text`` of point ``labelled[i]`` (indices into the
    job's points); ``width``/``height`` in pixels; ``cax`` is the colour bar's axes."""

    fig: object  # matplotlib Figure
    ax: object  # the 3-D axes
    cax: object  # the colour bar's axes
    labels: list = field(default_factory=list)  # Text artists of the token labels
    labelled: list[int] = field(default_factory=list)
    width: int = 0
    height: int = 0


def label_mode(value) -> str:
    """``labels`` of a job or config as one of :data:`LABEL_CHOICES` (True: ``all``, False: ``none``)."""
    if isinstance(value, bool):
        return "all" if value else "none"
    if value not in LABEL_CHOICES:
        raise ValueError(f"labels {value!r}: choose {', '.join(LABEL_CHOICES)}")
    return value


def display_token(token: str) -> str:
    """A token as one line of label text: newlines and tabs shown escaped."""
    return token.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _scene(plt, job: dict, pts: np.ndarray, positions: np.ndarray, first: int | None, outliers: list[int]):
    """The figure with everything but the token labels: (fig, 3-D axes, colour-bar axes)."""
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    dpi = job.get("dpi", 100)
    fig = plt.figure(figsize=job.get("inches", FRAME_INCHES), dpi=dpi)
    ax = fig.add_axes((0.0, 0.035, 0.86, 0.87), projection="3d")
    ax.computed_zorder = False  # sphere, then points, then the marks on top
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, SPHERE_GRID), np.linspace(0, np.pi, SPHERE_GRID), indexing="ij")
    ax.plot_surface(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="c", alpha=0.1,
                    edgecolor="none", shade=False, zorder=1)
    norm = Normalize(vmin=0, vmax=max(int(positions.max()) if len(positions) else 1, 1))
    sc = ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=positions, cmap="viridis", norm=norm, s=22,
                    depthshade=False, zorder=2)
    if outliers:
        o = pts[outliers]
        ax.scatter(o[:, 0], o[:, 1], o[:, 2], s=190, facecolors="none", edgecolors=OUTLIER_COLOUR, linewidths=1.8,
                   depthshade=False, zorder=3)
    if first is not None:
        ax.scatter([pts[first, 0]], [pts[first, 1]], [pts[first, 2]], marker="*", s=260, c=FIRST_COLOUR,
                   edgecolors="black", linewidths=0.8, depthshade=False, zorder=4)
    for axis in "xyz":  # five ticks an axis: legible, and ticks are much of a 3-D axes' cost
        getattr(ax, f"set_{axis}lim")(-1, 1)
        getattr(ax, f"set_{axis}ticks")(TICKS)
    ax.set_box_aspect((1, 1, 1), zoom=ZOOM)
    xl, yl, zl = job.get("axis_labels") or ("axis 1", "axis 2", "axis 3")
    ax.set_xlabel(xl, fontsize=9)
    ax.set_ylabel(yl, fontsize=9)
    ax.set_zlabel(zl, fontsize=9)
    ax.tick_params(labelsize=7.5)
    fig.text(0.5, 0.975, job["title"], ha="center", va="top", fontsize=12)
    if job.get("subtitle"):
        fig.text(0.5, 0.942, job["subtitle"], ha="center", va="top", fontsize=9, color="0.25")
    cax = fig.add_axes((0.875, 0.2, 0.018, 0.56))
    cb = fig.colorbar(sc, cax=cax)
    cb.set_label(job.get("colour_label", "token position in the prompt (0 = first token)"), fontsize=9)
    cax.tick_params(labelsize=8)
    handles = [Line2D([], [], ls="", marker="o", ms=6, color=plt.get_cmap("viridis")(0.6),
                      label="token (colour = position)")]
    if first is not None:
        handles.append(Line2D([], [], ls="", marker="*", ms=13, mfc=FIRST_COLOUR, mec="black",
                              label=job.get("first_label", "first token")))
    if outliers:
        handles.append(Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec=OUTLIER_COLOUR, mew=1.8,
                              label=job.get("outlier_label", "outlier (large norm)")))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.01, 0.915), fontsize=8.5, framealpha=0.85)
    return fig, ax, cax


def _boxes(artists, renderer) -> np.ndarray:
    """(M, 4) display bboxes (x0, y0, x1, y1) of the artists that are drawn."""
    out = [a.get_window_extent(renderer).extents for a in artists if a.get_visible() and a.get_text()]
    return np.array(out, dtype=float).reshape(-1, 4)


def _obstacles(fig, ax, cax, renderer) -> np.ndarray:
    """Bboxes that token labels must not cover: titles, legend, colour bar, the 3-D axes' tick and axis labels."""
    texts = list(fig.texts)
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        texts += [axis.label, *axis.get_ticklabels()]
    boxes = [_boxes(texts, renderer), np.array([cax.get_tightbbox(renderer).extents])]
    boxes += [np.array([leg.get_window_extent(renderer).extents]) for leg in fig.legends]
    return np.concatenate(boxes)


def _candidates(x: float, y: float, w: float, h: float, rings: bool) -> list[tuple[float, float, bool]]:
    """Lower-left corners for a (w, h) label of the point at (x, y): right, left, above, below it, then (``rings``)
    eight directions at growing distance. The flag says whether a leader line is needed."""
    d = _MARKED if rings else _NEAR
    out = [(x + d, y - h / 2, False), (x - d - w, y - h / 2, False), (x - w / 2, y + d, False),
           (x - w / 2, y - d - h, False)]
    if rings:
        for r in _RINGS:
            for t in np.linspace(0, 2 * np.pi, 8, endpoint=False):
                c, s = np.cos(t), np.sin(t)
                cx = x + r * c + (np.sign(c) * w / 2 if abs(c) > 0.3 else 0.0)
                cy = y + r * s + (np.sign(s) * h / 2 if abs(s) > 0.3 else 0.0)
                out.append((cx - w / 2, cy - h / 2, True))
    return out


def greedy_labels(anchors: np.ndarray, sizes: np.ndarray, order: Sequence[int], must: set[int],
                  region: tuple[float, float, float, float], obstacles: np.ndarray, gap: float = LABEL_GAP,
                  limit: int | None = None) -> dict[int, tuple[float, float, bool]]:
    """Place labels greedily in ``order`` so that no two overlap nor cover an obstacle, all inside ``region``.

    ``anchors`` (N, 2) points in display px, ``sizes`` (N, 2) label width and height in px, ``obstacles`` (M, 4)
    display bboxes (x0, y0, x1, y1). Returns {point: (x0, y0, leader)}: the lower-left corner of its label and
    whether it sits away from the point (a leader line is due). A point in ``must`` also tries rings further out,
    and is placed at its first try inside the region when nothing fits; at most ``limit`` others are placed.
    """
    fixed = np.asarray(obstacles, dtype=float).reshape(-1, 4)
    boxes = np.empty((len(fixed) + len(order), 4))  # obstacles, then each label placed
    boxes[: len(fixed)] = fixed
    n = len(fixed)
    rx0, ry0, rx1, ry1 = region
    out: dict[int, tuple[float, float, bool]] = {}
    others = 0
    for i in order:
        if i not in must and limit is not None and others >= limit:
            break
        w, h = sizes[i]
        fallback = None
        for x0, y0, leader in _candidates(float(anchors[i, 0]), float(anchors[i, 1]), w, h, i in must):
            if x0 < rx0 or y0 < ry0 or x0 + w > rx1 or y0 + h > ry1:
                continue
            fallback = fallback or (x0, y0, leader)
            b = boxes[:n]
            if not np.any((b[:, 0] < x0 + w + gap) & (b[:, 2] > x0 - gap) & (b[:, 1] < y0 + h + gap)
                          & (b[:, 3] > y0 - gap)):
                break
        else:
            if i not in must or fallback is None:
                continue
            x0, y0, leader = fallback
        out[i] = (x0, y0, leader)
        boxes[n] = (x0, y0, x0 + w, y0 + h)
        n += 1
        others += i not in must
    return out


def _spread_order(positions: np.ndarray) -> np.ndarray:
    """Ranks that spread over the prompt: bit-reversed position order (0, 1/2, 1/4, 3/4, ... of the way)."""
    n = len(positions)
    bits = max(int(np.ceil(np.log2(max(n, 2)))), 1)
    rank = np.argsort(np.argsort(positions))
    rev = np.array([int(f"{r:0{bits}b}"[::-1], 2) for r in rank])
    return rev


def _label_order(pts: np.ndarray, positions: np.ndarray, texts: list[str], ax, first: int | None,
                 outliers: list[int]) -> list[int]:
    """First token, outliers, then the words on the hemisphere facing the viewer, the words behind, and tokens
    without a letter or digit (punctuation) last; each group spread over the prompt's positions."""
    el, az = np.radians(ax.elev), np.radians(ax.azim)
    eye = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    back = (pts @ eye < 0).astype(int)
    spread = _spread_order(positions)
    head = ([first] if first is not None else []) + [o for o in outliers if o != first]
    rest = sorted((i for i in range(len(pts)) if i not in set(head)), key=lambda i: (not any(c.isalnum() for c in texts[i]), back[i], spread[i]))
    return head + rest


def build_frame(job: dict) -> FrameFigure:
    """Draw one frame. ``job``: ``points`` (N, 3) unit rows, ``tokens`` (N) str, ``positions`` (N) int, ``title``;
    optional ``labels`` (auto | all | none, or a bool: all | none; default auto), ``subtitle``, ``axis_labels``
    (3 str), ``first`` (index of the first token in the points, marked) and ``outliers`` (indices, marked) with
    their legend texts ``first_label``/``outlier_label``, ``dpi``, ``inches`` (w, h), ``fontsize`` of the labels.

    Returns the drawn :class:`FrameFigure` (its canvas holds the pixels; close ``fig`` when done)."""
    plt = _pyplot()
    from mpl_toolkits.mplot3d import proj3d

    pts = np.asarray(job["points"], dtype=float).reshape(-1, 3)
    positions = np.asarray(job["positions"], dtype=int).reshape(-1)
    mode = label_mode(job.get("labels", "auto"))
    first = job.get("first")
    outliers = [int(i) for i in job.get("outliers", ())]
    fig, ax, cax = _scene(plt, job, pts, positions, first, outliers)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    frame = FrameFigure(fig=fig, ax=ax, cax=cax, width=width, height=height)
    if mode == "none" or not len(pts):
        return frame
    x2, y2, _ = proj3d.proj_transform(pts[:, 0], pts[:, 1], pts[:, 2], ax.get_proj())
    disp = ax.transData.transform(np.column_stack([x2, y2]))  # (N, 2) display px, origin bottom-left
    size = job.get("fontsize", 7.5)
    texts = [display_token(t) for t in job["tokens"]]
    lines: list = []
    styles = {i: {"color": FIRST_COLOUR, "fontweight": "bold"} for i in ([first] if first is not None else [])}
    styles.update({i: {"color": OUTLIER_COLOUR, "fontweight": "bold"} for i in outliers if i != first})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        if mode == "all":  # the notebook's look: every label just above-right of its point
            chosen = {i: (float(disp[i, 0]) + 2, float(disp[i, 1]) + 1, False) for i in range(len(pts))}
        else:
            chosen = _auto(fig, ax, cax, renderer, disp, texts, size, styles, pts, positions, first, outliers,
                           job.get("max_labels", AUTO_MAX_LABELS))
        for i, (x0, y0, leader) in sorted(chosen.items()):
            t = fig.text(x0 / width, y0 / height, texts[i], ha="left", va="bottom", fontsize=size,
                         color=styles.get(i, {}).get("color", "black"),
                         fontweight=styles.get(i, {}).get("fontweight", "normal"), parse_math=False,
                         bbox=LABEL_BOX if mode == "auto" else None)
            if leader:
                lines.append(_leader(fig, t, renderer, disp[i], width, height))
            frame.labels.append(t)
            frame.labelled.append(i)
        for artist in lines + frame.labels:  # drawn on top of the scene: no second full draw
            fig.draw_artist(artist)
    return frame


_SIZES: dict[tuple, tuple[float, float]] = {}  # (text, size, weight, dpi) -> (w, h) px: the tokens repeat every frame


def _text_size(fig, renderer, text: str, size: float, weight: str) -> tuple[float, float]:
    """(width, height) in px of ``text`` drawn as a label: a Text's own ``get_window_extent``, measured once per
    process for each text, size, weight and dpi (a worker draws several frames of the same tokens)."""
    from matplotlib.text import Text

    key = (text, size, weight, fig.dpi)
    if key not in _SIZES:
        probe = Text(0, 0, text, fontsize=size, fontweight=weight, parse_math=False)
        probe.set_figure(fig)
        ext = probe.get_window_extent(renderer)
        _SIZES[key] = (ext.width, ext.height)
    return _SIZES[key]


def _auto(fig, ax, cax, renderer, disp, texts, size, styles, pts, positions, first, outliers, limit) -> dict:
    """The ``auto`` subset: each label measured as the Text it will be, then :func:`greedy_labels`."""
    must = set(([first] if first is not None else []) + outliers)
    order = [i for i in _label_order(pts, positions, texts, ax, first, outliers) if i in must or texts[i].strip()]
    sizes = np.zeros((len(texts), 2))
    for i in order:
        sizes[i] = _text_size(fig, renderer, texts[i], size, styles.get(i, {}).get("fontweight", "normal"))
    marks = [disp[i] for i in must]
    mark_boxes = np.array([[x - 9, y - 9, x + 9, y + 9] for x, y in marks]).reshape(-1, 4)
    obstacles = _obstacles(fig, ax, cax, renderer)
    width, height = fig.canvas.get_width_height()
    region = (2.0, 2.0, width - 2.0, height - 2.0)
    # The marks keep other labels off them; the must-have labels are placed first, so only the others avoid them.
    chosen = greedy_labels(disp, sizes, [i for i in order if i in must], must, region, obstacles)
    placed = np.array([[x, y, x + sizes[i, 0], y + sizes[i, 1]] for i, (x, y, _) in chosen.items()]).reshape(-1, 4)
    rest = greedy_labels(disp, sizes, [i for i in order if i not in must], set(), region,
                         np.concatenate([obstacles, mark_boxes, placed]), limit=limit)
    return {**chosen, **rest}


def _leader(fig, text, renderer, point: np.ndarray, width: int, height: int):
    """A thin line from ``point`` (display px) to the nearest point of ``text``'s box."""
    from matplotlib.lines import Line2D

    b = text.get_window_extent(renderer)
    x = min(max(point[0], b.x0), b.x1)
    y = min(max(point[1], b.y0), b.y1)
    return fig.add_artist(Line2D([point[0] / width, x / width], [point[1] / height, y / height], lw=0.7,
                                 color=text.get_color(), transform=fig.transFigure))


def frame_png(frame: FrameFigure) -> bytes:
    """The PNG bytes (RGB) of a drawn frame."""
    import io

    from PIL import Image

    rgba = np.asarray(frame.fig.canvas.buffer_rgba())
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
