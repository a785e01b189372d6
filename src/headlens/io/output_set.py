"""Output sets: a command's files appear together or not at all, and one command writes a directory at a time.

``cli.main`` opens :func:`output_set` around each command with the directories it writes (``--out-dir``, the
directories of ``--json``/``--plot-path``, toy's ``--out``). While it is open:

- :func:`headlens.io.files.atomic_path` *stages* every file written into those directories: the bytes go to
  ``.headlens-<id>.<name>`` next to the target, and the renames onto the final names happen at the end of the
  command (:meth:`OutputSet.commit`). On an error or an interrupt the staged files are removed
  (:meth:`OutputSet.rollback`): the previous set stays whole and no temporary file is left behind.
- Every output directory is locked when the command starts, before it computes anything: ``.headlens.lock``
  (pid, host, command, start time, the set's id). A second command writing there meanwhile refuses with one line
  naming the holder. A lock left by a process that is gone (same host, dead pid) is taken over, and every staged
  file and staging directory of that process's set (named by its id) is removed with it.
- On commit, ``.headlens-manifest.json`` in each directory records the set (keyed by the command and the
  common stem of the file names, e.g. ``ov:all-MiniLM-L6-v2_layer3_head5``, ``sweep:sweep``, ``sphere:``),
  and the files of that command's previous set with the same key (or one extending it at a ``_``/``.``/``-``)
  that this run did not write are removed, so the directory holds one run's set per command and stem (the
  heads of ``ov`` keep their own files side by side).
- Worker processes (``sphere`` draws in a spawned pool) inherit the staging decision through the environment
  (:data:`ENV`): they stage under the same id, and the commit collects their files by name.

Files the command must keep at once (the sweep's resume parts) are written with ``atomic_path(...,
immediate=True)``: renamed at once, under the directory's lock. A directory written whole (``compress
--save-model``) goes through :func:`headlens.io.files.atomic_dir`: written into a staging directory of the set
inside it, its files staged (:meth:`OutputSet.stage_tree`) and committed with the rest.

The renames of a commit, and a rollback, run with SIGINT and SIGTERM held back (:mod:`headlens.io.interrupts`): a
signal during a commit lets it finish and comes out as :class:`~headlens.io.interrupts.AfterWriting`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from headlens.errors import HeadlensError
from headlens.io import interrupts

LOCK = ".headlens.lock"
MANIFEST = ".headlens-manifest.json"
PREFIX = ".headlens-"  # staged files: PREFIX + id + "." + name; files being written: PREFIX + id + "~..."
ENV = "HEADLENS_OUTPUT_SET"  # {"id", "pid", "scope"} for worker processes

_ACTIVE: "OutputSet | None" = None


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path))


class OutputSet:
    """The files one command writes into its output directories; see the module docstring."""

    def __init__(self, command: str, dirs: Iterable[str | os.PathLike], argv: str = "", owner: bool = True):
        self.id = secrets.token_hex(6)
        self.command = command  # the manifest key's first part, e.g. "sweep", "toy trace"
        self.argv = argv  # shown in the lock file
        self.scope = sorted({_resolved(Path(d)) for d in dirs})
        self.owner = owner  # False in a worker process: stages, never locks or commits
        self.staged: dict[Path, Path] = {}  # final -> staged, written by this process
        self.locks: dict[Path, Path] = {}  # directory -> its lock file
        self.created: list[Path] = []  # directories this set created (removed again if left empty)
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # ---------------------------------------------------------------------------------------- writing

    def covers(self, final: Path) -> bool:
        """Whether ``final`` lies in (or under) one of the command's output directories, and not in a staging
        directory (whose files the set stages as a whole, :meth:`stage_tree`)."""
        parent = _resolved(final).parent
        return (any(parent == d or d in parent.parents for d in self.scope)
                and not any(part.startswith(PREFIX) for part in parent.parts))

    def lock(self) -> None:
        """Create and lock every output directory, now (see the module docstring)."""
        for d in self.scope:
            self.prepare(d)

    def include(self, dirs: Iterable[str | os.PathLike]) -> None:
        """Add ``dirs`` to the set's output directories and lock those not covered yet (a nested output set)."""
        for d in (_resolved(Path(x)) for x in dirs):
            if not self.covers(d / "_"):
                self.scope = sorted({*self.scope, d})
            self.prepare(d)
        if self.owner and _ACTIVE is self:
            os.environ[ENV] = self.env()

    def prepare(self, directory: Path) -> None:
        """Create ``directory`` (remembering what was created) and, in the owning process, take its lock."""
        directory = _resolved(directory)
        missing = [p for p in (directory, *directory.parents) if not p.exists()]
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HeadlensError(f"cannot create output directory {directory}: {exc.strerror or exc}") from None
        self.created += [p for p in reversed(missing) if p not in self.created]
        # the lock sits in the output directory itself, also for its subdirectories (sweep_layers/)
        top = max((d for d in self.scope if d == directory or d in directory.parents), key=lambda d: len(d.parts),
                  default=directory)
        if self.owner and top not in self.locks:
            self.locks[top] = acquire_lock(top, self._lock_info())

    def stage_name(self, final: Path) -> Path:
        return final.parent / f"{PREFIX}{self.id}.{final.name}"

    def temp_prefix(self) -> str:
        return f"{PREFIX}{self.id}~"

    def register(self, final: Path, staged: Path) -> None:
        self.staged[_resolved(final)] = staged

    def stage_tree(self, tree: Path, final: Path) -> list[Path]:
        """Stage every file under the directory ``tree`` as the same path under ``final`` (an output directory of
        the set), with the mode a plain open() gives (the user's umask); returns the final paths. ``tree`` is left
        without files."""
        from headlens.io.files import current_umask

        mode = 0o666 & ~current_umask()
        done = []
        for root, _, names in os.walk(tree):
            target_dir = final / Path(root).relative_to(tree)
            self.prepare(target_dir)
            for name in sorted(names):
                src, target = Path(root) / name, target_dir / name
                os.chmod(src, mode)  # safetensors writes 0600, mkdtemp's directory 0700: outputs follow the umask
                staged = self.stage_name(target)
                os.replace(src, staged)
                self.register(target, staged)
                done.append(target)
        return done

    def readable(self, final: Path) -> Path:
        """Where the current bytes of ``final`` are: its staged file when this set (or one of its worker processes,
        which stage under the same id) wrote it, else ``final``."""
        staged = self.staged.get(_resolved(final))
        if staged is None:
            staged = self.stage_name(Path(final))  # a worker's: not registered here, found by name
        return staged if staged.exists() else Path(final)

    # ------------------------------------------------------------------------------- commit, rollback

    def _dirs(self) -> list[Path]:
        dirs = {p.parent for p in self.staged} | set(self.locks) | {d for d in self.scope if d.is_dir()}
        return sorted(_resolved(d) for d in dirs)

    def _collect(self) -> dict[Path, list[tuple[Path, Path]]]:
        """{directory: [(staged, final)]}: this process's files and those its workers staged."""
        found: dict[Path, list[tuple[Path, Path]]] = {}
        head = f"{PREFIX}{self.id}."
        for d in self._dirs():
            for staged in sorted(d.glob(f"{PREFIX}{self.id}.*")):
                found.setdefault(d, []).append((staged, d / staged.name[len(head):]))
        return found

    def commit(self) -> list[Path]:
        """Rename every staged file onto its final name, update the manifests; returns the final paths."""
        found = self._collect()
        for d in found:
            self.prepare(d)  # a directory only workers wrote into (under a locked one) is created now
        done: list[Path] = []
        for d, pairs in found.items():
            for staged, final in pairs:
                os.replace(staged, final)
                done.append(final)
            update_manifest(d, self.command, [final.name for _, final in pairs], self.argv)
        self._remove_temps()
        return done

    def rollback(self) -> None:
        """Remove every staged and half-written file (and staging directory) of this set; the previous files stay
        as they were."""
        for d in self._dirs():
            for p in d.glob(f"{PREFIX}{self.id}*"):
                _remove(p)

    def _remove_temps(self) -> None:
        for d in self._dirs():
            for p in d.glob(f"{PREFIX}{self.id}~*"):
                _remove(p)

    def close(self) -> None:
        """Release the locks and remove the directories this set created that stayed empty."""
        for directory, lock in self.locks.items():
            release_lock(lock, self.id)
        self.locks.clear()
        for d in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass

    def _lock_info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.argv or self.command,
                "started": self.started, "id": self.id}

    def env(self) -> str:
        return json.dumps({"id": self.id, "pid": os.getpid(), "command": self.command,
                           "scope": [str(d) for d in self.scope]})


