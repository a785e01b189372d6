"""Where independent pieces of work run: here, one after the other (``serial``), or on Ray (``ray``).

A :class:`Task` is a picklable call ``fn(*args)`` with a label naming what it computes (``checkpoint-500, layers
0-7``). :meth:`Executor.results` runs a list of tasks and yields ``(task, value)`` as each finishes; the caller
(the driver) keeps and writes the values, so the files a run writes are the same whichever executor computed
them. A task that raises ends the run with one :class:`TaskFailed` line naming its label; the tasks not started
yet are cancelled, and what the driver kept of the finished ones stays kept (a rerun with ``resume`` recomputes
only what is missing).

- :class:`SerialExecutor`: in this process, in order; it never imports Ray.
- :class:`RayExecutor`: one Ray task per :class:`Task` (``num_cpus=cpus_per_task``, torch limited to that many
  threads). ``address`` joins a running cluster (``ray start --head`` on one machine, ``ray start --address`` on
  the others; every node needs headlens and the checkpoints' paths); without it a local Ray is started for the
  run with ``workers`` CPUs and shut down after. Ray is an optional extra: ``pip install 'headlens[ray]'``.

The numbers are the same on both executors as long as the arithmetic is: the weight-only sweep's float64 Gram
products and eigensolves gave identical bits with 1 and 2 torch threads on every model measured; a forward pass
in float32 (calibration capture, attention probabilities) can differ in the last bits between thread counts, so
a task runs with ``cpus_per_task`` threads, and the serial executor with the process's own count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from headlens.errors import HeadlensError

EXECUTORS = ("serial", "ray")
RAY_EXTRA = "pip install 'headlens[ray]'"


class TaskFailed(HeadlensError):
    """A task raised: the message names its label and the cause's first line."""


@dataclass
class Task:
    """One call ``fn(*args)``; ``label`` names it in progress and errors; ``key`` is the caller's handle."""

    fn: Callable[..., Any]
    args: tuple
    label: str
    key: Any = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if isinstance(exc, HeadlensError) else f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def failed(task: Task, exc: BaseException) -> TaskFailed:
    """The one-line error of ``task`` ending in ``exc``."""
    return TaskFailed(f"{task.label}: {_first_line(exc)}")


@dataclass
class SerialExecutor:
    """Run the tasks here, in order."""

    name: str = "serial"

    def __enter__(self) -> "SerialExecutor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def results(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, Any]]:
        for task in tasks:
            try:
                value = task.fn(*task.args)
            except Exception as exc:  # noqa: BLE001 (named in one line; the cause stays chained)
                raise failed(task, exc) from exc
            yield task, value

    def describe(self) -> dict[str, Any]:
        return {"executor": "serial"}


def _call(fn: Callable[..., Any], args: tuple, threads: int) -> Any:
    """What a Ray worker runs: ``fn(*args)`` with torch on ``threads`` threads and no progress bars."""
    import torch

    os.environ["TQDM_DISABLE"] = "1"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*args)


