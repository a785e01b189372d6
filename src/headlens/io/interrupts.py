"""SIGINT and SIGTERM stop a command the same way: its output set rolls back, one line, exit 128 + the signal number.

Under :func:`install` (the CLI's ``main``) Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated`, a
``KeyboardInterrupt`` too, so every cleanup written for one serves both; once the command's files are all in place
(:func:`files_complete`, said by the output set after its commit) a signal no longer stops anything: it is kept
(:func:`late`) for the CLI to report. :func:`held` holds both back while a step that must not be cut in half runs
(renaming an output set's files into place, rolling one back): the caller decides what a signal that came meanwhile
means (after a commit: :class:`AfterWriting`, every file is in place).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""

    signum = signal.SIGTERM


class AfterWriting(KeyboardInterrupt):
    """A signal that came while the command's files were being put in place: they all are, nothing was cut."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def signal_of(exc: BaseException) -> int:
    """The signal behind an interrupt: SIGTERM for :class:`Terminated`, the held one for :class:`AfterWriting`,
    else SIGINT (Ctrl-C)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


_STATE: dict = {"complete": False, "late": []}


def _command_handler(signum, frame) -> None:
    if _STATE["complete"]:  # nothing left to stop: the files are in place
        _STATE["late"].append(signum)
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def install() -> Callable[[], None]:
    """Make SIGINT raise KeyboardInterrupt and SIGTERM :class:`Terminated` until :func:`files_complete`, then keep
    them for :func:`late` (main thread only; elsewhere nothing changes). Returns a function that puts the previous
    handlers back."""
    if not _main_thread():
        return lambda: None
    _STATE.update(complete=False, late=[])
    previous = {s: signal.signal(s, _command_handler) for s in SIGNALS}

    def restore() -> None:
        _restore(previous)
        _STATE.update(complete=False, late=[])

    return restore


def files_complete() -> None:
    """Say that every file of the running command is in place: under :func:`install`, a signal from now on is kept
    for :func:`late` instead of stopping the command."""
    _STATE["complete"] = True


def late() -> list[int]:
    """The signals that came after :func:`files_complete`, in order."""
    return list(_STATE["late"])


@contextmanager
def held() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM back while the block runs (main thread only); yields the list of the signals that came,
    for the caller to act on. The previous handlers are back when the block ends."""
    caught: list[int] = []
    if not _main_thread():
        yield caught
        return
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in SIGNALS}
    try:
        yield caught
    finally:
        _restore(previous)


def ignore_from_now() -> None:
    """Ignore SIGINT and SIGTERM for the rest of the process, whose outcome is decided (headlens is exiting). An
    ignored signal stays ignored while the interpreter shuts down, where a Python handler is reset to the default
    and the signal would end the process with no word (and the exit code of a signal)."""
    if _main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
