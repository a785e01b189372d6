"""The pictures of ``headlens compress`` (PNG, written atomically), drawn from its summary dict
(:func:`headlens.report.compress.summary`):

- :func:`scatter` -> ``compress_scatter.png``: the spectrum's predicted error against the measured ones, per layer;
  with key latents (``--keys``) a fourth panel, the key spectrum's predicted error against the measured logit error;
- :func:`tradeoff` -> ``compress_tradeoff.png``: KV saving against next-token KL (causal LMs) or embedding cosine
  (encoders), one line per kind of configuration (with key latents: per part, values alone, keys alone, both).

A run without key latents draws exactly what it drew before keys existed (byte for byte).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from headlens.report.figures import _pyplot, save_figure
from headlens.report.sweep_common import number

LATENT_COLOURS = {"plain": "C0", "data-aware": "C2"}
ALLOCATION_MARKERS = {"budget": "o", "uniform": "^", "error": "o", "energy": "o", "fisher": "P", "greedy": "*"}
# with key latents: marker by part in the keys panel (both hollow, so it shows around the keys-alone point it
# usually sits on: the same key sizes give the same logit error), line style by part on the trade-off
PART_MARKERS = {"keys": "D", "both": "o"}
PART_STYLES = {"values": "-", "keys": "--", "both": "-."}
PART_NAMES = {"values": "values", "keys": "keys alone", "both": "values + keys"}
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


def _diagonal_panel(ax, top: float, title: str) -> None:
    """A predicted-against-measured panel: both axes from 0 to a little past ``top``, square, the y = x diagonal."""
    lim = top * 1.08 if top > 0 else 1.0
    ax.plot([0, lim], [0, lim], color="0.45", lw=1.0, ls="--", zorder=1)
    ax.set_xlim(0, lim)
    ax.set_ylim(0, lim)
    ax.set_aspect("equal", adjustable="box")
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=11)


def _marker(allocation: Any) -> str:
    return ALLOCATION_MARKERS.get(str(allocation), "s")


def _kind_label(latent: Any, allocation: Any) -> str:
    return f"uniform ({latent})" if allocation == "uniform" else f"{latent}, {allocation}"


def _finite(*values: Any) -> bool:
    return all(not math.isnan(number(v)) for v in values)


def keyed(record: dict) -> bool:
    """Whether a configuration record compresses keys (``part`` keys or both, with per-layer key errors)."""
    return record.get("part") in ("keys", "both") and bool(record.get("key_layers"))


def key_points(summary: dict) -> dict[tuple[str, str], list[tuple[float, float, bool]]]:
    """The keys panel's points: per (key latent kind, part) the (predicted key error, measured logit error, rotary)
    of every compressed layer of every configuration with key latents, in record order; layers with a missing
    value are left out. Empty for a run without key latents."""
    out: dict[tuple[str, str], list[tuple[float, float, bool]]] = {}
    for r in summary.get("configurations") or []:
        if not keyed(r):
            continue
        for e in r["key_layers"]:
            x, y = e.get("key_predicted_error"), e.get("key_logit_error")
            if x is None or y is None or not _finite(x, y):
                continue
            out.setdefault((str(r.get("key_latent")), str(r.get("part"))), []).append(
                (float(x), float(y), bool(e.get("rotary"))))
    return out


def _key_panel(ax, summary: dict) -> None:
    """The keys panel: measured relative logit error (only this layer's keys compressed) against the key
    spectrum's prediction; colour by key latent kind, marker by part; the diagonal; its own legend."""
    from matplotlib.lines import Line2D

    points = key_points(summary)
    top = max((max(x, y) for pts in points.values() for x, y, _ in pts), default=0.0)
    handles = []
    for (latent, part), pts in points.items():
        hollow = part == "both"
        style = dict(facecolors="none", edgecolors=_colour(latent), linewidths=1.2, s=46) if hollow else \
            dict(c=_colour(latent), edgecolors="white", linewidths=0.4, s=26)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=PART_MARKERS.get(part, "s"), alpha=0.8,
                   zorder=3, **style)
        handles.append(Line2D([], [], ls="none", marker=PART_MARKERS.get(part, "s"), markersize=7,
                              color=_colour(latent), markerfacecolor="none" if hollow else _colour(latent),
                              label=f"{PART_NAMES.get(part, part)} ({latent} keys)"))
    _diagonal_panel(ax, top, "key logit error")
    ax.set_xlabel("predicted key error (from the key spectrum)", fontsize=9)
    ax.set_ylabel("measured logit error, only this layer's keys compressed", fontsize=9)
    ax.tick_params(labelsize=8)
    if not points:
        ax.text(0.5, 0.5, "no measured values", ha="center", va="center", transform=ax.transAxes, color="0.4")
    handles.append(Line2D([], [], color="0.45", lw=1.0, ls="--", label="y = x"))
    rotary = any(rot for pts in points.values() for _, _, rot in pts)
    ax.legend(handles=handles, fontsize=8, loc="upper left", framealpha=0.85, title_fontsize=7.5,
              title="rotary layers: predicted = expectation\nover relative rotations" if rotary else None)


