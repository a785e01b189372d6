"""The output side of `headlens sweep`: tables (CSV + Parquet), heatmaps, the latent-budget chart, one HTML page.

Pure functions of plain data: lists of dicts (one per query head, one per kv group, one per budget row) whose
values are int, float, str, bool or None. No torch and no model code here; matplotlib and pyarrow are imported
only inside the functions that need them. Every file is written atomically (``headlens.fileio.atomic_path``),
so an interrupted sweep never leaves a half-written table or picture behind.

Files (``out_dir`` is the caller's):

- ``write_table(stem, rows)``       -> ``<stem>.csv``, ``<stem>.parquet``
- ``heatmaps(out_dir, ...)``        -> ``sweep_rank_e90.png``, ``sweep_rel_error.png``,
  ``sweep_white_heldout.png`` (only when the rows carry data-aware held-out errors)
- ``budget_outputs(out_dir, ...)``  -> ``sweep_budget.csv``, ``sweep_budget_layers.csv``, ``sweep_budget.png``
- ``write_html(path, ...)``         -> one self-contained page (images inlined as data URIs, CSS inline, no JS)
"""

from __future__ import annotations

import base64
import csv
import html
import math
import re
import textwrap
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from headlens.errors import HeadlensError
from headlens.io.files import atomic_path
from headlens.report.figures import _pyplot, save_figure

__all__ = [
    "write_table", "write_csv", "write_parquet", "read_table",
    "heatmaps", "budget_outputs", "layer_aggregates", "write_html",
    "RANK_PNG", "ERROR_PNG", "HELDOUT_PNG", "BUDGET_PNG", "BUDGET_CSV", "BUDGET_LAYERS_CSV",
]

RANK_PNG = "sweep_rank_e90.png"
ERROR_PNG = "sweep_rel_error.png"
HELDOUT_PNG = "sweep_white_heldout.png"
BUDGET_PNG = "sweep_budget.png"
BUDGET_CSV = "sweep_budget.csv"
BUDGET_LAYERS_CSV = "sweep_budget_layers.csv"

_ANNOTATE_MAX_CELLS = 200   # write the value in each heatmap cell up to this many cells per panel
_TICK_MAX = 40              # label every row/column up to this many, else every n-th


# ------------------------------------------------------------------------------------------------ values

def _plain(value: Any, where: str) -> Any:
    """A table cell as a Python scalar: None, bool, int, float or str (numpy scalars unwrapped)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, (bool, str)):
            return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    raise HeadlensError(f"{where}: unsupported value {value!r} ({type(value).__name__}); "
                        "table cells must be int, float, str, bool or None")


def _columns(rows: Sequence[dict]) -> list[str]:
    """Union of the rows' keys in first-seen order."""
    if isinstance(rows, dict) or not isinstance(rows, Sequence):
        raise HeadlensError("rows must be a list of dicts")
    seen: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise HeadlensError(f"row {i} must be a dict, got {type(row).__name__}")
        for key in row:
            if not isinstance(key, str):
                raise HeadlensError(f"row {i}: column names must be strings, got {key!r}")
            seen.setdefault(key, None)
    return list(seen)


def _stem_with(stem: Path, suffix: str) -> Path:
    stem = Path(stem)
    return stem.with_name(stem.name + suffix)  # not with_suffix: "Qwen3-0.6B_heads" has a dot


# ------------------------------------------------------------------------------------------------ tables

def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest string that parses back to the same double ('nan', 'inf' included)
    return str(value)


_INT_RE = re.compile(r"[-+]?\d+\Z")
_FLOAT_RE = re.compile(r"[-+]?(?:(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf)\Z")


def _parse_csv_cell(text: str) -> Any:
    """Inverse of ``_csv_cell``: '' -> None, '3' -> 3, '3.0' -> 3.0, 'true' -> True, anything else a str."""
    if text == "":
        return None
    if _INT_RE.match(text):
        return int(text)
    if _FLOAT_RE.match(text):
        return float(text)
    if text == "true":
        return True
    if text == "false":
        return False
    return text


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as CSV (atomically) and return ``path``.

    Header: the union of the rows' keys in first-seen order; a missing key or None is an empty cell; floats
    are written with ``repr`` (round-trips exactly, ``nan``/``inf`` included), bools as ``true``/``false``.
    """
    cols = _columns(rows)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            if cols:
                writer.writerow(cols)
            for i, row in enumerate(rows):
                writer.writerow([_csv_cell(_plain(row.get(c), f"row {i}, column {c!r}")) for c in cols])
    return path


def _arrow_column(name: str, values: list[Any]):
    """One pyarrow array: int64 (nulls allowed), float64 (ints promoted), bool, string, or all-null."""
    import pyarrow as pa

    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        typ = pa.null()
    elif kinds == {bool}:
        typ = pa.bool_()
    elif kinds == {int}:
        typ = pa.int64()
    elif kinds <= {int, float}:
        typ = pa.float64()
        values = [None if v is None else float(v) for v in values]
    elif kinds == {str}:
        typ = pa.string()
    else:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise HeadlensError(f"column {name!r} mixes value types ({names}); Parquet needs one type per column")
    try:
        return pa.array(values, type=typ)
    except (pa.ArrowInvalid, OverflowError) as exc:
        raise HeadlensError(f"column {name!r}: {exc}") from None


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise HeadlensError("writing or reading Parquet needs pyarrow: pip install pyarrow") from None
    return pq


def write_parquet(path: Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as a Parquet file (atomically) and return ``path``.

    One column per key (first-seen order). Column types: int64 when every non-null value is an int (nulls
    allowed), float64 when the values are floats or a mix of ints and floats, bool, string, or null when
    every value is None. A column that mixes numbers with strings or bools raises HeadlensError.
    """
    pq = _pyarrow()
    import pyarrow as pa

    cols = _columns(rows)
    arrays = []
    for c in cols:
        values = [_plain(row.get(c), f"row {i}, column {c!r}") for i, row in enumerate(rows)]
        arrays.append(_arrow_column(c, values))
    table = pa.Table.from_arrays(arrays, names=cols) if cols else pa.table({})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


