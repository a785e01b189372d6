"""The sweep's pictures: layer x head heatmaps and the latent-budget chart (PNG, written atomically).

- :func:`heatmaps` -> ``sweep_rank_e90.png``, ``sweep_qk_rank_e90.png`` (with QK), ``sweep_rel_error.png``,
  ``sweep_white_heldout.png`` (data-aware)
- :func:`budget_chart` -> ``sweep_budget.png``

Each heatmap is a plain-data job (:func:`heatmap_jobs`: numpy grids, ids, titles) and a drawing function
(:func:`draw_heatmap`), so that a worker process can draw it: this module imports no torch (the result types are
imported for type checking only), and a worker that imports it starts in about a second.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from headlens.errors import HeadlensError
from headlens.report.figures import _pyplot, save_figure
from headlens.report.sweep_common import (ERROR_PNG, HELDOUT_PNG, QK_RANK_PNG, RANK_PNG, fmt_bytes, fmt_pct,
                                          number, uniform_label)

if TYPE_CHECKING:
    from headlens.circuits.budget import Budget, BudgetTotals
    from headlens.circuits.sweep_results import HeadSpectrum

_ANNOTATE_MAX_CELLS = 200   # write the value in each heatmap cell up to this many cells per panel
_TICK_MAX = 40              # label every row/column up to this many, else every n-th


def _mpl_text(text: str) -> str:
    """Text for a matplotlib title: '$' would start mathtext."""
    return str(text).replace("$", r"\$")


def _grid(heads: Sequence["HeadSpectrum"], value: Callable[[HeadSpectrum], Any]):
    """(L, H) float array of ``value`` per head (NaN where missing) with the sorted layer and head ids."""
    layers = sorted({h.layer for h in heads})
    ids = sorted({h.head for h in heads})
    li = {v: i for i, v in enumerate(layers)}
    hi = {v: i for i, v in enumerate(ids)}
    grid = np.full((len(layers), len(ids)), np.nan)  # (L, H)
    for h in heads:
        grid[li[h.layer], hi[h.head]] = number(value(h))
    return grid, layers, ids


def _check_heads(heads: Sequence["HeadSpectrum"]) -> None:
    from headlens.circuits.sweep_results import HeadSpectrum

    if isinstance(heads, dict) or not isinstance(heads, Sequence) or not heads:
        raise HeadlensError("`heads` must be a non-empty list of HeadSpectrum")
    for i, h in enumerate(heads):
        if not isinstance(h, HeadSpectrum):
            raise HeadlensError(f"`heads`[{i}] must be a HeadSpectrum, got {type(h).__name__}")


def _ticks(ids: list[int]) -> tuple[list[int], list[str]]:
    step = max(1, math.ceil(len(ids) / _TICK_MAX))
    pos = list(range(0, len(ids), step))
    return pos, [str(ids[p]) for p in pos]


def _group_edges(heads: Sequence["HeadSpectrum"], ids: list[int]) -> list[float]:
    """Column positions between query heads that read different kv heads (GQA group boundaries)."""
    kv: dict[int, int] = {}
    for h in heads:
        kv.setdefault(h.head, h.kv_head)
    if len(kv) != len(ids) or len(set(kv.values())) in (0, len(ids)):
        return []  # unknown, or MHA (one head per group): no lines
    return [i + 0.5 for i in range(len(ids) - 1) if kv[ids[i]] != kv[ids[i + 1]]]


def _annotate(ax, im, grid: np.ndarray, fmt: str) -> None:
    """Write each cell's value, in white on dark colours."""
    texts = {ij: format(v, fmt) if np.isfinite(v) else "n/a" for ij, v in np.ndenumerate(grid)}
    cell_pt = ax.get_position().width * ax.figure.get_figwidth() * 72 / max(grid.shape[1], 1)
    widest = max(len(t) for t in texts.values())
    size = min(max(0.8 * cell_pt / (0.6 * widest), 5.0), 9.0)  # a character is ~0.6 em wide
    for (i, j), v in np.ndenumerate(grid):
        if not np.isfinite(v):
            ax.text(j, i, "n/a", ha="center", va="center", fontsize=size, color="0.3")
            continue
        r, g, b, _ = im.cmap(im.norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, texts[(i, j)], ha="center", va="center", fontsize=size, color="white" if dark else "black")


