"""Atomic file writes: nothing half-written survives an error or an interrupt."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from headlens.errors import HeadlensError


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) or raise a one-line HeadlensError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HeadlensError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise HeadlensError(f"output directory {path} is not writable")


def check_writable_dir(path: Path) -> None:
    """Fail early, creating nothing, if ``path`` could not be created or written as a directory."""
    probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise HeadlensError(f"cannot create output directory {path}: {probe} is a file")
    if probe.exists() and not os.access(probe, os.W_OK):
        raise HeadlensError(f"output directory {path} is not writable ({probe})")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    ensure_dir(final.parent if str(final.parent) else Path("."))
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode a plain open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; returns the final path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)
            fh.write("\n")
    return Path(path)


def read_text_lines(path: str | os.PathLike, flag: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file given with ``flag`` (one text per line); one-line errors."""
    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise HeadlensError(f"{flag} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise HeadlensError(f"{flag} {path} is not UTF-8 text") from None
    if not lines:
        raise HeadlensError(f"{flag} {path} is empty")
    return lines


def read_json_and_tensors(path: str | os.PathLike, what: str) -> tuple[dict, dict]:
    """``<base>.json`` and ``<base>.safetensors`` of a pair written together; ``path`` may carry either suffix."""
    from safetensors.torch import load_file

    base = str(path)
    for suffix in (".safetensors", ".json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    try:
        meta = json.loads(Path(base + ".json").read_text())
        tensors = load_file(base + ".safetensors")
    except (OSError, ValueError) as exc:
        raise HeadlensError(f"cannot read {what} {base}: {exc}") from None
    return meta, tensors