def _remove(p: Path) -> None:
    """Remove a staged file or a staging directory."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def own_entry(name: str) -> bool:
    """Whether a directory entry is headlens's own bookkeeping (lock, manifest, staged files and directories)
    rather than an output."""
    return name in (LOCK, MANIFEST) or name.startswith(PREFIX)


def active() -> OutputSet | None:
    """The output set of the running command: this process's, or the one a worker inherited; None outside one."""
    if _ACTIVE is not None:
        return _ACTIVE
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        info = json.loads(raw)
        if int(info["pid"]) == os.getpid():
            return None  # a stale variable in the process that owned it
        worker = OutputSet(info["command"], info["scope"], owner=False)
        worker.id = str(info["id"])
    except (ValueError, KeyError, TypeError):
        return None
    return worker


@contextmanager
def output_set(command: str, dirs: Iterable[str | os.PathLike], argv: str = "") -> Iterator[OutputSet]:
    """Lock ``dirs`` now, stage every file the block writes into them; commit the files together when the block
    succeeds, remove them when it fails or is interrupted (see the module docstring). Raises
    :class:`~headlens.io.interrupts.AfterWriting` when a signal came during the commit, which it let finish.
    Nested in another (a command calling another), the outer set takes ``dirs`` in."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.include(dirs)
        yield _ACTIVE
        return
    s = OutputSet(command, dirs, argv)
    previous_env = os.environ.get(ENV)
    _ACTIVE = s
    os.environ[ENV] = s.env()

    def end() -> None:
        global _ACTIVE
        _ACTIVE = None
        if previous_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous_env
        s.close()

    ended = False
    try:
        s.lock()
        try:
            yield s
        except BaseException:
            with interrupts.held():
                s.rollback()
            raise
        with interrupts.held() as caught:
            try:
                s.commit()
            except BaseException:
                s.rollback()
                raise
            interrupts.files_complete()
            ended = True
            end()
        if caught:
            raise interrupts.AfterWriting(caught[0])
    finally:
        if not ended:
            with interrupts.held():
                end()


# ---------------------------------------------------------------------------------------------- locks


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _is_stale(info: dict) -> bool:
    """A lock of a process on this host that no longer runs."""
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return info.get("host") == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid)


def describe_holder(info: dict | None) -> str:
    if info is None:
        return "another run (its lock file is unreadable)"
    return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')}, started "
            f"{info.get('started')})")


def acquire_lock(directory: Path, info: dict) -> Path:
    """Create ``directory/.headlens.lock`` holding ``info``; take over a stale one; otherwise raise a one-line
    HeadlensError naming the holder."""
    path = directory / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:  # being written this instant, or damaged: look once more
                time.sleep(0.05)
                holder = _read_lock(path)
            if holder is not None and _is_stale(holder):
                dead = str(holder.get("id", ""))
                if re.fullmatch(r"[0-9a-f]+", dead):  # the dead set's staged files and staging directories
                    for p in sorted(directory.rglob(f"{PREFIX}{dead}*"), key=lambda p: len(p.parts)):
                        _remove(p)
                path.unlink(missing_ok=True)
                continue
            raise HeadlensError(f"output directory {directory} is in use by {describe_holder(holder)}: wait for it "
                                f"or choose another output directory (if that run is gone, remove {path})") from None
        except OSError as exc:
            raise HeadlensError(f"cannot lock output directory {directory}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        return path
    raise HeadlensError(f"cannot lock output directory {directory}: its lock file keeps changing")


def release_lock(path: Path, owner_id: str) -> None:
    """Remove the lock file if it is still ours."""
    info = _read_lock(path)
    if info is not None and info.get("id") == owner_id:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- manifest


def set_key(names: list[str]) -> str:
    """The part of a set's file names that identifies it: the common prefix, cut back to a boundary (``.``,
    ``_``, ``-`` or a name's end) in every name; a single file's name without its suffix."""
    if len(names) == 1:
        return Path(names[0]).stem
    p = os.path.commonprefix(names)
    while p and not all(len(n) == len(p) or n[len(p)] in "._-" for n in names):
        p = p[:-1]
    return p


def _related(a: str, b: str) -> bool:
    """Whether two set keys name the same set: equal, or one extends the other at a boundary (``ov:m_l3_h5`` and
    ``ov:m_l3_h5_heatmap``, ``sphere:`` and ``sphere:tokens``; not ``ov:m_l3_h1`` and ``ov:m_l3_h10``)."""
    (ca, _, ka), (cb, _, kb) = a.partition(":"), b.partition(":")
    if ca != cb:
        return False
    short, long_ = sorted((ka, kb), key=len)
    return long_.startswith(short) and (short == long_ or short == "" or long_[len(short)] in "._-")


def update_manifest(directory: Path, command: str, names: list[str], argv: str = "") -> None:
    """Record ``names`` as ``command``'s set in ``directory`` and remove the files of the previous set of the
    same command and key (:func:`set_key`, :func:`_related`) that are not among ``names``."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        sets = manifest["sets"] if isinstance(manifest.get("sets"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        sets = {}
    sets = {k: v for k, v in sets.items() if isinstance(v, dict) and isinstance(v.get("files"), list)}
    key = f"{command}:{set_key(sorted(names))}"
    for old in [k for k in sets if _related(k, key)]:
        for name in sets.pop(old)["files"]:
            if name not in names and "/" not in name and name not in (LOCK, MANIFEST):
                (directory / name).unlink(missing_ok=True)
    for other in sets.values():  # a file belongs to the set that wrote it last
        other["files"] = [n for n in other["files"] if n not in names]
    sets = {k: v for k, v in sets.items() if v["files"]}
    sets[key] = {"files": sorted(names), "command": argv or command,
                 "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = directory / f"{PREFIX}manifest~{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"format": "headlens-output-sets", "sets": sets}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