@dataclass
class RayExecutor:
    """Run the tasks as Ray tasks (see the module docstring)."""

    address: str | None = None  # a running cluster ("auto", "ray://host:10001", "host:6379"); None: a local Ray
    workers: int | None = None  # CPUs of the local Ray (default: this machine's); ignored with ``address``
    cpus_per_task: int = 1
    name: str = "ray"
    started: bool = field(default=False, init=False)  # this executor started the Ray it uses (and stops it)
    start_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise HeadlensError(f"`workers` must be a positive integer, got {self.workers!r}")
        if not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1:
            raise HeadlensError(f"`cpus_per_task` must be a positive integer, got {self.cpus_per_task!r}")

    def __enter__(self) -> "RayExecutor":
        import logging
        import time

        ray = import_ray()
        if not ray.is_initialized():
            t0 = time.perf_counter()
            try:
                kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                          "log_to_driver": False, "configure_logging": True}
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:  # "local": a new Ray for this run, never the last one `ray start` left on this machine
                    ray.init(address="local", num_cpus=self.workers or os.cpu_count() or 1, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at `ray_address` {self.address}" if self.address else "a local Ray"
                raise HeadlensError(f"cannot start {where}: {_first_line(exc)}") from None
            self.started = True
            self.start_seconds = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import_ray().shutdown()
            self.started = False

    def cpus(self) -> int:
        """CPUs the cluster has for tasks (at least 1)."""
        return max(1, int(import_ray().cluster_resources().get("CPU", 1)))

    def results(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, Any]]:
        ray = import_ray()
        remote = ray.remote(_call).options(num_cpus=self.cpus_per_task, max_retries=0)
        refs = {remote.remote(t.fn, t.args, self.cpus_per_task): t for t in tasks}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                        raise failed(refs[ref], cause) from cause
                    except ray.exceptions.RayError as exc:  # a worker died, a node was lost, ...
                        raise failed(refs[ref], exc) from exc
                    yield refs[ref], value
        finally:
            for ref in pending:  # an error, an interrupt or a caller that stopped reading: the rest is not needed
                ray.cancel(ref)

    def started_line(self) -> str:
        """What this run did to get its Ray, for the terminal."""
        if not self.start_seconds:
            return f"ray: {self.cpus()} CPUs (already connected)"
        if self.address:
            return f"ray: joined the cluster at {self.address} ({self.cpus()} CPUs) in {self.start_seconds:.1f} s"
        return f"ray: started a local Ray with {self.cpus()} CPUs in {self.start_seconds:.1f} s"

    def describe(self) -> dict[str, Any]:
        return {"executor": "ray", "ray_address": self.address, "cpus": self.cpus(),
                "cpus_per_task": self.cpus_per_task, "ray_start_seconds": round(self.start_seconds, 3)}


def import_ray():
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise HeadlensError(f"`executor` ray needs Ray, an optional extra: {RAY_EXTRA}") from None
    return ray


def make_executor(executor: str = "serial", ray_address: str | None = None, workers: int | None = None
                  ) -> SerialExecutor | RayExecutor:
    """The executor ``executor`` names (``serial`` or ``ray``); ``ray_address`` and ``workers`` apply to Ray only.
    Use it as a context manager around the run (a local Ray starts on entry and stops on exit)."""
    if executor not in EXECUTORS:
        raise HeadlensError(f"`executor` {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if executor == "serial":
        if ray_address is not None:
            raise HeadlensError("`ray_address` applies to `executor` ray only")
        if workers is not None:
            raise HeadlensError("`workers` applies to `executor` ray only (the serial executor runs here, in order)")
        return SerialExecutor()
    import_ray()  # the extra's absence is one line before anything is computed
    return RayExecutor(address=ray_address, workers=workers)


def default_block(layers: int, cpus: int) -> int:
    """Layers per task when none is given: about two tasks per CPU, so a slow block does not leave CPUs idle."""
    import math

    return max(1, math.ceil(layers / max(1, 2 * cpus)))


def blocks(layers: Sequence[int], size: int) -> list[list[int]]:
    """``layers`` cut into consecutive blocks of at most ``size``."""
    size = max(1, int(size))
    return [list(layers[i:i + size]) for i in range(0, len(layers), size)]


def block_label(layers: Sequence[int]) -> str:
    """``layer 3`` or ``layers 0-7`` (``layers 1,4,9`` when not consecutive)."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ",".join(str(x) for x in layers)


def check_layers_per_task(layers_per_task: int | None, executor: str) -> None:
    """Refuse a ``layers_per_task`` that is not a positive integer, or one given to the serial executor."""
    if layers_per_task is None:
        return
    if isinstance(layers_per_task, bool) or not isinstance(layers_per_task, int) or layers_per_task < 1:
        raise HeadlensError(f"`layers_per_task` must be a positive integer, got {layers_per_task!r}")
    if executor != "ray":
        raise HeadlensError("`layers_per_task` applies to `executor` ray only (the serial executor sweeps one layer "
                            "after the other)")
