"""Pictures of the residual stream on the sphere: GIF frames (rendered in worker processes), metrics plot.

This module imports no torch: worker processes start fast and only need numpy and matplotlib.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

from headlens.io.files import atomic_path
from headlens.report.figures import _pyplot, save_figure
from headlens.report.pool import Deferred, WorkerPool, spawn_pool, stop_pool, usable_cores  # noqa: F401 (re-exported)
from headlens.report.sphere_figure import build_frame, frame_png

GIF_MAX_MS = 655_350  # the longest frame a GIF can hold: 65535 hundredths of a second


def render_frame(job: dict) -> bytes:
    """PNG bytes of one frame (see :func:`headlens.report.sphere_figure.build_frame` for the job's keys): the
    translucent unit sphere, the points coloured by position, the first token and outliers marked, axis labels
    with their variance, a colour bar, a legend, and the token labels ``job["labels"]`` asks for."""
    plt = _pyplot()
    frame = build_frame(job)
    try:
        return frame_png(frame)
    finally:
        plt.close(frame.fig)


def warm_up() -> None:
    """Import the plotting stack in a worker before frames arrive."""
    _pyplot()
    import mpl_toolkits.mplot3d  # noqa: F401
    import PIL.Image  # noqa: F401


def start_pool(workers: int | None = None) -> ProcessPoolExecutor | None:
    """A pool of renderer processes, started early so their imports overlap loading and running the model.

    ``workers=None`` uses up to 4 cores, and more than the usable cores are never started; None is returned when
    one process is all there is (one core, or ``workers == 1``), and frames are then drawn in this process. The
    workers ignore SIGINT and never re-import the caller's ``__main__`` (:mod:`headlens.report.pool`).
    """
    n = _renderers(workers)
    return spawn_pool(n, warm_up) if n > 1 else None


def _renderers(workers: int | None) -> int:
    return min(usable_cores(), 4 if workers is None else workers)


class RendererPool(WorkerPool):
    """Renderer processes started on demand (``start()``, e.g. passed as ``on_checked`` to
    :func:`headlens.residual.sphere.sphere_from_model`, once the cheap checks have passed, so their imports
    overlap loading and running the model) and shut down when the ``with`` block ends; ``executor`` is then the
    pool, or None when there is one process only (see :func:`start_pool`)."""

    def __init__(self, workers: int | None = None):
        super().__init__(lambda: n if (n := _renderers(workers)) > 1 else 0, warm_up)
        self.workers = workers


def render_frames(jobs: list[dict], pool: ProcessPoolExecutor | None = None,
                  progress: Callable[[int], None] | None = None) -> list[bytes]:
    """Render every frame, in ``pool``'s worker processes when given, else in this process, in order."""
    if pool is None:
        out = []
        for job in jobs:
            out.append(render_frame(job))
            if progress:
                progress(1)
        return out
    results: list[bytes | None] = [None] * len(jobs)
    futures = {pool.submit(render_frame, job): i for i, job in enumerate(jobs)}
    for fut in as_completed(futures):
        results[futures[fut]] = fut.result()
        if progress:
            progress(1)
    return [r for r in results if r is not None]


def _durations(pngs: Sequence[bytes], frame_seconds: float) -> list[int]:
    """Each frame's duration in ms, capped so that a GIF can hold it: 1/100 s in 16 bits, and Pillow merges a run
    of identical frames into one whose duration is their sum."""
    want = min(max(int(round(frame_seconds * 1000)), 10), GIF_MAX_MS)
    out, i = [], 0
    while i < len(pngs):
        run = 1
        while i + run < len(pngs) and pngs[i + run] == pngs[i]:
            run += 1
        out += [min(want, GIF_MAX_MS // run)] * run
        i += run
    return out


def write_gif(path: Path, pngs: Sequence[bytes], frame_seconds: float) -> Path:
    """Assemble PNG frames into an endlessly looping GIF (atomically)."""
    from PIL import Image

    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=_durations(pngs, frame_seconds), loop=0, optimize=False)
    return path


def write_metrics_png(path: Path, metrics: list[dict], threshold: float, title: str) -> Path:
    """Mean pairwise cosine (with quantile band), clusters, effective rank and explained variance vs depth."""
    plt = _pyplot()
    layers = [m["layer"] for m in metrics]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    ax = axes[0, 0]
    ax.plot(layers, [m["mean_cos"] for m in metrics], marker="o", label="mean pairwise cosine")
    ax.fill_between(layers, [m["cos_quantiles"]["q05"] for m in metrics], [m["cos_quantiles"]["q95"] for m in metrics],
                    alpha=0.2, label="5-95% of pairs")
    ax.fill_between(layers, [m["cos_quantiles"]["q25"] for m in metrics], [m["cos_quantiles"]["q75"] for m in metrics],
                    alpha=0.3, label="25-75% of pairs")
    ax.plot(layers, [m["baseline_mean_cos"] for m in metrics], ls="--", color="0.4", label="random directions")
    ax.set_ylabel("cosine")
    ax.set_ylim(-1.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("pairwise cosine of the normalised tokens")
    ax = axes[0, 1]
    ax.plot(layers, [m["n_clusters"] for m in metrics], marker="o", label="clusters")
    ax.plot(layers, [m["largest_cluster"] for m in metrics], marker=".", ls=":", label="largest cluster size")
    ax.set_ylabel("count")
    ax.set_title(f"clusters at cosine >= {threshold:g} (single linkage)")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(layers, [m["effective_rank"] for m in metrics], marker="o", label="tokens")
    ax.plot(layers, [m["baseline_effective_rank"] for m in metrics], ls="--", color="0.4", label="random directions")
    ax.set_ylabel("effective rank")
    ax.set_xlabel("layer")
    ax.legend(fontsize=8)
    ax.set_title("effective rank (Roy & Vetterli)")
    ax = axes[1, 1]
    ax.plot(layers, [m["explained_variance_3"] for m in metrics], marker="o")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction of variance")
    ax.set_xlabel("layer")
    ax.set_title("variance kept by the 3-D projection")
    for a in axes.flat:
        a.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