def _panel(ax, grid: np.ndarray, layers: list[int], heads: list[int], edges: list[float], cmap, vmin: float,
           vmax: float, fmt: str, title: str, xlabels: bool = True, ylabels: bool = True):
    """Draw one (L, H) layer x head heatmap on ``ax``; returns the image for the colourbar.

    ``xlabels``/``ylabels``: False leaves that axis's tick labels and title off (inner panels of a grid).
    """
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest", origin="upper")
    xpos, xlab = _ticks(heads)
    ypos, ylab = _ticks(layers)
    ax.set_xticks(xpos)
    ax.set_yticks(ypos)
    if xlabels:
        ax.set_xticklabels(xlab, fontsize=7 if len(heads) > 16 else 9, rotation=90 if len(heads) > 24 else 0)
        ax.set_xlabel("query head")
    else:
        ax.set_xticklabels([])
    if ylabels:
        ax.set_yticklabels(ylab, fontsize=7 if len(layers) > 16 else 9)
        ax.set_ylabel("layer")
    else:
        ax.set_yticklabels([])
    ax.set_title(title, fontsize=11)
    for x in edges:
        ax.axvline(x, color="white", lw=0.8, alpha=0.9)
    if grid.size <= _ANNOTATE_MAX_CELLS:
        _annotate(ax, im, grid, fmt)
    return im


def _panel_size(n_layers: int, n_heads: int, cell: float) -> tuple[float, float]:
    """Inches (width, height) of one heatmap panel: ``cell`` inches a cell, clamped to stay readable."""
    w = min(max(cell * n_heads, 3.6), 13.0)
    h = min(max(cell * 1.1 * n_layers, 2.0), 12.0)
    return w, h


def _heat_layout(nrows: int, ncols: int, w: float, h: float, title: str, panel_titles: bool):
    """A figure of ``nrows x ncols`` panels of ``w x h`` inches, a colourbar axis on the right, and
    ``title`` wrapped to the figure's width above them.

    Margins are fixed in inches (no constrained layout: it costs ~0.5 s a figure at 36 x 32 x 4 panels).
    Returns (fig, axes as a (nrows, ncols) nested list, colourbar axes).
    """
    plt = _pyplot()
    left, right, bottom = 0.75, 1.1, 0.75
    wspace, hspace = 0.25, 0.45  # inner panels carry no tick labels, only a title
    fw = left + ncols * w + (ncols - 1) * wspace + right
    lines = textwrap.wrap(title, width=max(int(fw * 72 / (12 * 0.55)), 30)) or [""]
    top = 0.2 + 0.24 * len(lines) + (0.3 if panel_titles else 0.1)
    fh = bottom + nrows * h + (nrows - 1) * hspace + top
    fig = plt.figure(figsize=(fw, fh))
    fig.text(0.5, 1 - 0.15 / fh, "\n".join(lines), ha="center", va="top", fontsize=12)
    axes = [[fig.add_axes(((left + c * (w + wspace)) / fw, (fh - top - (r + 1) * h - r * hspace) / fh, w / fw, h / fh))
             for c in range(ncols)] for r in range(nrows)]
    grid_h = nrows * h + (nrows - 1) * hspace
    cax = fig.add_axes(((fw - right + 0.15) / fw, bottom / fh, 0.18 / fw, grid_h / fh))
    return fig, axes, cax


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="0.85")  # missing heads: light grey


def _rank_job(heads: Sequence["HeadSpectrum"], model_name: str, qk: bool = False) -> dict[str, Any]:
    """The rank at 90% energy of each head's OV circuit (``qk``: its QK form, at relative position 0)."""
    grid, layers, ids = _grid(heads, (lambda h: h.qk.rank_at.get(90) if h.qk is not None else None) if qk
                              else (lambda h: h.ov.rank_at.get(90)))
    what = "$W_{QK} = W_Q^T W_K$ (relative position 0)" if qk else "$W_{OV}$"
    return {"kind": "rank", "grids": [grid], "layers": layers, "ids": ids, "edges": _group_edges(heads, ids),
            "title": f"{_mpl_text(model_name)}: rank of {what} at 90% energy"}


