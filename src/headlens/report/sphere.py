"""The files and lines of ``headlens sphere``: the GIF (frames drawn in worker processes), the interactive page,
the metrics plot, JSON and CSV, and the full result as JSON; and the lines the command prints."""

from __future__ import annotations

import csv
import io
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headlens.io.files import atomic_path, write_json
from headlens.report.sphere_frames import Deferred, render_frame, write_gif, write_metrics_png
from headlens.report.sphere_html import write_sphere_html

if TYPE_CHECKING:
    from headlens.residual.sphere import Frame, SphereConfig, SphereResult

# Columns of sphere_metrics.csv (headlens sphere and the toy clustering demo).
METRICS_COLUMNS = ["layer", "n_tokens", "mean_cos", "q05", "q25", "q50", "q75", "q95", "n_clusters",
                   "largest_cluster", "effective_rank", "baseline_mean_cos", "baseline_effective_rank", "anisotropy",
                   "mean_norm", "explained_variance_3"]


@dataclass
class SphereFiles:
    """Where :func:`write_sphere_outputs` wrote each file."""

    gif: Path  # tokens.gif
    html: Path  # tokens.html
    metrics_png: Path  # sphere_metrics.png
    metrics_json: Path  # sphere_metrics.json
    metrics_csv: Path  # sphere_metrics.csv
    json: Path  # sphere.json (or the path asked for)

    def lines(self) -> list[str]:
        """The ``saved ... -> path`` lines, in the order the command prints them."""
        return [f"saved gif -> {self.gif}", f"saved html -> {self.html}", f"saved metrics plot -> {self.metrics_png}",
                f"saved metrics -> {self.metrics_json}", f"saved metrics csv -> {self.metrics_csv}",
                f"saved json -> {self.json}"]


def sphere_lines(result: SphereResult) -> list[str]:
    """What the command prints before writing: the header, the outliers, one line per layer, the alignment."""
    cfg = result.config
    lines = [result.header]
    for o in result.outliers:
        action = "dropped" if o.position in result.dropped else "kept; --drop-outliers leaves it out"
        lines.append(f"outlier: token {o.position} {o.token!r} has norm {o.norm:.1f} at layer {o.layer}, "
                     f"{o.max_ratio:.0f}x the layer's median ({action})")
    for f, m in zip(result.frames, result.metrics):
        ev = f.explained_variance
        lines.append(f"layer {f.layer:3d}: PCA-3 explains {ev.sum():6.1%} (PC1 {ev[0]:.1%}, PC2 {ev[1]:.1%}, "
                     f"PC3 {ev[2]:.1%})  mean cos {m.mean_cos:.3f}  clusters {m.n_clusters}  "
                     f"eff. rank {m.effective_rank:.1f}")
    if cfg.align and cfg.basis == "layer" and len(result.frames) > 1:
        lines.append(f"alignment: movement between frames {result.movement_unaligned:.1f} -> "
                     f"{result.movement_aligned:.1f} (sum of squared displacements on the sphere)")
    return lines


def metrics_csv(metrics: list[dict]) -> str:
    """The per-layer metrics (``LayerMetrics`` as dicts) as CSV text, one row per layer; floats to 6 digits."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(METRICS_COLUMNS)
    for m in metrics:
        row = {**m, **m["cos_quantiles"]}
        w.writerow([row[c] if not isinstance(row[c], float) else f"{row[c]:.6g}" for c in METRICS_COLUMNS])
    return buf.getvalue()


def write_metrics_csv(path: Path, metrics: list[dict]) -> Path:
    """Write :func:`metrics_csv` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(metrics_csv(metrics), encoding="utf-8")
    return path


def axis_labels(frame: Frame, basis: str = "layer") -> list[str]:
    """The x, y, z labels of a frame: the share of the layer's variance along each drawn axis, named by the
    principal component it is ("PC1 (34.2% var)") or, when alignment rotated the components, the one it mostly
    carries ("axis 1 ≈ PC1 (33.9% var)")."""
    pc = "global PC" if basis == "global" else "PC"
    out = []
    for j, var in enumerate(frame.axis_variance):
        weight = np.asarray(frame.axes)[:, j] ** 2  # (3,) how much of each component axis j carries
        k = int(np.argmax(weight))
        if weight[k] > 1 - 1e-9:
            out.append(f"{pc}{k + 1} ({var:.1%} var)")
        elif weight[k] >= 0.5:
            out.append(f"axis {j + 1} \u2248 {pc}{k + 1} ({var:.1%} var)")
        else:
            out.append(f"axis {j + 1} ({var:.1%} var)")
    return out