def scatter(path: Path, summary: dict) -> Path:
    """``compress_scatter.png``: three panels side by side (value-path, isolated attention-output and accumulated
    error), each the measured error (y) against the spectrum's predicted error (x), one point per
    (configuration, layer); colour by latent kind, marker by allocation; the y = x diagonal; both axes from 0 to a
    little above the panel's largest value. Points with a missing value are left out. With key latents the value
    panels draw the values + keys configurations hollow, and a fourth panel shows the keys (:func:`key_points`).
    Returns ``path``."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    records = list(summary.get("configurations") or [])
    with_keys = any(keyed(r) for r in records)
    if with_keys:
        fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(17.0, 4.7))
        fig.subplots_adjust(left=0.04, right=0.99, bottom=0.12, top=0.86, wspace=0.3)
    else:
        fig, axes = plt.subplots(1, len(PANELS), figsize=(13.0, 4.5))
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.86, wspace=0.3)  # square panels, fixed margins
    kinds: dict[tuple[str, str], None] = {}
    any_hollow = False
    for ax, (key, title, ylabel) in zip(axes, PANELS):
        top = 0.0
        groups: dict[tuple[str, str, bool], tuple[list[float], list[float]]] = {}
        for r in records:
            kind = (str(r.get("latent")), str(r.get("allocation")), with_keys and r.get("part") == "both")
            for e in r.get("layers") or []:
                x, y = e.get("predicted_error"), e.get(key)
                if not _finite(x, y):
                    continue
                xs, ys = groups.setdefault(kind, ([], []))
                xs.append(float(x))
                ys.append(float(y))
                top = max(top, float(x), float(y))
        for (latent, allocation, hollow), (xs, ys) in groups.items():
            kinds[(latent, allocation)] = None
            if hollow:  # a values + keys configuration: hollow, so the values-alone point under it shows
                any_hollow = True
                ax.scatter(xs, ys, s=34, facecolors="none", edgecolors=_colour(latent), marker=_marker(allocation),
                           alpha=0.8, linewidths=1.1, zorder=3)
                continue
            ax.scatter(xs, ys, s=26, c=_colour(latent), marker=_marker(allocation), alpha=0.75,
                       edgecolors="white", linewidths=0.4, zorder=3)
        _diagonal_panel(ax, top, title)
        ax.set_xlabel("predicted error (from the spectrum)", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        if not groups:
            ax.text(0.5, 0.5, "no measured values", ha="center", va="center", transform=ax.transAxes, color="0.4")
    handles = [Line2D([], [], ls="none", marker=_marker(a), color=_colour(latent), markersize=7,
                      label=_kind_label(latent, a)) for latent, a in kinds]
    if any_hollow:
        handles.append(Line2D([], [], ls="none", marker="o", color="0.3", markerfacecolor="none", markersize=7,
                              label="hollow: values + keys"))
    handles.append(Line2D([], [], color="0.45", lw=1.0, ls="--", label="y = x"))
    axes[0].legend(handles=handles, fontsize=8, loc="upper left", framealpha=0.85)
    if with_keys:
        _key_panel(axes[-1], summary)
    fig.suptitle(f"{_mpl_text(_model_name(summary))}: predicted vs measured error per layer "
                 "(one point per configuration and layer)" + ("; keys on the right" if with_keys else ""),
                 fontsize=12)
    return save_figure(fig, Path(path), dpi=110)


def _metric(summary: dict) -> tuple[str, str]:
    if summary.get("task") == "causal-lm":
        return "kl_mean", "mean next-token KL(original || compressed), nats"
    return "embedding_cosine_mean", "mean embedding cosine (original vs compressed)"


def _target_label(target: Any) -> str:
    v = number(target)
    return str(target) if math.isnan(v) else f"{v:g}"


def _series_kind(r: dict, with_keys: bool) -> tuple[str, ...]:
    """A configuration's line on the trade-off: (latent, allocation); with key latents (part, latent, allocation,
    key latent), the latent being the key latent for keys alone."""
    latent, allocation = str(r.get("latent")), str(r.get("allocation"))
    if not with_keys:
        return latent, allocation
    part = str(r.get("part") or "values")
    key_latent = str(r.get("key_latent"))
    return part, (key_latent if part == "keys" else latent), allocation, key_latent


def _series_style(kind: tuple[str, ...]) -> tuple[str, str, Any, float, str]:
    """(colour, marker, line style, line width, label) of a trade-off line: colour by latent kind, marker by
    allocation; without key latents the line style by allocation, with them by part."""
    if len(kind) == 2:
        latent, allocation = kind
        return (_colour(latent), _marker(allocation), "-" if allocation != "uniform" else ":", 1.4,
                _kind_label(latent, allocation))
    part, latent, allocation, key_latent = kind
    shown = f"{latent} + {key_latent} keys" if part == "both" and key_latent != latent else latent
    return (_colour(latent), _marker(allocation), PART_STYLES.get(part, ":"), 1.6 if allocation != "uniform" else 1.0,
            f"{PART_NAMES.get(part, part)}: {_kind_label(shown, allocation)}")


def _series_order(kinds: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    order = [("plain", "budget"), ("data-aware", "budget"), ("plain", "uniform"), ("data-aware", "uniform")]

    def rank(kind: tuple[str, ...]) -> tuple[int, int]:
        part = 0 if len(kind) == 2 else list(PART_STYLES).index(kind[0]) if kind[0] in PART_STYLES else 3
        pair = kind if len(kind) == 2 else kind[1:3]
        return part, order.index(pair) if pair in order else len(order)

    return sorted(kinds, key=rank)  # stable: kinds outside the order keep their first appearance


def tradeoff(path: Path, summary: dict) -> Path:
    """``compress_tradeoff.png``: KV saving in % (x) against mean next-token KL in nats (causal LMs; log scale when
    every value is positive) or mean embedding cosine (encoders), one line with markers per kind present (plain
    budget, data-aware budget, uniform (plain), uniform (data-aware)), sorted by saving; each budget point
    labelled with its target. With key latents one line per part and kind (values alone solid, keys alone dashed,
    values + keys dash-dotted; uniform thinner) and a mark at 50%, the most values alone can save. Configurations
    without the metric are left out. Returns ``path``."""
    plt = _pyplot()
    key, ylabel = _metric(summary)
    with_keys = any(keyed(r) for r in summary.get("configurations") or [])
    series: dict[tuple[str, ...], list[tuple[float, float, Any]]] = {}
    for r in summary.get("configurations") or []:
        saving, value = r.get("saving"), r.get(key)
        if not _finite(saving, value):
            continue
        kind = _series_kind(r, with_keys)
        series.setdefault(kind, []).append((100.0 * float(saving), float(value), r.get("target")))
    kinds = _series_order(list(series))
    fig, ax = plt.subplots(figsize=(9.5, 5.5) if with_keys else (8.5, 5.0), layout="constrained")
    values = [v for pts in series.values() for _, v, _ in pts]
    log = key == "kl_mean" and bool(values) and all(v > 0 for v in values)
    for kind in kinds:
        pts = sorted(series[kind], key=lambda p: p[0])
        colour, marker, ls, lw, label = _series_style(kind)
        latent, allocation = kind if len(kind) == 2 else kind[1:3]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, ls=ls, lw=lw, markersize=6,
                label=label)
        if allocation == "budget":
            dy = 6 if latent == "plain" else -11  # plain labels above, data-aware below: they sit close together
            for x, y, target in pts:
                ax.annotate(_target_label(target), (x, y), xytext=(4, dy), textcoords="offset points", fontsize=7,
                            color=colour)
    if with_keys and any(x > 50 for pts in series.values() for x, _, _ in pts):
        ax.axvline(50.0, color="0.55", lw=0.9, ls=(0, (1, 3)), zorder=0)
        ax.annotate("values alone: at most 50%", (50.0, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                    textcoords="offset points", fontsize=7, color="0.4")
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
        ax.legend(fontsize=8 if with_keys else 9, loc="best")
    fig.suptitle(f"{_mpl_text(_model_name(summary))}: KV saving vs "
                 f"{'next-token KL' if key == 'kl_mean' else 'embedding cosine'}", fontsize=12)
    return save_figure(fig, Path(path), dpi=110)
