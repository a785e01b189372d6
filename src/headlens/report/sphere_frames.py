"""Pictures of the residual stream on the sphere: GIF frames (rendered in worker processes), metrics plot.

This module imports no torch: worker processes start fast and only need numpy and matplotlib.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import signal
import sys
import threading
import types
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from headlens.io.files import atomic_path
from headlens.report.figures import _pyplot, save_figure
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


def _worker_init() -> None:
    """Renderer processes ignore Ctrl-C: the parent reports it once and tears the pool down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def _starting_workers() -> Iterator[None]:
    """Start processes without re-running the caller's script and deaf to Ctrl-C from their first instruction.

    Spawn re-imports ``__main__`` in every child, which runs a script's top level again when it calls
    ``main(["sphere", ...])`` without an ``if __name__ == "__main__"`` guard; the workers need only this module,
    which they import by name, so a stand-in ``__main__`` is shown to them. SIGINT is ignored while they start
    (an ignored signal stays ignored in the child, and Python then installs no KeyboardInterrupt handler), so a
    Ctrl-C during their imports prints no traceback either."""
    main = sys.modules.get("__main__")
    stand_in = types.ModuleType("__main__")
    stand_in.__spec__ = None
    sys.modules["__main__"] = stand_in
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main
        if in_main_thread:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def start_pool(workers: int | None = None) -> ProcessPoolExecutor | None:
    """A pool of renderer processes, started early so their imports overlap loading and running the model.

    ``workers=None`` uses up to 4 cores, and more than the usable cores are never started; None is returned when
    one process is all there is (one core, or ``workers == 1``), and frames are then drawn in this process. The
    workers ignore SIGINT and never re-import the caller's ``__main__``.
    """
    workers = min(usable_cores(), 4 if workers is None else workers)
    if workers <= 1:
        return None
    ctx = mp.get_context("spawn")  # no fork of a process that holds torch's thread pools
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    with _starting_workers():
        for _ in range(workers):  # each submit to a pool without an idle worker starts one: all start here
            pool.submit(warm_up)
    return pool


def stop_pool(pool: ProcessPoolExecutor, now: bool = False) -> None:
    """Shut ``pool`` down; ``now`` (an error or Ctrl-C) cancels what is queued and ends the workers at once."""
    if not now:
        pool.shutdown(cancel_futures=True)
        return
    processes = list(getattr(pool, "_processes", {}).values())  # the executor has no public terminate
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=5)


class RendererPool:
    """Renderer processes started on demand and shut down when the ``with`` block ends (at once, workers ended,
    when it ends by an error or Ctrl-C).

    ``start()`` (e.g. passed as ``on_checked`` to :func:`headlens.residual.sphere.sphere_from_model`) starts
    them once the cheap checks have passed, so their imports overlap loading and running the model;
    ``executor`` is then the pool, or None when there is one process only (see :func:`start_pool`).
    """

    def __init__(self, workers: int | None = None):
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = None
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            try:
                self.executor = start_pool(self.workers)
            except (OSError, RuntimeError):  # no processes to be had: draw here
                self.executor = None

    def __enter__(self) -> "RendererPool":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.executor is not None:
            stop_pool(self.executor, now=exc_type is not None)
            self.executor = None


class Deferred:
    """A call run in the pool when there is one, or here (also when the pool broke: a worker crashed or could not
    start)."""

    def __init__(self, pool: ProcessPoolExecutor | None, fn: Callable, *args):
        self.fn, self.args, self.future = fn, args, None
        if pool is not None:
            try:
                self.future = pool.submit(fn, *args)
            except (BrokenProcessPool, RuntimeError):  # broken, or already shut down
                self.future = None

    def result(self):
        if self.future is not None:
            try:
                return self.future.result()
            except BrokenProcessPool:
                pass
        return self.fn(*self.args)


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
