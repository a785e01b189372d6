"""Atomic file writes: nothing half-written survives an error or an interrupt.

Every file headlens writes goes through :func:`atomic_path` (a directory written whole through :func:`atomic_dir`);
inside a command it is staged and committed with the command's whole set (:mod:`headlens.io.output_set`). Every
output gets the mode a plain open() or mkdir() gives: the user's umask decides.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from headlens.errors import HeadlensError


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) or raise a one-line HeadlensError. In a command's output set the
    directory is locked and, if the command fails, removed again when it stayed empty."""
    from headlens.io import output_set

    out = output_set.active()
    if out is not None and out.covers(Path(path) / "_"):
        out.prepare(Path(path))
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


def is_dir_target(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a directory: it ends with a separator, has no file name, or is an existing one."""
    text = os.fspath(path)
    return (text.endswith(os.sep) or bool(os.altsep and text.endswith(os.altsep)) or Path(text).name in ("", ".", "..")
            or Path(text).is_dir())


def file_in_dir(path: str | os.PathLike, default_name: str) -> Path:
    """``path`` as a file path: a directory (see :func:`is_dir_target`) becomes ``path/default_name``."""
    return Path(path) / default_name if is_dir_target(path) else Path(path)


def check_file_target(path: str | os.PathLike, flag: str) -> None:
    """Fail early, creating nothing, unless ``path`` (given with ``flag``) names a file that can be written."""
    if is_dir_target(path):
        raise HeadlensError(f"{flag} {os.fspath(path)} is a directory: give a file name")
    parent = Path(path).parent
    try:
        check_writable_dir(parent if str(parent) else Path("."))
    except HeadlensError as exc:
        raise HeadlensError(f"{flag} {os.fspath(path)}: {exc}") from None


@contextmanager
def atomic_path(path: str | os.PathLike, immediate: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it becomes ``path`` only if the block succeeds.

    Inside a command's output set (:mod:`headlens.io.output_set`) the file is staged and renamed when the
    command ends, together with the rest of its set; ``immediate=True`` renames it at once (files a later run
    must find even if this one is interrupted, such as the sweep's resume parts). Outside one, at once.
    """
    from headlens.io import output_set

    if is_dir_target(path):
        raise HeadlensError(f"cannot write {os.fspath(path)}: it is a directory")
    final = Path(path)
    parent = final.parent if str(final.parent) else Path(".")
    out = output_set.active()
    if out is not None and out.covers(final):
        out.prepare(parent)
    else:
        out = None
        ensure_dir(parent)
    prefix = out.temp_prefix() if out is not None else f".{final.name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 and some writers (safetensors) make their file 0600 again: give the file the mode a
        # plain open() would, once it is written
        os.chmod(tmp_path, 0o666 & ~current_umask())
        if out is None or immediate:
            os.replace(tmp_path, final)
        else:
            staged = out.stage_name(final)
            os.replace(tmp_path, staged)
            out.register(final, staged)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, command: str = "headlens") -> Iterator[Path]:
    """Yield an empty staging directory whose files become those of the directory ``path`` when the block
    succeeds: staged and committed with the rest of the command's output set, or with a set of their own (named
    ``command`` in the manifest) outside a command. ``path`` is locked from the start; the staging directory lies
    inside it under the set's name, so a failure, an interrupt, or a later run that takes over the lock of a
    killed one removes it. The files get the user's umask."""
    from headlens.io import output_set

    final = Path(path)
    with output_set.output_set(command, [final]) as s:
        s.prepare(final)
        tmp = Path(tempfile.mkdtemp(prefix=s.temp_prefix(), dir=final))
        try:
            yield tmp
            s.stage_tree(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def check_new_dir(path: str | os.PathLike, param: str) -> None:
    """Fail, creating nothing, unless ``path`` (the parameter ``param``) is absent or an empty directory (headlens's
    own lock and staged files aside: another run's lock is reported when it is taken) in a writable place."""
    from headlens.io.output_set import own_entry

    p = Path(path)
    if p.exists() and (not p.is_dir() or any(not own_entry(c.name) for c in p.iterdir())):
        raise HeadlensError(f"`{param}` {os.fspath(path)} already exists and is not an empty directory: choose a new "
                            "one")
    try:
        check_writable_dir(p)
    except HeadlensError as exc:
        raise HeadlensError(f"`{param}` {os.fspath(path)}: {exc}") from None


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def readable(path: str | os.PathLike) -> Path:
    """Where to read ``path`` that this command may have written: its staged file until the command ends."""
    from headlens.io import output_set

    out = output_set.active()
    return out.readable(Path(path)) if out is not None else Path(path)


def write_json(path: str | os.PathLike, obj: Any, immediate: bool = False) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_path`); returns the final path."""
    with atomic_path(path, immediate=immediate) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)
            fh.write("\n")
    return Path(path)


def read_text(path: str | os.PathLike, name: str = "path") -> str:
    """The whole of a UTF-8 text file (a byte-order mark dropped), exactly as stored: line ends are not translated.
    ``name`` is the parameter that gave ``path``, named in the one-line errors (missing, unreadable, not UTF-8
    text, or binary: a NUL byte)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except IsADirectoryError:
        raise HeadlensError(f"`{name}` {path} is a directory: give a text file") from None
    except OSError as exc:
        raise HeadlensError(f"`{name}` {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise HeadlensError(f"`{name}` {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if "\x00" in text:
        raise HeadlensError(f"`{name}` {path} is not a text file: it holds NUL bytes")
    return text


def split_lines(text: str) -> list[str]:
    """The non-blank lines of ``text``, split at ``\\n`` and ``\\r\\n`` only. Unlike ``str.splitlines`` a form feed,
    ``\\x1c``-``\\x1e``, ``\\x85``, U+2028 or a lone ``\\r`` inside a line stays in its text."""
    lines = (ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n"))
    return [ln for ln in lines if ln.strip()]


def read_text_lines(path: str | os.PathLike, name: str = "path") -> list[str]:
    """The texts of a UTF-8 file holding one text per line (:func:`split_lines`: blank lines skipped); ``name`` is
    the parameter that gave ``path``, named in the one-line errors (see :func:`read_text`, and an empty file)."""
    lines = split_lines(read_text(path, name))
    if not lines:
        raise HeadlensError(f"`{name}` {path} is empty")
    return lines


def read_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a UTF-8 file holding one text per line, split at ``\\n`` and ``\\r\\n`` only, blank lines
    skipped (:func:`read_text_lines`): what every ``texts`` parameter of the library takes."""
    return read_text_lines(path, "path")


def read_json_and_tensors(path: str | os.PathLike, what: str) -> tuple[dict, dict]:
    """``<base>.json`` and ``<base>.safetensors`` of a pair written together; ``path`` may carry either suffix."""
    from safetensors.torch import load_file

    base = str(path)
    for suffix in (".safetensors", ".json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    try:
        meta = json.loads(readable(base + ".json").read_text())
        tensors = load_file(str(readable(base + ".safetensors")))
    except (OSError, ValueError) as exc:
        raise HeadlensError(f"cannot read {what} {base}: {exc}") from None
    return meta, tensors