def _subtitle(frame: Frame, cfg: SphereConfig) -> str:
    """The line under a frame's title: each component's share of the variance and how the axes were chosen."""
    pc = "global PC" if cfg.basis == "global" else "PC"
    ev = ", ".join(f"{pc}{k + 1} {v:.1%}" for k, v in enumerate(frame.explained_variance))
    rotated = not np.allclose(np.abs(frame.axes), np.round(np.abs(frame.axes)), atol=1e-9)
    how = ("one basis fitted on all selected layers" if cfg.basis == "global"
           else "axes rotated to follow the previous layer" if rotated else "the layer's own principal axes")
    return f"variance kept: {ev}; {how}; {len(frame.kept)} tokens"


def _frame_jobs(result: SphereResult) -> list[dict]:
    """One render job per layer for :func:`~headlens.report.sphere_frames.render_frame` (the keys are
    :func:`~headlens.report.sphere_figure.build_frame`'s)."""
    cfg = result.config
    title = f"{result.name} {cfg.site}"
    outlier_positions = {o.position for o in result.outliers}
    jobs = []
    for f in result.frames:
        kept = f.kept.tolist()
        jobs.append({"points": f.points, "tokens": [result.tokens[i] for i in kept], "positions": kept,
                     "title": f"{title} layer {f.layer}: PCA-3 explains {f.explained_total:.1%} of variance",
                     "subtitle": _subtitle(f, cfg), "axis_labels": axis_labels(f, cfg.basis), "labels": cfg.labels,
                     "first": kept.index(0) if 0 in kept else None,
                     "first_label": "first token (position 0)",
                     "outliers": [i for i, p in enumerate(kept) if p in outlier_positions],
                     "outlier_label": f"outlier: norm > {cfg.outlier_factor:g}x its layer's median"})
    return jobs


def _page_frames(result: SphereResult) -> list[dict]:
    """One frame per layer for :func:`~headlens.report.sphere_html.write_sphere_html`."""
    return [{"layer": f.layer, "points": f.points, "tokens": [result.tokens[i] for i in f.kept],
             "positions": f.kept.tolist(), "norms": f.norms3, "full_norms": f.full_norms,
             "explained_variance": f.explained_total, "site": result.config.site} for f in result.frames]


def _collect_frames(calls: list[Deferred]) -> list[bytes]:
    """The PNG bytes of every frame, in layer order, with a progress bar on stderr."""
    from tqdm.auto import tqdm

    pngs = []
    with tqdm(total=len(calls), desc="rendering frames", unit="frame", file=sys.stderr, disable=None) as bar:
        for call in calls:
            pngs.append(call.result())
            bar.update(1)
    return pngs


def write_sphere_outputs(result: SphereResult, out_dir: Path, json_path: Path | None = None,
                         pool: ProcessPoolExecutor | None = None) -> SphereFiles:
    """Write ``tokens.gif``, ``tokens.html``, ``sphere_metrics.{png,json,csv}`` into ``out_dir`` and the full
    result to ``json_path`` (default ``out_dir/sphere.json``); returns their paths.

    With a ``pool`` (:class:`~headlens.report.sphere_frames.RendererPool`'s executor) worker processes draw the
    frames and the metrics plot while this process writes the page and the tables.
    """
    out_dir = Path(out_dir)
    name, site, cfg = result.name, result.config.site, result.config
    data = result.to_json()
    metrics = data["metrics"]
    files = SphereFiles(gif=out_dir / "tokens.gif", html=out_dir / "tokens.html",
                        metrics_png=out_dir / "sphere_metrics.png", metrics_json=out_dir / "sphere_metrics.json",
                        metrics_csv=out_dir / "sphere_metrics.csv",
                        json=Path(json_path) if json_path else out_dir / "sphere.json")
    frame_calls = [Deferred(pool, render_frame, job) for job in _frame_jobs(result)]
    metrics_call = Deferred(pool, write_metrics_png, files.metrics_png, metrics, cfg.cluster_threshold,
                            f"{name}: clustering of the normalised tokens through depth ({site})")
    write_sphere_html(files.html, _page_frames(result), title=f"{name}: {site} on the unit sphere", metrics=metrics)
    write_json(files.metrics_json, {"model": result.model, "site": site, "metrics": metrics,
                                    "summary": result.summary})
    write_metrics_csv(files.metrics_csv, metrics)
    write_json(files.json, {"model": result.model, "site": site, "prompt": result.prompt, **data})
    write_gif(files.gif, _collect_frames(frame_calls), cfg.frame_seconds)
    metrics_call.result()
    return files
