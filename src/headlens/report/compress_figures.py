"""The pictures of ``headlens compress`` (PNG, written atomically), drawn from its summary dict
(:func:`headlens.report.compress.summary`):

- :func:`scatter` -> ``compress_scatter.png``: the spectrum's predicted error against the measured ones, per layer;
- :func:`tradeoff` -> ``compress_tradeoff.png``: KV saving against next-token KL (causal LMs) or embedding cosine
  (encoders), one line per kind of configuration.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from headlens.report.figures import _pyplot, save_figure
from headlens.report.sweep_common import number

LATENT_COLOURS = {"plain": "C0", "data-aware": "C2"}
ALLOCATION_MARKERS = {"budget": "o", "uniform": "^"}
PANELS = (("value_path_error", "value-path error", "measured value-path error ||M(v - v')|| / ||M v||"),
          ("isolated_error", "isolated attention-output error", "measured error, only this layer compressed"),
          ("accumulated_error", "accumulated error", "measured error, every layer compressed"))


def _mpl_text(text: Any) -> str:
    """Text for a matplotlib title: '$' would start mathtext."""
    return str(text).replace("$", r"\$")


def _model_name(summary: dict) -> str:
    model = summary.get("model")
    if isinstance(model, dict):
        model = model.get("name") or model.get("source")
    return str(model) if model else "model"


def _colour(latent: Any) -> str:
    return LATENT_COLOURS.get(str(latent), "C7")


def _marker(allocation: Any) -> str:
    return ALLOCATION_MARKERS.get(str(allocation), "s")


def _kind_label(latent: Any, allocation: Any) -> str:
    return f"uniform ({latent})" if allocation == "uniform" else f"{latent}, budget"


def _finite(*values: Any) -> bool:
    return all(not math.isnan(number(v)) for v in values)


def scatter(path: Path, summary: dict) -> Path:
    """``compress_scatter.png``: three panels side by side (value-path, isolated attention-output and accumulated
    error), each the measured error (y) against the spectrum's predicted error (x), one point per
    (configuration, layer); colour by latent kind, marker by allocation; the y = x diagonal; both axes from 0 to a
    little above the panel's largest value. Points with a missing value are left out. Returns ``path``."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    records = list(summary.get("configurations") or [])
    fig, axes = plt.subplots(1, len(PANELS), figsize=(13.0, 4.5))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.86, wspace=0.3)  # square panels, fixed margins
    kinds: dict[tuple[str, str], None] = {}
    for ax, (key, title, ylabel) in zip(axes, PANELS):
        top = 0.0
        groups: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        for r in records:
            kind = (str(r.get("latent")), str(r.get("allocation")))
            for e in r.get("layers") or []:
                x, y = e.get("predicted_error"), e.get(key)
                if not _finite(x, y):
                    continue
                xs, ys = groups.setdefault(kind, ([], []))
                xs.append(float(x))
                ys.append(float(y))
                top = max(top, float(x), float(y))
        for kind, (xs, ys) in groups.items():
            kinds[kind] = None
            ax.scatter(xs, ys, s=26, c=_colour(kind[0]), marker=_marker(kind[1]), alpha=0.75,
                       edgecolors="white", linewidths=0.4, zorder=3)
        lim = top * 1.08 if top > 0 else 1.0
        ax.plot([0, lim], [0, lim], color="0.45", lw=1.0, ls="--", zorder=1)
        ax.set_xlim(0, lim)
        ax.set_ylim(0, lim)
        ax.set_aspect("equal", adjustable="box")
        ax.grid(True, alpha=0.3)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("predicted error (from the spectrum)", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        if not groups:
            ax.text(0.5, 0.5, "no measured values", ha="center", va="center", transform=ax.transAxes, color="0.4")
    handles = [Line2D([], [], ls="none", marker=_marker(a), color=_colour(latent), markersize=7,
                      label=_kind_label(latent, a)) for latent, a in kinds]
    handles.append(Line2D([], [], color="0.45", lw=1.0, ls="--", label="y = x"))
    axes[0].legend(handles=handles, fontsize=8, loc="upper left", framealpha=0.85)
    fig.suptitle(f"{_mpl_text(_model_name(summary))}: predicted vs measured error per layer "
                 "(one point per configuration and layer)", fontsize=12)
    return save_figure(fig, Path(path), dpi=110)


def _metric(summary: dict) -> tuple[str, str]:
    if summary.get("task") == "causal-lm":
        return "kl_mean", "mean next-token KL(original || compressed), nats"
    return "embedding_cosine_mean", "mean embedding cosine (original vs compressed)"


def _target_label(target: Any) -> str:
    v = number(target)
    return str(target) if math.isnan(v) else f"{v:g}"


def tradeoff(path: Path, summary: dict) -> Path:
    """``compress_tradeoff.png``: KV saving in % (x) against mean next-token KL in nats (causal LMs; log scale when
    every value is positive) or mean embedding cosine (encoders), one line with markers per kind present (plain
    budget, data-aware budget, uniform (plain), uniform (data-aware)), sorted by saving; each budget point
    labelled with its target. Configurations without the metric are left out. Returns ``path``."""
    plt = _pyplot()
    key, ylabel = _metric(summary)
    series: dict[tuple[str, str], list[tuple[float, float, Any]]] = {}
    for r in summary.get("configurations") or []:
        saving, value = r.get("saving"), r.get(key)
        if not _finite(saving, value):
            continue
        kind = (str(r.get("latent")), str(r.get("allocation")))
        series.setdefault(kind, []).append((100.0 * float(saving), float(value), r.get("target")))
    order = [("plain", "budget"), ("data-aware", "budget"), ("plain", "uniform"), ("data-aware", "uniform")]
    kinds = [k for k in order if k in series] + [k for k in series if k not in order]
    fig, ax = plt.subplots(figsize=(8.5, 5.0), layout="constrained")
    values = [v for pts in series.values() for _, v, _ in pts]
    log = key == "kl_mean" and bool(values) and all(v > 0 for v in values)
    for kind in kinds:
        pts = sorted(series[kind], key=lambda p: p[0])
        latent, allocation = kind
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_marker(allocation), color=_colour(latent),
                ls="-" if allocation == "budget" else ":", lw=1.4, markersize=6, label=_kind_label(latent, allocation))
        if allocation == "budget":
            dy = 6 if latent == "plain" else -11  # plain labels above, data-aware below: they sit close together
            for x, y, target in pts:
                ax.annotate(_target_label(target), (x, y), xytext=(4, dy), textcoords="offset points", fontsize=7,
                            color=_colour(latent))
    ax.margins(x=0.07, y=0.08)
    if log:
        ax.set_yscale("log")
    if not values:
        ax.text(0.5, 0.5, "no configuration has this metric", ha="center", va="center", transform=ax.transAxes,
                color="0.4")
    ax.set_xlabel("KV cache saved (% of bytes per token)")
    ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
    ax.grid(True, alpha=0.3, which="both" if log else "major")
    if kinds:
        ax.legend(fontsize=9, loc="best")
    fig.suptitle(f"{_mpl_text(_model_name(summary))}: KV saving vs "
                 f"{'next-token KL' if key == 'kl_mean' else 'embedding cosine'}", fontsize=12)
    return save_figure(fig, Path(path), dpi=110)
