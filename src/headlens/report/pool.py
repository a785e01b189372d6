"""Drawing in worker processes: started early, so their imports overlap the computation, and torn down at once on
an error or Ctrl-C.

Used by ``sphere`` (GIF frames, one per layer) and ``sweep`` (its heatmaps, drawn while this process writes the
tables and the budget chart). The workers are spawned, never forked (a fork of a process that holds torch's
thread pools can deadlock), import only what their warm-up function imports (no torch for the figure modules),
ignore SIGINT and never re-import the caller's ``__main__``. A pool that cannot start or breaks falls back to
drawing in this process: :class:`Deferred` runs the call here then.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import types
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Callable, Iterator


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _worker_init() -> None:
    """Workers ignore Ctrl-C: the parent reports it once and tears the pool down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _starting_workers() -> Iterator[None]:
    """Start processes without re-running the caller's script and deaf to Ctrl-C from their first instruction.

    Spawn re-imports ``__main__`` in every child, which runs a script's top level again when it calls
    ``main(["sphere", ...])`` without an ``if __name__ == "__main__"`` guard; the workers need only the modules
    they import by name, so a stand-in ``__main__`` is shown to them. SIGINT is ignored while they start (an
    ignored signal stays ignored in the child, and Python then installs no KeyboardInterrupt handler), so a Ctrl-C
    during their imports prints no traceback either."""
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


def spawn_pool(processes: int, warm_up: Callable[[], None] | None = None) -> ProcessPoolExecutor | None:
    """A pool of ``processes`` spawned workers, all started now, each running ``warm_up`` (a module-level function:
    its imports) at once; None for ``processes <= 0``."""
    if processes <= 0:
        return None
    ctx = mp.get_context("spawn")  # no fork of a process that holds torch's thread pools
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=ctx, initializer=_worker_init)
    with _starting_workers():
        for _ in range(processes):  # each submit to a pool without an idle worker starts one: all start here
            pool.submit(warm_up if warm_up is not None else _nothing)
    return pool


def _nothing() -> None:
    return None


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


class WorkerPool:
    """Worker processes started on demand and shut down when the ``with`` block ends (at once, workers ended, when
    it ends by an error or Ctrl-C).

    ``start()`` starts ``processes`` workers (a callable: how many, asked at start time; 0 draws here) running
    ``warm_up``; ``executor`` is then the pool, or None when there is none (one core, or no processes to be had).
    """

    def __init__(self, processes: Callable[[], int], warm_up: Callable[[], None] | None = None):
        self._processes = processes
        self._warm_up = warm_up
        self.executor: ProcessPoolExecutor | None = None
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            try:
                self.executor = spawn_pool(self._processes(), self._warm_up)
            except (OSError, RuntimeError):  # no processes to be had: draw here
                self.executor = None

    def __enter__(self) -> "WorkerPool":
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
