"""Drawings of one layer's graph (:class:`~headlens.residual.tracing.graph.LayerGraph`): Mermaid text and a PNG,
and the files ``headlens diagram`` writes."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from headlens.io.files import atomic_path, write_json
from headlens.report.figures import _pyplot, save_figure
from headlens.residual.tracing.diagram import DiagramResult
from headlens.residual.tracing.graph import LayerGraph

# ---------------------------------------------------------------------------------------------- mermaid


def _mm_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "&lt;").replace(">", "&gt;")


def _mm_element(g: LayerGraph, x: str, shape: str) -> str:
    if x == "in":
        return f'    in["resid_pre: layer {g.layer} input{shape}"]'
    if x == "out":
        return f'    out["resid_post: layer {g.layer} output{shape}"]'
    if x.startswith("j"):
        return f'    {x}(("⊕"))'
    n = g.node(x)
    parts = [f"<b>{_mm_text(n.name)}</b>", _mm_text(n.cls)]
    if n.params:
        parts.append(_mm_text(", ".join(n.params)))
    if n.site:  # a post-norm on the stream: its output is the site (BERT's resid_mid, where the hook reads it)
        parts.append(f"= {n.site}")
    return f'    {x}["{"<br/>".join(parts)}"]'


_MM_CLASSES = ["    classDef norm fill:#fde9b8,stroke:#c9a227",
               "    classDef attention fill:#cfe3fb,stroke:#4a7fc1",
               "    classDef mlp fill:#d3f0d3,stroke:#4a9a4a",
               "    classDef linear fill:#e8ddf6,stroke:#8a6bbf",
               "    classDef stream fill:#eeeeee,stroke:#666666",
               "    classDef join fill:#ffffff,stroke:#c0392b,stroke-width:2px"]


def to_mermaid(graph: LayerGraph) -> str:
    """Mermaid ``flowchart TD``: ⊕ nodes for joins, skips as dotted ``-.->`` edges from branch-off to join."""
    g = graph
    title = f"{g.model_class} layer {g.layer}: {g.style_name} residual, {g.source_note}"
    # The front matter is YAML: the title (it has colons) is a JSON string, which YAML reads as a quoted scalar.
    lines = ["---", f"title: {json.dumps(_mm_text(title), ensure_ascii=False)}", "---", "flowchart TD"]
    shape = f"<br/>{g.input_shape}" if g.input_shape else ""
    lines += [_mm_element(g, x, shape) for x in g.order]
    for e in g.edges:
        if e.kind == "skip":
            lines.append(f"    {e.src} -.->|skip| {e.dst}")
        else:
            lines.append(f"    {e.src} --> {e.dst}")
    lines += _MM_CLASSES
    by_kind: dict[str, list[str]] = {}
    for n in g.nodes:
        by_kind.setdefault(n.kind if n.kind in ("norm", "attention", "mlp", "linear") else "stream", []).append(n.id)
    by_kind.setdefault("stream", []).extend(["in", "out"])
    by_kind["join"] = [j.id for j in g.joins]
    for kind, ids in by_kind.items():
        if ids:
            lines.append(f"    class {','.join(ids)} {kind}")
    return "\n".join(lines) + "\n"


def save_mermaid(graph: LayerGraph, path: str | Path) -> Path:
    """Write :func:`to_mermaid` of ``graph`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(to_mermaid(graph), encoding="utf-8")
    return Path(path)


# -------------------------------------------------------------------------------------------------- PNG

_COLORS = {"norm": ("#fde9b8", "#c9a227"), "attention": ("#cfe3fb", "#4a7fc1"), "mlp": ("#d3f0d3", "#4a9a4a"),
           "linear": ("#e8ddf6", "#8a6bbf"), "other": ("#f4f4f4", "#888888"), "site": ("#e6e6e6", "#555555")}
_STEP = 1.45  # vertical distance between elements
_BOX_W, _BOX_H, _JOIN_R = 7.2, 1.0, 0.26  # box width and height, radius of a join's circle
_SKIP_RED = "#c0392b"


def _lanes(intervals: list[tuple[int, int, int]]) -> dict[int, int]:
    """Greedy lane per edge index so that overlapping vertical spans get different lanes."""
    lanes: dict[int, int] = {}
    used: list[list[tuple[int, int]]] = []
    for idx, a, b in sorted(intervals, key=lambda t: (t[2] - t[1], t[1])):
        for lane, spans in enumerate(used):
            if all(b <= s or a >= e for s, e in spans):
                spans.append((a, b))
                lanes[idx] = lane
                break
        else:
            used.append([(a, b)])
            lanes[idx] = len(used) - 1
    return lanes


def _side_path(x0: float, y0: float, x1: float, y1: float, reach: float):
    """Out from (x0, y0) sideways to x=reach, along it, and back in to (x1, y1), with rounded corners."""
    from matplotlib.path import Path as MPath

    sign = 1.0 if reach > 0 else -1.0
    c = min(0.35, abs(y1 - y0) / 2)
    down = -1.0 if y1 < y0 else 1.0
    verts = [(x0, y0), (reach - sign * c, y0), (reach, y0), (reach, y0 + down * c), (reach, y1 - down * c),
             (reach, y1), (reach - sign * c, y1), (x1, y1)]
    codes = [MPath.MOVETO, MPath.LINETO, MPath.CURVE3, MPath.CURVE3, MPath.LINETO, MPath.CURVE3, MPath.CURVE3,
             MPath.LINETO]
    return MPath(verts, codes)


@dataclass
class _Layout:
    """Where everything goes: element heights, edges drawn straight down or round a side, and the lanes."""

    y: dict[str, float]  # element id -> centre height
    half: dict[str, float]  # element id -> half its width
    straight: list[int]  # indices of data edges to the next element
    side_edges: dict[str, list[tuple[int, int, int]]]  # "left"/"right" -> (edge index, top rank, bottom rank)
    lanes: dict[str, dict[int, int]]  # side -> edge index -> lane
    xmin: float  # left edge of the drawing (room for the left lanes)
    xmax: float  # right edge (room for the skip lanes)


def _layout(g: LayerGraph) -> _Layout:
    y = {x: -i * _STEP for i, x in enumerate(g.order)}
    half = {x: (_JOIN_R if x.startswith("j") else _BOX_W / 2) for x in g.order}
    index = {x: i for i, x in enumerate(g.order)}
    side_edges: dict[str, list[tuple[int, int, int]]] = {"left": [], "right": []}
    straight: list[int] = []
    for k, e in enumerate(g.edges):
        if e.src not in index or e.dst not in index:
            continue
        a, b = index[e.src], index[e.dst]
        if e.kind == "data" and b == a + 1:
            straight.append(k)
        else:
            side_edges["right" if e.kind == "skip" else "left"].append((k, min(a, b), max(a, b)))
    lanes = {side: _lanes(items) for side, items in side_edges.items()}
    n_left = 1 + max(lanes["left"].values(), default=-1)
    n_right = 1 + max(lanes["right"].values(), default=-1)
    xmax = _BOX_W / 2 + 0.7 + 0.5 * max(n_right, 1) + 0.6
    xmin = -(_BOX_W / 2 + 0.7 + 0.5 * max(n_left, 1) + 0.3)
    return _Layout(y, half, straight, side_edges, lanes, xmin, xmax)


def _draw_join(ax, g: LayerGraph, x: str, cy: float) -> None:
    from matplotlib.patches import Circle

    r = _JOIN_R
    ax.add_patch(Circle((0, cy), r, facecolor="white", edgecolor=_SKIP_RED, lw=2, zorder=3))
    ax.text(0, cy - 0.02, "+", ha="center", va="center", fontsize=15, fontweight="bold", color=_SKIP_RED, zorder=4)
    j = next(j for j in g.joins if j.id == x)
    result = "normed next" if j.result.startswith("normed by ") else j.result  # the norm's box names the site
    ax.text(-r - 0.15, cy + 0.3, f"join {j.index} → {result}", ha="right", va="center", fontsize=8.5,
            color=_SKIP_RED)


def _draw_box(ax, g: LayerGraph, x: str, cy: float) -> None:
    from matplotlib.patches import FancyBboxPatch

    if x in ("in", "out"):
        face, edge = _COLORS["site"]
        title = "resid_pre: layer input" if x == "in" else "resid_post: layer output"
        sub = str(g.input_shape) if g.input_shape else ""
        strong = True
    else:
        n = g.node(x)
        face, edge = _COLORS.get(n.kind, _COLORS["other"])
        title = f"{n.name}  ({n.cls})"
        sub = ", ".join(n.params)
        strong = n.role == "stream"
        if strong:
            title += f"  — on the stream{f' = {n.site}' if n.site else ''}"
    ax.add_patch(FancyBboxPatch((-_BOX_W / 2, cy - _BOX_H / 2), _BOX_W, _BOX_H,
                                boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=face, edgecolor=edge,
                                lw=2.0 if strong else 1.1, zorder=2))
    sub_lines = textwrap.wrap(sub, width=88)
    if len(sub_lines) > 2:
        sub_lines = [sub_lines[0], textwrap.shorten(" ".join(sub_lines[1:]), width=88, placeholder=" …")]
    ax.text(0, cy + (0.2 if sub_lines else 0), title, ha="center", va="center", fontsize=9.5,
            fontweight="bold", zorder=4)
    if sub_lines:
        ax.text(0, cy - 0.2 - (0.07 if len(sub_lines) > 1 else 0), "\n".join(sub_lines), ha="center",
                va="center", fontsize=7, color="#333333", zorder=4, linespacing=1.15)


def _draw_edges(ax, g: LayerGraph, lay: _Layout) -> None:
    from matplotlib.patches import FancyArrowPatch

    y, r = lay.y, _JOIN_R
    for k in lay.straight:
        e = g.edges[k]
        ax.add_patch(FancyArrowPatch((0, y[e.src] - (r if e.src.startswith("j") else _BOX_H / 2)),
                                     (0, y[e.dst] + (r if e.dst.startswith("j") else _BOX_H / 2)),
                                     arrowstyle="-|>", mutation_scale=12, color="#333333", lw=1.2, zorder=1))
    for side, items in lay.side_edges.items():
        sign = 1 if side == "right" else -1
        for k, _a, _b in items:
            e = g.edges[k]
            skip = e.kind == "skip"
            reach = sign * (_BOX_W / 2 + 0.7 + 0.5 * lay.lanes[side][k])
            y0 = y[e.src] - 0.12
            y1 = y[e.dst] + (0.12 if not e.dst.startswith("j") else 0)
            curve = _side_path(sign * lay.half[e.src], y0, sign * (lay.half[e.dst] + 0.02), y1, reach)
            ax.add_patch(FancyArrowPatch(path=curve, arrowstyle="-|>", mutation_scale=13,
                                         color=_SKIP_RED if skip else "#555555", lw=1.7 if skip else 1.1,
                                         linestyle=(0, (4, 2.5)) if skip else "-", zorder=1))
            if skip:
                ax.text(reach + 0.22, (y0 + y1) / 2, "skip", rotation=90, ha="center", va="center", fontsize=8,
                        color=_SKIP_RED)


def _title_and_legend(ax, g: LayerGraph) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.set_title(f"{g.model_class} layer {g.layer} ({g.layer_class}): {g.style_name} residual, "
                 f"{len(g.joins)} join{'s' if len(g.joins) != 1 else ''}\n{g.source_note}", fontsize=10)
    handles = [Patch(facecolor=_COLORS[k][0], edgecolor=_COLORS[k][1], label=k)
               for k in ("norm", "attention", "mlp", "linear") if any(n.kind == k for n in g.nodes)]
    handles += [Line2D([0], [0], color="#333333", lw=1.2, label="data flow"),
                Line2D([0], [0], color=_SKIP_RED, lw=1.7, ls="--", label="skip (residual) → ⊕ join")]
    ax.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, -0.01))


def save_diagram_png(graph: LayerGraph, path: str | Path) -> Path:
    """Boxes top to bottom in call order, norms coloured apart, skips as dashed curves on the right; the PNG is
    written atomically to ``path``, which is returned."""
    plt = _pyplot()
    g = graph
    lay = _layout(g)
    height = (len(g.order) - 1) * _STEP + 2.2
    width = lay.xmax - lay.xmin
    fig, ax = plt.subplots(figsize=(width * 0.78 + 0.4, height * 0.78 + 1.0))
    ax.set_xlim(lay.xmin, lay.xmax)
    ax.set_ylim(-(len(g.order) - 1) * _STEP - 1.2, 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    for x in g.order:
        if x.startswith("j"):
            _draw_join(ax, g, x, lay.y[x])
        else:
            _draw_box(ax, g, x, lay.y[x])
    _draw_edges(ax, g, lay)
    _title_and_legend(ax, g)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# ------------------------------------------------------------------------------------------------ files


def write_diagram_files(result: DiagramResult, png_path: Path, mermaid_path: Path,
                        json_path: Path | None = None) -> dict[str, str]:
    """Write the PNG, the Mermaid text and (with ``json_path``) the JSON document of ``result``.

    Returns the files written, ``{"png": ..., "mermaid": ..., "json": ...}`` (``json`` only when written)."""
    files = {"png": str(png_path), "mermaid": str(mermaid_path)}
    save_diagram_png(result.graph, png_path)
    save_mermaid(result.graph, mermaid_path)
    if json_path is not None:
        files["json"] = str(json_path)
        write_json(json_path, result.to_json(files))
    return files