def write_table(path_stem: Path, rows: Sequence[dict]) -> list[Path]:
    """Write ``rows`` to ``<path_stem>.csv`` and ``<path_stem>.parquet``; returns ``[csv_path, parquet_path]``.

    ``rows``: a list of dicts of scalars (int, float, str, bool, None; numpy scalars are unwrapped). Both
    files hold the union of the keys in first-seen order; ``read_table`` reads either back to the same rows
    (every row then has every column, absent keys as None). The one difference between the two formats: a
    column mixing ints and floats is float64 in Parquet, while the CSV keeps each cell's own type.
    """
    stem = Path(path_stem)
    return [write_csv(_stem_with(stem, ".csv"), rows), write_parquet(_stem_with(stem, ".parquet"), rows)]


def read_table(path: Path) -> list[dict]:
    """Read a table written by ``write_table``/``write_csv``/``write_parquet`` back into a list of dicts.

    The format follows the suffix (``.csv`` or ``.parquet``). Every row has every column in file order;
    empty cells and nulls are None, ints come back as int, floats as float (bit-exact), bools as bool.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise HeadlensError(f"cannot read {path}: the table format follows the suffix, .csv or .parquet")
    if not path.is_file():
        raise HeadlensError(f"table {path} does not exist")
    if suffix == ".parquet":
        pq = _pyarrow()
        try:
            return pq.read_table(str(path)).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise HeadlensError(f"cannot read Parquet table {path}: {exc}") from None
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                return []
            out = []
            for n, cells in enumerate(reader, start=2):
                if len(cells) != len(header):
                    raise HeadlensError(f"{path}:{n}: {len(cells)} cells, the header has {len(header)}")
                out.append({c: _parse_csv_cell(v) for c, v in zip(header, cells)})
            return out
    raise HeadlensError(f"cannot read {path}: the table format follows the suffix, .csv or .parquet")


# ---------------------------------------------------------------------------------------------- figures



def _mpl_text(text: str) -> str:
    """Text for a matplotlib title: '$' would start mathtext."""
    return str(text).replace("$", r"\$")


def _number(value: Any) -> float:
    """A cell as a float for plotting; None, strings and non-finite values become NaN."""
    if value is None or isinstance(value, (bool, str)):
        return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _grid(head_rows: Sequence[dict], key: str) -> tuple[np.ndarray, list[int], list[int]]:
    """(L, H) float array of ``key`` (NaN where missing) with the sorted layer and head ids of its rows/cols."""
    layers = sorted({int(r["layer"]) for r in head_rows})
    heads = sorted({int(r["head"]) for r in head_rows})
    li = {v: i for i, v in enumerate(layers)}
    hi = {v: i for i, v in enumerate(heads)}
    grid = np.full((len(layers), len(heads)), np.nan)  # (L, H)
    for r in head_rows:
        grid[li[int(r["layer"])], hi[int(r["head"])]] = _number(r.get(key))
    return grid, layers, heads


def _check_head_rows(head_rows: Sequence[dict]) -> None:
    if isinstance(head_rows, dict) or not isinstance(head_rows, Sequence) or not head_rows:
        raise HeadlensError("head_rows must be a non-empty list of per-head dicts")
    for i, r in enumerate(head_rows):
        if not isinstance(r, dict):
            raise HeadlensError(f"head_rows[{i}] must be a dict, got {type(r).__name__}")
        for key in ("layer", "head"):
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, (Integral, np.integer)):
                raise HeadlensError(f"head_rows[{i}]: {key} must be an int, got {v!r}")


def _ticks(ids: list[int]) -> tuple[list[int], list[str]]:
    step = max(1, math.ceil(len(ids) / _TICK_MAX))
    pos = list(range(0, len(ids), step))
    return pos, [str(ids[p]) for p in pos]


def _group_edges(head_rows: Sequence[dict], heads: list[int]) -> list[float]:
    """Column positions between query heads that read different kv heads (GQA group boundaries)."""
    kv: dict[int, Any] = {}
    for r in head_rows:
        if r.get("kv_head") is not None:
            kv.setdefault(int(r["head"]), r["kv_head"])
    if len(kv) != len(heads) or len(set(kv.values())) in (0, len(heads)):
        return []  # unknown, or MHA (one head per group): no lines
    return [i + 0.5 for i in range(len(heads) - 1) if kv[heads[i]] != kv[heads[i + 1]]]


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
        norm = im.norm
        texts = {ij: format(v, fmt) if np.isfinite(v) else "n/a" for ij, v in np.ndenumerate(grid)}
        cell_pt = ax.get_position().width * ax.figure.get_figwidth() * 72 / max(grid.shape[1], 1)
        widest = max(len(t) for t in texts.values())
        size = min(max(0.8 * cell_pt / (0.6 * widest), 5.0), 9.0)  # a character is ~0.6 em wide
        for (i, j), v in np.ndenumerate(grid):
            if not np.isfinite(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=size, color="0.3")
                continue
            r, g, b, _ = im.cmap(norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, texts[(i, j)], ha="center", va="center", fontsize=size,
                    color="white" if dark else "black")
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


def _rank_figure(path: Path, head_rows: Sequence[dict], model_name: str) -> Path:
    grid, layers, heads = _grid(head_rows, "ov_rank_e90")
    edges = _group_edges(head_rows, heads)
    w, h = _panel_size(len(layers), len(heads), 0.26)
    title = f"{_mpl_text(model_name)}: rank of $W_{{OV}}$ at 90% energy"
    fig, axes, cax = _heat_layout(1, 1, w, h, title, panel_titles=False)
    finite = grid[np.isfinite(grid)]
    vmin = float(finite.min()) if finite.size else 0.0
    vmax = float(finite.max()) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0
    im = _panel(axes[0][0], grid, layers, heads, edges, _cmap("viridis"), vmin, vmax, ".0f", "")
    fig.colorbar(im, cax=cax).set_label("rank at 90% energy", fontsize=9)
    return save_figure(fig, path)


def _per_k_figure(path: Path, head_rows: Sequence[dict], ks: Sequence[int], prefix: str, title: str,
                  cbar_label: str) -> Path:
    """One panel per k on a shared 0..1 colour scale (``prefix`` + k is the column)."""
    n = len(ks)
    grids = [_grid(head_rows, f"{prefix}{k}") for k in ks]
    _, layers, heads = grids[0]
    edges = _group_edges(head_rows, heads)
    wide = len(heads) > 16 or len(layers) > 16
    ncols = min(n, 2 if wide else 4)
    nrows = math.ceil(n / ncols)
    w, h = _panel_size(len(layers), len(heads), 0.2)
    fig, axes, cax = _heat_layout(nrows, ncols, w, h, title, panel_titles=True)
    cmap = _cmap("magma_r")
    im = None
    for idx, k in enumerate(ks):
        r, c = divmod(idx, ncols)
        im = _panel(axes[r][c], grids[idx][0], layers, heads, edges, cmap, 0.0, 1.0, ".2f", f"k = {k}",
                    xlabels=idx + ncols >= n, ylabels=c == 0)
    for idx in range(n, nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    fig.colorbar(im, cax=cax).set_label(cbar_label, fontsize=9)
    return save_figure(fig, path)


def heatmaps(out_dir: Path, head_rows: Sequence[dict], ks: Sequence[int], model_name: str) -> list[Path]:
    """Layer x query-head heatmaps as PNGs in ``out_dir``; returns their paths in this order:

    - ``sweep_rank_e90.png``: ``ov_rank_e90`` (rank at 90% energy), one (L, H) panel, colour scale from the
      smallest to the largest rank seen;
    - ``sweep_rel_error.png``: ``ov_rel_error_k{k}`` = sqrt(1 - E_k), one (L, H) panel per k, shared 0..1 scale;
    - ``sweep_white_heldout.png``: ``white_heldout_k{k}`` (data-aware latent's error on held-out tokens), only
      when some row has such a value.

    Rows are layers (top = first), columns query heads, both labelled with their real ids (a partial sweep
    leaves gaps in neither); missing values are grey. White vertical lines separate GQA groups. Up to
    200 cells a panel, each cell also shows its value.
    """
    _check_head_rows(head_rows)
    ks = [int(k) for k in ks]
    if not ks:
        raise HeadlensError("ks must name at least one latent size")
    out_dir = Path(out_dir)
    name = str(model_name)
    paths = [_rank_figure(out_dir / RANK_PNG, head_rows, name)]
    paths.append(_per_k_figure(out_dir / ERROR_PNG, head_rows, ks, "ov_rel_error_k",
                               f"{_mpl_text(name)}: relative error of rank-k $W_{{OV}}$, "
                               r"$\sqrt{1-E_k}$ (ov_rel_error_k)", "relative error"))
    if any(not math.isnan(_number(r.get(f"white_heldout_k{k}"))) for r in head_rows for k in ks):
        paths.append(_per_k_figure(out_dir / HELDOUT_PNG, head_rows, ks, "white_heldout_k",
                                   f"{_mpl_text(name)}: data-aware latent, error on held-out tokens "
                                   "(white_heldout_k)", "held-out error"))
    return paths


# ----------------------------------------------------------------------------------------------- budget

def _budget_per_layer(budget: dict) -> list[dict]:
    """Per layer: summed latent sizes over kv groups (plain, data-aware, uniform) and KV bytes per token.

    A data-aware sum is None for a layer where any group lacks ``k_data``.
    """
    rows = budget.get("rows") or []
    by_layer: dict[int, dict] = {}
    for r in rows:
        d = by_layer.setdefault(int(r["layer"]), {"layer": int(r["layer"]), "kv_groups": 0, "k_plain": 0,
                                                  "k_data": 0, "k_uniform": 0})
        d["kv_groups"] += 1
        for key in ("k_plain", "k_data", "k_uniform"):
            v = r.get(key)
            d[key] = None if (v is None or d[key] is None) else d[key] + int(v)
    for p in budget.get("per_layer") or []:
        d = by_layer.setdefault(int(p["layer"]), {"layer": int(p["layer"]), "kv_groups": 0, "k_plain": None,
                                                  "k_data": None, "k_uniform": None})
        for key in ("kv_bytes_before", "kv_bytes_after_plain", "kv_bytes_after_data", "kv_bytes_after_uniform"):
            d[key] = p.get(key)
    return [by_layer[k] for k in sorted(by_layer)]


def _bars(ax, layers: list[int], series: list[tuple[str, list, str]], ylabel: str, title: str) -> None:
    x = np.arange(len(layers))
    n = len(series)
    width = 0.8 / n
    for i, (label, values, color) in enumerate(series):
        vals = np.array([_number(v) for v in values])
        ax.bar(x + (i - (n - 1) / 2) * width, np.nan_to_num(vals, nan=0.0), width=width, label=label,
               color=color, edgecolor="none")
    pos, lab = _ticks(layers)
    ax.set_xticks(pos)
    ax.set_xticklabels(lab, fontsize=8 if len(layers) > 16 else 10)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(n, 4), loc="upper left", bbox_to_anchor=(0, -0.14 if len(layers) > 16 else -0.2))


def _has(values: Iterable) -> bool:
    return any(v is not None for v in values)


def budget_outputs(out_dir: Path, budget: dict | None, model_name: str) -> list[Path]:
    """The latent-budget table and chart; returns the written paths (``[]`` when ``budget`` is None):

    - ``sweep_budget.csv``: ``budget["rows"]``, one row per (layer, kv head);
    - ``sweep_budget_layers.csv``: ``budget["per_layer"]`` (KV bytes per token before/after, per layer);
    - ``sweep_budget.png``: top panel, latent size per layer (sum of k over the layer's kv groups) for the
      plain, data-aware (when present) and uniform allocations side by side; bottom panel, KV cache bytes per
      token per layer before vs after each allocation.
    """
    if budget is None:
        return []
    if not isinstance(budget, dict):
        raise HeadlensError(f"budget must be a dict or None, got {type(budget).__name__}")
    out_dir = Path(out_dir)
    rows = budget.get("rows") or []
    per_layer = budget.get("per_layer") or []
    paths = [write_csv(out_dir / BUDGET_CSV, rows), write_csv(out_dir / BUDGET_LAYERS_CSV, per_layer)]
    agg = _budget_per_layer(budget)
    if not agg:
        return paths

    plt = _pyplot()
    layers = [d["layer"] for d in agg]
    width = min(max(0.34 * len(layers) + 3.0, 7.0), 18.0)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(width, 8.6), layout="constrained")
    latent = [("plain latent", [d["k_plain"] for d in agg], "C0")]
    if _has(d["k_data"] for d in agg):
        latent.append(("data-aware latent", [d["k_data"] for d in agg], "C2"))
    uk = (budget.get("totals") or {}).get("uniform_k")
    latent.append((f"uniform, {_uniform_label(uk)}" if uk is not None else "uniform",
                   [d["k_uniform"] for d in agg], "C1"))
    _bars(ax1, layers, latent, "latent dims per token\n(sum over kv groups)", "latent size per layer")
    kv = [("before (full K+V)", [d.get("kv_bytes_before") for d in agg], "0.55"),
          ("after, plain", [d.get("kv_bytes_after_plain") for d in agg], "C0")]
    if _has(d.get("kv_bytes_after_data") for d in agg):
        kv.append(("after, data-aware", [d.get("kv_bytes_after_data") for d in agg], "C2"))
    kv.append(("after, uniform", [d.get("kv_bytes_after_uniform") for d in agg], "C1"))
    _bars(ax2, layers, kv, "KV cache bytes per token", "KV cache bytes per token, before vs after")
    target = budget.get("target")
    title = f"{_mpl_text(model_name)}: MLA latent budget"
    if target:
        title += f", target {_mpl_text(target)}"
    totals = budget.get("totals") or {}
    line = _totals_line(totals)
    chars = max(int(width * 72 / (12 * 0.55)), 30)
    text = "\n".join(textwrap.wrap(title, chars) + (textwrap.wrap(_mpl_text(line), chars) if line else []))
    fig.suptitle(text, fontsize=12)
    paths.append(save_figure(fig, out_dir / BUDGET_PNG))
    return paths


def _uniform_label(k: Any) -> str:
    """'k = 48', or 'mean k = 31.35' when the uniform allocation's k is an average."""
    v = float(k)
    return f"k = {v:g}" if v.is_integer() else f"mean k = {v:.2f}"


def _totals_line(totals: dict) -> str:
    before, after = totals.get("kv_bytes_before"), totals.get("kv_bytes_after_plain")
    if before is None or after is None:
        return ""
    line = f"all layers: {_fmt_bytes(before)} \u2192 {_fmt_bytes(after)} KV bytes/token (plain"
    if totals.get("saving_plain_pct") is not None:
        line += f", saving {_fmt_pct(totals['saving_plain_pct'])}"
    line += ")"
    if totals.get("kv_bytes_after_data") is not None:
        line += f", {_fmt_bytes(totals['kv_bytes_after_data'])} (data-aware"
        if totals.get("saving_data_pct") is not None:
            line += f", saving {_fmt_pct(totals['saving_data_pct'])}"
        line += ")"
    return line


# ------------------------------------------------------------------------------------------ aggregation

def _ks(rows: Sequence[dict], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\Z")
    found = {int(m.group(1)) for r in rows for key in r for m in [pat.match(key)] if m}
    return sorted(found)


def _stats(values: Iterable[Any]) -> tuple[float | None, float | None, float | None]:
    vals = [v for v in (_number(x) for x in values) if not math.isnan(v)]
    if not vals:
        return None, None, None
    return float(np.mean(vals)), float(min(vals)), float(max(vals))


def layer_aggregates(head_rows: Sequence[dict], group_rows: Sequence[dict] | None = None,
                     ks: Sequence[int] | None = None) -> list[dict]:
    """One dict per layer (sorted) of per-head aggregates, ready for ``write_table`` or the page.

    Keys: ``layer``, ``heads``, ``ov_rank_e90_{mean,min,max}``; per k ``ov_rel_error_k{k}_{mean,min,max}``
    and, when any head has it, ``white_heldout_k{k}_mean``; from ``group_rows``: ``kv_groups`` and
    ``stack_rank_e90_{mean,min,max}`` over the layer's kv groups. ``ks`` defaults to the k found in the
    ``ov_rel_error_k{k}`` columns. Missing/None values are left out of each statistic (None if all are).
    """
    ks = _ks(head_rows, "ov_rel_error_k") if ks is None else [int(k) for k in ks]
    held = [k for k in ks if any(r.get(f"white_heldout_k{k}") is not None for r in head_rows)]
    by_layer: dict[int, list[dict]] = {}
    for r in head_rows:
        by_layer.setdefault(int(r["layer"]), []).append(r)
    groups: dict[int, list[dict]] = {}
    for g in group_rows or []:
        groups.setdefault(int(g["layer"]), []).append(g)
    out = []
    for layer in sorted(set(by_layer) | set(groups)):
        heads = by_layer.get(layer, [])
        d: dict[str, Any] = {"layer": layer, "heads": len(heads)}
        d["ov_rank_e90_mean"], d["ov_rank_e90_min"], d["ov_rank_e90_max"] = _stats(r.get("ov_rank_e90")
                                                                                   for r in heads)
        for k in ks:
            s = _stats(r.get(f"ov_rel_error_k{k}") for r in heads)
            d[f"ov_rel_error_k{k}_mean"], d[f"ov_rel_error_k{k}_min"], d[f"ov_rel_error_k{k}_max"] = s
        for k in held:
            d[f"white_heldout_k{k}_mean"] = _stats(r.get(f"white_heldout_k{k}") for r in heads)[0]
        if group_rows is not None:
            gs = groups.get(layer, [])
            d["kv_groups"] = len(gs)
            s = _stats(g.get("stack_rank_e90") for g in gs)
            d["stack_rank_e90_mean"], d["stack_rank_e90_min"], d["stack_rank_e90_max"] = s
        out.append(d)
    return out


# ------------------------------------------------------------------------------------------------- html

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: Any) -> str:
    """A cell for the page: None -> '–', ints as is, floats with 4 significant digits."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (Integral, np.integer)):
        return str(int(value))
    if isinstance(value, (Real, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(value)


def _fmt_bytes(value: Any) -> str:
    """Bytes with thousands separators: 1179648 -> '1,179,648'."""
    if value is None:
        return "\u2013"
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    return f"{int(round(v)):,}" if abs(v - round(v)) < 1e-9 else f"{v:,.1f}"


def _fmt_pct(value: Any) -> str:
    """A percentage already in percent: 43.75 -> '43.75%'."""
    return "\u2013" if value is None else f"{float(value):.2f}%"


def _fmt_err(value: Any) -> str:
    """An error fraction with 4 decimals: 0.08321 -> '0.0832'."""
    if value is None:
        return "\u2013"
    v = float(value)
    return f"{v:.4f}" if math.isfinite(v) else str(v)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:2px 7px;text-align:right;white-space:nowrap}
th{background:#f3f4f6;position:sticky;top:0;white-space:normal;vertical-align:bottom;max-width:11em}
td.l,th.l{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
.scroll{overflow:auto;max-height:80vh;border:1px solid #eee}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
details{margin:.8em 0}summary{cursor:pointer;font-weight:600}
.note{color:#555;font-size:.9em}
table.kv td{text-align:left;white-space:normal}table.kv th{max-width:none;position:static}
"""

_CAPTIONS = {
    RANK_PNG: "Rank of W_OV at 90% energy for every layer and query head.",
    ERROR_PNG: "Relative error sqrt(1 - E_k) of the rank-k W_OV for each latent size k.",
    HELDOUT_PNG: "Data-aware (whitened) latent: error measured on held-out tokens for each k.",
    BUDGET_PNG: "Latent size per layer and KV cache bytes per token under each allocation.",
}

_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
         ".svg": "image/svg+xml", ".webp": "image/webp"}


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


def _summary_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return _e(", ".join(_fmt(v) if not isinstance(v, str) else v for v in value))
        if value and all(isinstance(v, dict) for v in value):  # e.g. a per-layer list: a collapsed table
            return (f"<details><summary>{len(value)} rows</summary>"
                    + _table(_columns(value), list(value)) + "</details>")
        return _e(repr(value))
    return _e(value if isinstance(value, str) else _fmt(value))


def _model_name(summary: dict) -> str:
    """The page title's model: ``summary["model"]`` (a string, or a dict with ``name``), else a fallback."""
    for key in ("model", "model_name", "name", "hf_repo", "weights"):
        value = summary.get(key)
        if isinstance(value, dict):
            value = next((value[k] for k in ("name", "model_name", "hf_repo", "source") if value.get(k)), None)
        if value:
            return str(value)
    return "model"


def _header(summary: dict) -> str:
    """Title, the run summary as a key/value table, and the notes.

    Entries at most one dict deep (``model.name``, ``config.ks``) are shown; deeper ones and lists of dicts
    (per-layer tables the page shows elsewhere) go into a collapsed "full run summary".
    """
    name = _model_name(summary)
    parts = [f"<h1>headlens sweep: {_e(name)}</h1>"]
    notes = summary.get("notes")
    items = _flatten({k: v for k, v in summary.items() if k != "notes"})

    def bulky(key: str, value: Any) -> bool:
        return key.count(".") > 1 or (isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value))

    shown = [(k, v) for k, v in items if not bulky(k, v)]
    more = [(k, v) for k, v in items if bulky(k, v)]

    def kv_table(pairs: list[tuple[str, Any]]) -> str:
        rows = "".join(f'<tr><th class="l">{_e(k)}</th><td>{_summary_value(v)}</td></tr>' for k, v in pairs)
        return f'<table class="kv"><tbody>{rows}</tbody></table>'

    if shown:
        parts.append(kv_table(shown))
    if notes:
        notes = [notes] if isinstance(notes, str) else list(notes)
        parts.append('<ul class="note">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    if more:
        parts.append(f"<details><summary>full run summary ({len(more)} more entries)</summary>"
                     + kv_table(more) + "</details>")
    return "\n".join(parts)


def _row_errors(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    mean, _, mx = _stats(r.get(key) for r in rows)
    return mean, mx


def _budget_section(budget: dict | None) -> str:
    if not budget:
        return "<h2>Latent budget</h2><p class=\"note\">No budget was computed.</p>"
    totals = budget.get("totals") or {}
    rows = budget.get("rows") or []
    per_layer = budget.get("per_layer") or []

    def total_of(key: str) -> Any:
        if totals.get(key) is not None:
            return totals[key]
        vals = [p.get(key) for p in per_layer]
        return sum(vals) if vals and all(v is not None for v in vals) else None

    before = total_of("kv_bytes_before")

    def saving(after: Any, key: str) -> Any:
        if totals.get(key) is not None:
            return totals[key]
        if after is None or not before:
            return None
        return 100.0 * (1.0 - float(after) / float(before))

    def err(kind: str, row_key: str) -> tuple[Any, Any]:
        mean, mx = totals.get(f"mean_err_{kind}"), totals.get(f"max_err_{kind}")
        if mean is None and mx is None:
            mean, mx = _row_errors(rows, row_key)
        return mean, mx

    def latent_sum(kind: str, key: str) -> Any:
        if totals.get(f"latent_dims_{kind}") is not None:
            return totals[f"latent_dims_{kind}"]
        vals = [r.get(key) for r in rows]
        return sum(vals) if vals and all(v is not None for v in vals) else None

    strategies = [("plain latent (SVD of the stacked W_OV)", "plain", "err_plain", "k_plain")]
    data_after = total_of("kv_bytes_after_data")
    if data_after is not None or any(r.get("k_data") is not None for r in rows):
        strategies.append(("data-aware latent (whitened)", "data", "err_data", "k_data"))
    uk = totals.get("uniform_k")
    strategies.append((f"uniform, {_uniform_label(uk)} per kv group" if uk is not None else "uniform k per kv group",
                       "uniform", "err_uniform_plain", "k_uniform"))

    out = ["<h2>Latent budget</h2>"]
    target = budget.get("target")
    bpv = budget.get("bytes_per_value")
    meta = []
    if target is not None:
        meta.append(f"target: <b>{_e(target)}</b> per kv group")
    if bpv is not None:
        meta.append(f"{_e(_fmt(bpv))} bytes per cached value")
    meta.append(f"KV cache before: <b>{_e(_fmt_bytes(before))}</b> bytes per token (all layers)")
    out.append("<p>" + " \u00b7 ".join(meta) + "</p>")
    out.append("<table><thead><tr><th class=\"l\">allocation</th><th>latent dims (sum)</th>"
               "<th>KV bytes/token after</th><th>saving</th><th>mean error</th><th>max error</th>"
               "</tr></thead><tbody>")
    for label, kind, row_key, k_key in strategies:
        after = total_of(f"kv_bytes_after_{kind}")
        mean, mx = err(kind, row_key)
        out.append(f"<tr><td class=\"l\">{_e(label)}</td><td>{_e(_fmt(latent_sum(kind, k_key)))}</td>"
                   f"<td>{_e(_fmt_bytes(after))}</td><td>{_e(_fmt_pct(saving(after, f'saving_{kind}_pct')))}</td>"
                   f"<td>{_e(_fmt_err(mean))}</td><td>{_e(_fmt_err(mx))}</td></tr>")
    out.append("</tbody></table>")
    if totals.get("mean_err_uniform_data") is not None or any(r.get("err_uniform_data") is not None
                                                               for r in rows):
        mean, mx = err("uniform_data", "err_uniform_data")
        out.append(f"<p class=\"note\">uniform k with the data-aware latent: mean error {_e(_fmt_err(mean))}, "
                   f"max {_e(_fmt_err(mx))} (predicted on the fit tokens).</p>")
    if totals.get("mean_err_data_heldout") is not None:
        out.append(f"<p class=\"note\">data-aware errors above are predicted from the whitened spectrum of the fit "
                   f"tokens; measured on held-out tokens: budgeted mean "
                   f"{_e(_fmt_err(totals.get('mean_err_data_heldout')))}, max "
                   f"{_e(_fmt_err(totals.get('max_err_data_heldout')))}; uniform k mean "
                   f"{_e(_fmt_err(totals.get('mean_err_uniform_data_heldout')))}, max "
                   f"{_e(_fmt_err(totals.get('max_err_uniform_data_heldout')))}.</p>")
    if totals:
        out.append("<details><summary>all totals</summary><table class=\"kv\"><tbody>")
        for k, v in totals.items():
            out.append(f"<tr><th class=\"l\">{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>")
        out.append("</tbody></table></details>")
    return "\n".join(out)


def _image_tag(path: Path) -> str:
    path = Path(path)
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise HeadlensError(f"cannot embed {path}: not an image type the page knows ({', '.join(_MIME)})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HeadlensError(f"cannot read image {path}: {exc.strerror or exc}") from None
    caption = _CAPTIONS.get(path.name, path.name)
    b64 = base64.b64encode(data).decode("ascii")
    return (f"<figure><img src=\"data:{mime};base64,{b64}\" alt=\"{_e(caption)}\">"
            f"<figcaption>{_e(caption)} <code>{_e(path.name)}</code></figcaption></figure>")


def _table(columns: list[str], rows: list[dict], left: Sequence[str] = ()) -> str:
    """An HTML table of ``rows`` over ``columns``, every cell escaped."""
    cls = {c: ' class="l"' if c in set(left) else "" for c in columns}
    head = "".join(f"<th{cls[c]}>{_e(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = "".join(f"<td{cls[c]}>{_e(_fmt(r.get(c)))}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return (f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table></div>")


def _layer_section(head_rows: Sequence[dict], group_rows: Sequence[dict], budget: dict | None) -> str:
    ks = _ks(head_rows, "ov_rel_error_k")
    agg = layer_aggregates(head_rows, group_rows, ks)
    stacked: dict[int, list[str]] = {}
    for g in sorted(group_rows or [], key=lambda g: (int(g["layer"]), _number(g.get("kv_head")))):
        stacked.setdefault(int(g["layer"]), []).append(_fmt(g.get("stack_rank_e90")))
    budget_by_layer = {d["layer"]: d for d in _budget_per_layer(budget)} if budget else {}

    def trio(d: dict, key: str, fmt, bound_fmt=None) -> str:
        mean, lo, hi = d.get(f"{key}_mean"), d.get(f"{key}_min"), d.get(f"{key}_max")
        if mean is None:
            return "\u2013"
        bound_fmt = bound_fmt or fmt
        return f"{fmt(mean)} ({bound_fmt(lo)}\u2013{bound_fmt(hi)})"

    def rank_fmt(v: float) -> str:
        return f"{v:.1f}"

    def int_fmt(v: float) -> str:
        return f"{v:g}"

    held = [k for k in ks if any(f"white_heldout_k{k}_mean" in d for d in agg)]
    cols = ["layer", "heads", "rank e90 mean (min\u2013max)"]
    cols += [f"rel error k={k} mean (min\u2013max)" for k in ks]
    cols += [f"data-aware held-out error k={k} mean" for k in held]
    cols += ["stacked rank e90 per kv group"]
    if budget_by_layer:
        cols += ["latent k plain (sum)", "latent k data-aware (sum)", "KV bytes/token before",
                 "after plain", "after data-aware", "after uniform"]
    body = []
    for d in agg:
        cells = [str(d["layer"]), str(d["heads"]), trio(d, "ov_rank_e90", rank_fmt, int_fmt)]
        cells += [trio(d, f"ov_rel_error_k{k}", _fmt_err) for k in ks]
        cells += [_fmt_err(d.get(f"white_heldout_k{k}_mean")) for k in held]
        cells.append(", ".join(stacked.get(d["layer"], [])) or "\u2013")
        if budget_by_layer:
            b = budget_by_layer.get(d["layer"], {})
            cells += [_fmt(b.get("k_plain")), _fmt(b.get("k_data")), _fmt_bytes(b.get("kv_bytes_before")),
                      _fmt_bytes(b.get("kv_bytes_after_plain")), _fmt_bytes(b.get("kv_bytes_after_data")),
                      _fmt_bytes(b.get("kv_bytes_after_uniform"))]
        body.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    return ("<h2>Per layer</h2><p class=\"note\">Over the layer's query heads: mean (min\u2013max). Stacked rank: "
            "rank at 90% energy of the stack of W_OV over each kv group's query heads, in kv-head order.</p>"
            f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table></div>")


def write_html(path: Path, summary: dict, head_rows: Sequence[dict], group_rows: Sequence[dict],
               budget: dict | None, images: Sequence[Path]) -> Path:
    """Write the sweep's self-contained report page to ``path`` (atomically) and return ``path``.

    Sections: a header from ``summary`` (every key shown, nested dicts flattened to ``a.b``, ``notes`` as a
    list); the budget totals (bytes per token before/after, saving %, plain vs data-aware vs uniform with mean
    and max error); ``images`` in the given order, embedded as base64 data URIs; a per-layer table (mean, min,
    max of ``ov_rank_e90`` and of ``ov_rel_error_k{k}`` over the layer's heads, stacked kv-group ranks, the
    layer's budget); collapsible full per-head, per-kv-group and budget tables. No external resource and no
    script: the page works offline and from an e-mail attachment. All text is escaped with ``html.escape``.
    """
    if not isinstance(summary, dict):
        raise HeadlensError(f"summary must be a dict, got {type(summary).__name__}")
    _check_head_rows(head_rows)
    group_rows = list(group_rows or [])
    name = _model_name(summary)
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>headlens sweep: {_e(name)}</title>",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             f"<style>{_CSS}</style></head><body>",
             _header(summary),
             _budget_section(budget)]
    if images:
        parts.append("<h2>Figures</h2>")
        parts.extend(_image_tag(p) for p in images)
    parts.append(_layer_section(head_rows, group_rows, budget))
    head_cols = _columns(head_rows)
    parts.append(f"<details><summary>every query head ({len(head_rows)} rows)</summary>"
                 + _table(head_cols, list(head_rows)) + "</details>")
    if group_rows:
        parts.append(f"<details><summary>every kv group ({len(group_rows)} rows)</summary>"
                     + _table(_columns(group_rows), group_rows) + "</details>")
    if budget and budget.get("rows"):
        rows = budget["rows"]
        parts.append(f"<details><summary>budget per kv group ({len(rows)} rows)</summary>"
                     + _table(_columns(rows), rows) + "</details>")
    parts.append("</body></html>\n")
    final = Path(path)
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(parts))
    return final