def _draw_rank(path: Path, job: dict[str, Any]) -> Path:
    grid, layers, ids = job["grids"][0], job["layers"], job["ids"]
    w, h = _panel_size(len(layers), len(ids), 0.26)
    fig, axes, cax = _heat_layout(1, 1, w, h, job["title"], panel_titles=False)
    finite = grid[np.isfinite(grid)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0
    im = _panel(axes[0][0], grid, layers, ids, job["edges"], _cmap("viridis"), vmin, vmax, ".0f", "")
    fig.colorbar(im, cax=cax).set_label("rank at 90% energy", fontsize=9)
    return save_figure(fig, path)


def _per_k_job(heads: Sequence["HeadSpectrum"], ks: Sequence[int], value: Callable[["HeadSpectrum", int], Any],
               title: str, cbar_label: str) -> dict[str, Any]:
    """One (L, H) grid per k of ``value(head, k)``, drawn on a shared 0..1 colour scale."""
    grids = [_grid(heads, lambda h, k=k: value(h, k)) for k in ks]
    _, layers, ids = grids[0]
    return {"kind": "per_k", "grids": [g for g, _, _ in grids], "layers": layers, "ids": ids, "ks": list(ks),
            "edges": _group_edges(heads, ids), "title": title, "cbar_label": cbar_label}


def _draw_per_k(path: Path, job: dict[str, Any]) -> Path:
    layers, ids, ks = job["layers"], job["ids"], job["ks"]
    n = len(ks)
    wide = len(ids) > 16 or len(layers) > 16
    ncols = min(n, 2 if wide else 4)
    nrows = math.ceil(n / ncols)
    w, h = _panel_size(len(layers), len(ids), 0.2)
    fig, axes, cax = _heat_layout(nrows, ncols, w, h, job["title"], panel_titles=True)
    cmap = _cmap("magma_r")
    im = None
    for idx, k in enumerate(ks):
        r, c = divmod(idx, ncols)
        im = _panel(axes[r][c], job["grids"][idx], layers, ids, job["edges"], cmap, 0.0, 1.0, ".2f", f"k = {k}",
                    xlabels=idx + ncols >= n, ylabels=c == 0)
    for idx in range(n, nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    fig.colorbar(im, cax=cax).set_label(job["cbar_label"], fontsize=9)
    return save_figure(fig, path)


def draw_heatmap(path: Path, job: dict[str, Any]) -> Path:
    """Draw one job of :func:`heatmap_jobs` to ``path`` (a PNG, written atomically); returns ``path``. Needs no
    torch: a worker process can run it."""
    return (_draw_rank if job["kind"] == "rank" else _draw_per_k)(Path(path), job)


def _heldout(h: "HeadSpectrum", k: int) -> float | None:
    return None if h.latents is None else h.latents.white_heldout.get(k)


def heatmap_jobs(out_dir: Path, heads: Sequence["HeadSpectrum"], ks: Sequence[int],
                 model_name: str) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, job)`` for each heatmap :func:`heatmaps` draws, in its order; ``draw_heatmap(path, job)`` draws
    one. The jobs hold plain data only (numpy grids, ids, titles)."""
    _check_heads(heads)
    ks = [int(k) for k in ks]
    if not ks:
        raise HeadlensError("`ks` must name at least one latent size")
    out_dir = Path(out_dir)
    name = str(model_name)
    jobs = [(out_dir / RANK_PNG, _rank_job(heads, name))]
    if any(h.qk is not None for h in heads):
        jobs.append((out_dir / QK_RANK_PNG, _rank_job(heads, name, qk=True)))
    jobs += [(out_dir / ERROR_PNG, _per_k_job(heads, ks, lambda h, k: h.ov.rel_error.get(k),
                                              f"{_mpl_text(name)}: relative error of rank-k $W_{{OV}}$, "
                                              r"$\sqrt{1-E_k}$ (ov_rel_error_k)", "relative error"))]
    if any(not math.isnan(number(_heldout(h, k))) for h in heads for k in ks):
        jobs.append((out_dir / HELDOUT_PNG, _per_k_job(heads, ks, _heldout,
                                                       f"{_mpl_text(name)}: data-aware latent, error on held-out "
                                                       "tokens (white_heldout_k)", "held-out error")))
    return jobs


def heatmaps(out_dir: Path, heads: Sequence["HeadSpectrum"], ks: Sequence[int], model_name: str) -> list[Path]:
    """Layer x query-head heatmaps as PNGs in ``out_dir``; returns their paths in this order:

    - ``sweep_rank_e90.png``: OV rank at 90% energy, one (L, H) panel, colour scale from the smallest to the
      largest rank seen;
    - ``sweep_qk_rank_e90.png``: the same for the QK forms, when the heads have them;
    - ``sweep_rel_error.png``: OV rel_error = sqrt(1 - E_k), one (L, H) panel per k, shared 0..1 scale;
    - ``sweep_white_heldout.png``: the data-aware latent's error on held-out tokens, when the heads have one.

    Rows are layers (top = first), columns query heads, both labelled with their real ids (a partial sweep
    leaves gaps in neither); missing values are grey. White vertical lines separate GQA groups. Up to
    200 cells a panel, each cell also shows its value.
    """
    return [draw_heatmap(path, job) for path, job in heatmap_jobs(out_dir, heads, ks, model_name)]


def warm_up() -> None:
    """What a worker that draws the heatmaps imports before its first job (no torch)."""
    _pyplot()


# ----------------------------------------------------------------------------------------------- budget


def _bars(ax, layers: list[int], series: list[tuple[str, list, str]], ylabel: str, title: str) -> None:
    from matplotlib.collections import PolyCollection

    x = np.arange(len(layers))
    n = len(series)
    width = 0.8 / n
    top = 0.0
    for i, (label, values, color) in enumerate(series):
        vals = np.nan_to_num(np.array([number(v) for v in values]), nan=0.0)
        left = x + (i - (n - 1) / 2) * width - width / 2
        # One collection a series: as ax.bar draws them, without one patch (and one data-limit update) a bar.
        rects = [[(a, 0.0), (a, v), (a + width, v), (a + width, 0.0)] for a, v in zip(left, vals)]
        ax.add_collection(PolyCollection(rects, facecolors=color, edgecolors="none", label=label), autolim=False)
        top = max(top, float(vals.max(initial=0.0)))
    ax.set_ylim(0.0, top * 1.05 if top > 0 else 1.0)
    pos, lab = _ticks(layers)
    ax.set_xticks(pos)
    ax.set_xticklabels(lab, fontsize=8 if len(layers) > 16 else 10)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(n, 4), loc="upper left", bbox_to_anchor=(0, -0.14 if len(layers) > 16 else -0.2))


def _totals_line(t: "BudgetTotals") -> str:
    line = (f"all layers: {fmt_bytes(t.kv_bytes_before)} \u2192 {fmt_bytes(t.kv_bytes_after_plain)} KV bytes/token "
            "(plain")
    if t.saving_plain_pct is not None:
        line += f", saving {fmt_pct(t.saving_plain_pct)}"
    line += ")"
    if t.kv_bytes_after_data is not None:
        line += f", {fmt_bytes(t.kv_bytes_after_data)} (data-aware"
        if t.saving_data_pct is not None:
            line += f", saving {fmt_pct(t.saving_data_pct)}"
        line += ")"
    return line


def budget_chart(path: Path, budget: "Budget", model_name: str) -> Path | None:
    """``sweep_budget.png``: top panel, latent size per layer (sum of k over the layer's kv groups) for the
    plain, data-aware (when present) and uniform allocations side by side, and the plain key latent (with QK);
    bottom panel, KV cache bytes per token per layer before vs after each allocation (and with key latents too). Returns ``path``, or None when there is no layer."""
    agg = budget.layer_latents()
    if not agg:
        return None
    plt = _pyplot()
    layers = [d.layer for d in agg]
    width = min(max(0.34 * len(layers) + 3.0, 7.0), 18.0)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(width, 8.6), layout="constrained")
    latent = [("plain latent", [d.k_plain for d in agg], "C0")]
    if any(d.k_data is not None for d in agg):
        latent.append(("data-aware latent", [d.k_data for d in agg], "C2"))
    latent.append((f"uniform, {uniform_label(budget.totals.uniform_k)}", [d.k_uniform for d in agg], "C1"))
    if any(d.key_k_plain is not None for d in agg):
        latent.append(("key latent, plain (rel. position 0)", [d.key_k_plain for d in agg], "C4"))
    _bars(ax1, layers, latent, "latent dims per token\n(sum over kv groups)", "latent size per layer")
    kv = [("before (full K+V)", [d.kv_bytes_before for d in agg], "0.55"),
          ("after, plain", [d.kv_bytes_after_plain for d in agg], "C0")]
    if any(d.kv_bytes_after_data is not None for d in agg):
        kv.append(("after, data-aware", [d.kv_bytes_after_data for d in agg], "C2"))
    kv.append(("after, uniform", [d.kv_bytes_after_uniform for d in agg], "C1"))
    with_keys = {p.layer: p.kv_bytes_after_plain_with_keys for p in budget.per_layer}
    if any(v is not None for v in with_keys.values()):
        kv.append(("after, key and value latents (plain)", [with_keys.get(d.layer) for d in agg], "C4"))
    _bars(ax2, layers, kv, "KV cache bytes per token", "KV cache bytes per token, before vs after")
    title = f"{_mpl_text(model_name)}: MLA latent budget, target {_mpl_text(budget.target.label())}"
    chars = max(int(width * 72 / (12 * 0.55)), 30)
    text = "\n".join(textwrap.wrap(title, chars) + textwrap.wrap(_mpl_text(_totals_line(budget.totals)), chars))
    fig.suptitle(text, fontsize=12)
    return save_figure(fig, Path(path))
