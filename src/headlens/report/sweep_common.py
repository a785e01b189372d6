"""What the sweep's report modules share: the names of the files it writes, and how numbers are shown."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

HEADS_STEM = "sweep_heads"  # .csv and .parquet: one row per (layer, query head)
GROUPS_STEM = "sweep_groups"  # .csv and .parquet: one row per (layer, kv head)
RANK_PNG = "sweep_rank_e90.png"
QK_RANK_PNG = "sweep_qk_rank_e90.png"
ERROR_PNG = "sweep_rel_error.png"
HELDOUT_PNG = "sweep_white_heldout.png"
BUDGET_PNG = "sweep_budget.png"
BUDGET_CSV = "sweep_budget.csv"
BUDGET_LAYERS_CSV = "sweep_budget_layers.csv"
SUMMARY_JSON = "sweep_summary.json"
PAGE_HTML = "sweep.html"


def number(value: Any) -> float:
    """A value as a float for plotting; None, strings and non-finite values become NaN."""
    if value is None or isinstance(value, (bool, str)):
        return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def fmt(value: Any) -> str:
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


def fmt_bytes(value: Any) -> str:
    """Bytes with thousands separators: 1179648 -> '1,179,648'."""
    if value is None:
        return "\u2013"
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    return f"{int(round(v)):,}" if abs(v - round(v)) < 1e-9 else f"{v:,.1f}"


def fmt_pct(value: Any) -> str:
    """A percentage already in percent: 43.75 -> '43.75%'."""
    return "\u2013" if value is None else f"{float(value):.2f}%"


def fmt_err(value: Any) -> str:
    """An error fraction with 4 decimals: 0.08321 -> '0.0832'."""
    if value is None:
        return "\u2013"
    v = float(value)
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def uniform_label(k: Any) -> str:
    """'k = 48', or 'mean k = 31.35' when the uniform allocation's k is an average."""
    v = float(k)
    return f"k = {v:g}" if v.is_integer() else f"mean k = {v:.2f}"
