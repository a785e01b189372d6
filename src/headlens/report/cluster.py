"""The files of ``headlens toy cluster``: the GIF of the tokens collapsing, the metrics plot, JSON and CSV, and the
interactive page (the same writers as ``headlens sphere``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from headlens.errors import HeadlensError
from headlens.io.files import check_writable_dir, write_json
from headlens.report.sphere import write_metrics_csv
from headlens.report.sphere_frames import Deferred, render_frame, start_pool, write_gif, write_metrics_png
from headlens.report.sphere_html import write_sphere_html

if TYPE_CHECKING:
    from headlens.toy.cluster import ClusterDemo


@dataclass
class ClusterFiles:
    """Where :func:`write_cluster_demo` wrote each file."""

    gif: Path  # tokens.gif
    metrics_png: Path  # sphere_metrics.png
    metrics_json: Path  # sphere_metrics.json
    metrics_csv: Path  # sphere_metrics.csv
    html: Path  # tokens.html

    def lines(self) -> list[str]:
        """The ``saved <what> -> path`` lines, in the order the command prints them (the words of
        ``headlens sphere``'s lines, :meth:`headlens.report.sphere.SphereFiles.lines`)."""
        return [f"saved gif -> {self.gif}", f"saved metrics plot -> {self.metrics_png}",
                f"saved metrics -> {self.metrics_json}", f"saved metrics csv -> {self.metrics_csv}",
                f"saved html -> {self.html}"]


def _frame_jobs(demo: ClusterDemo, labels: bool) -> list[dict]:
    """One render job per pictured layer."""
    cfg = demo.config
    return [{"points": f.points, "tokens": demo.tokens, "positions": list(range(cfg.tokens)), "labels": labels,
             "title": f"toy transformer, beta={cfg.beta:g}, layer {f.layer}: {demo.picture} keeps {f.explained:.0%}"}
            for f in demo.frames]


def _render(jobs: list[dict], workers: int | None) -> list[bytes]:
    """PNG bytes of every frame, in worker processes when there are more than 4 frames."""
    pool = start_pool(workers) if len(jobs) > 4 else None
    try:  # Deferred draws in this process when there is no pool or it broke (e.g. no importable __main__)
        calls = [Deferred(pool, render_frame, job) for job in jobs]
        return [call.result() for call in calls]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _write_page(path: Path, demo: ClusterDemo, metrics: list[dict]) -> Path:
    """The interactive page: one frame per pictured layer, its metrics under the title."""
    by_layer = {m["layer"]: m for m in metrics}
    frames = [{"layer": f.layer, "points": f.points, "tokens": demo.tokens, "positions": list(range(demo.config.tokens)),
               "norms": f.norms, "explained_variance": float(min(max(f.explained, 0.0), 1.0)), "site": demo.picture}
              for f in demo.frames]
    return write_sphere_html(path, frames, title=f"toy transformer (beta={demo.config.beta:g}): tokens on the sphere",
                             metrics=[by_layer[f["layer"]] for f in frames])


def write_cluster_demo(demo: ClusterDemo, out_dir: Path, frame_seconds: float = 0.5, workers: int | None = None,
                       labels: bool = False) -> ClusterFiles:
    """Write ``tokens.gif``, ``sphere_metrics.{png,json,csv}`` and ``tokens.html`` of ``demo`` into ``out_dir``;
    returns their paths. ``labels`` draws each token's name in the GIF frames."""
    if frame_seconds <= 0:
        raise HeadlensError(f"`frame_seconds` must be positive, got {frame_seconds:g}")
    out_dir = Path(out_dir)
    check_writable_dir(out_dir)
    cfg = demo.config
    files = ClusterFiles(gif=out_dir / "tokens.gif", metrics_png=out_dir / "sphere_metrics.png",
                         metrics_json=out_dir / "sphere_metrics.json", metrics_csv=out_dir / "sphere_metrics.csv",
                         html=out_dir / "tokens.html")
    metrics = demo.sphere.metrics_json()
    write_gif(files.gif, _render(_frame_jobs(demo, labels), workers), frame_seconds)
    write_metrics_png(files.metrics_png, metrics, demo.threshold,
                      f"toy transformer (beta={cfg.beta:g}, step={cfg.step:g}, {cfg.weights} weights): "
                      "clustering through depth")
    write_json(files.metrics_json, {"model": "toy_cluster", "config": asdict(cfg), "threshold": demo.threshold,
                                    "frame_layers": demo.frame_layers, "metrics": metrics, "summary": demo.summary})
    write_metrics_csv(files.metrics_csv, metrics)
    _write_page(files.html, demo, metrics)
    return files
