"""io/files.py and io/output_set.py: atomic writes, output sets (stage, commit, rollback), locks, manifests."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from headlens.errors import HeadlensError
from headlens.io import output_set as osm
from headlens.io.files import atomic_path, check_file_target, file_in_dir, is_dir_target, readable, write_json


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (names relative to it) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_directory_targets(tmp_path):
    (tmp_path / "d").mkdir()
    assert is_dir_target(f"{tmp_path}/d") and is_dir_target(f"{tmp_path}/new/") and is_dir_target("/")
    assert not is_dir_target(tmp_path / "f.json")
    assert file_in_dir(f"{tmp_path}/new/", "traces") == tmp_path / "new" / "traces"
    assert file_in_dir(tmp_path / "d", "toy.safetensors") == tmp_path / "d" / "toy.safetensors"
    assert file_in_dir(tmp_path / "t", "traces") == tmp_path / "t"
    for target in ("/", f"{tmp_path}/d", f"{tmp_path}/d/"):
        with pytest.raises(HeadlensError, match="is a directory"):
            check_file_target(target, "--json")
        with pytest.raises(HeadlensError, match="it is a directory"):
            with atomic_path(target):
                pass  # pragma: no cover
    (tmp_path / "file").write_text("x")
    with pytest.raises(HeadlensError, match=r"--json .*file/x.json: cannot create output directory"):
        check_file_target(tmp_path / "file" / "x.json", "--json")
    assert _tree(tmp_path) == {"file": b"x"}  # nothing created, no temporary file anywhere


def test_atomic_path_outside_a_set_writes_at_once(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            assert tmp.parent == tmp_path  # the temporary file is made next to the target
            tmp.write_text("half")
            raise RuntimeError
    assert _tree(tmp_path) == {"a.json": b'{\n  "x": 1\n}\n'}


def test_set_commits_together_and_rolls_back_whole(tmp_path):
    out = tmp_path / "out"
    with osm.output_set("cmd", [out]):
        write_json(out / "a.json", 1)
        write_json(out / "b.json", 2)
        assert not (out / "a.json").exists()  # staged until the command ends ...
        assert json.loads(readable(out / "a.json").read_text()) == 1  # ... and readable by the command itself
        lock = json.loads((out / osm.LOCK).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    first = _tree(out)
    assert sorted(first) == [osm.MANIFEST, "a.json", "b.json"]
    with pytest.raises(RuntimeError):
        with osm.output_set("cmd", [out]):
            write_json(out / "a.json", 10)
            write_json(out / "b.json", 20)
            raise RuntimeError("a writer failed midway")
    assert _tree(out) == first  # the previous set, byte for byte; no staged or temporary file, no lock
    with pytest.raises(KeyboardInterrupt):
        with osm.output_set("cmd", [out]):
            write_json(out / "a.json", 10)
            with atomic_path(out / "b.json") as tmp:
                tmp.write_text("half written")
                raise KeyboardInterrupt
    assert _tree(out) == first


def test_failed_set_leaves_no_directory_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with osm.output_set("cmd", [tmp_path / "a" / "b"]):
            write_json(tmp_path / "a" / "b" / "x.json", 1)
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_manifest_keeps_one_set_per_command_and_stem(tmp_path):
    def run(command, names):
        with osm.output_set(command, [tmp_path]):
            for n in names:
                write_json(tmp_path / n, n)

    run("ov", ["m_layer1_head1.png", "m_layer1_head1.json"])
    run("ov", ["m_layer1_head10.png"])  # another head: another set
    run("sphere", ["tokens.gif", "sphere.json"])
    run("ov", ["m_layer1_head1.json"])  # the same head without the plot: the old plot goes
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "m_layer1_head1.json", "m_layer1_head10.png", "sphere.json", "tokens.gif"]
    run("sphere", ["tokens.gif"])
    assert not (tmp_path / "sphere.json").exists() and (tmp_path / "m_layer1_head10.png").exists()
    sets = json.loads((tmp_path / osm.MANIFEST).read_text())["sets"]
    assert sets["ov:m_layer1_head1"]["files"] == ["m_layer1_head1.json"] and sets["sphere:tokens"]["files"] == [
        "tokens.gif"] and "sphere:" not in sets
    run("ov", ["m_layer1_head1_heatmap.png"])  # a heatmap of the same head replaces that head's set
    assert not (tmp_path / "m_layer1_head1.json").exists() and (tmp_path / "m_layer1_head10.png").exists()
    assert osm.set_key(["sweep_heads.csv", "sweep.html", "sweep_budget.png"]) == "sweep"
    assert osm.set_key(["tokens.gif", "sphere.json"]) == ""
    assert osm.set_key(["toy.pt", "toy.pt.toy.json"]) == "toy.pt"


def test_immediate_files_are_renamed_at_once_and_kept(tmp_path):
    with pytest.raises(RuntimeError):
        with osm.output_set("sweep", [tmp_path]):
            write_json(tmp_path / "parts" / "layer_0000.json", 0, immediate=True)
            assert (tmp_path / "parts" / "layer_0000.json").exists()
            write_json(tmp_path / "table.json", 1)
            raise RuntimeError
    assert _tree(tmp_path) == {"parts/layer_0000.json": b"0\n"}


HOLD = """
import sys, time
from headlens.io import output_set as osm
from headlens.io.files import write_json
with osm.output_set("sweep", [sys.argv[1]], argv="headlens sweep --out-dir x"):
    write_json(sys.argv[1] + "/a.json", 1)
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_second_writer_refuses_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(HeadlensError) as exc:
            with osm.output_set("sweep", [tmp_path]):
                write_json(tmp_path / "a.json", 2)
        msg = str(exc.value)
        assert f"is in use by pid {holder.pid} on {socket.gethostname()} (headlens sweep --out-dir x" in msg
        assert "\n" not in msg
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert json.loads((tmp_path / "a.json").read_text()) == 1 and not (tmp_path / osm.LOCK).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / osm.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "id": "abc",
                                                 "command": "headlens sphere", "started": "then"}))
    (tmp_path / ".headlens-abc.tokens.gif").write_text("staged by the dead run")
    (tmp_path / ".headlens-abc~x1" / "sub").mkdir(parents=True)  # its staging directory (atomic_dir) ...
    (tmp_path / ".headlens-abc~x1" / "sub" / "model.safetensors").write_text("half a model")
    (tmp_path / "parts").mkdir()  # ... and a file it was writing in a subdirectory
    (tmp_path / "parts" / ".headlens-abc~y.tmp").write_text("half a part")
    (tmp_path / ".headlens-abd.other").write_text("not the dead run's: its id differs")
    with osm.output_set("sphere", [tmp_path]):
        write_json(tmp_path / "sphere.json", 1)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        ".headlens-abd.other", osm.MANIFEST, "parts", "sphere.json"]
    (tmp_path / ".headlens-abd.other").unlink()
    (tmp_path / "parts").rmdir()
    (tmp_path / osm.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "id": "x"}))
    with pytest.raises(HeadlensError, match="in use by pid 1 on elsewhere"):
        with osm.output_set("sphere", [tmp_path]):
            write_json(tmp_path / "sphere.json", 2)
    assert json.loads((tmp_path / "sphere.json").read_text()) == 1


def _worker_write(path: str) -> None:
    write_json(path, "from a worker")


def test_worker_processes_stage_into_the_set(tmp_path):
    ctx = mp.get_context("spawn")  # as sphere's renderer pool
    with pytest.raises(RuntimeError):
        with osm.output_set("sphere", [tmp_path]):
            p = ctx.Process(target=_worker_write, args=(str(tmp_path / "m.png"),))
            p.start()
            p.join()
            assert p.exitcode == 0 and not (tmp_path / "m.png").exists()  # staged, not final
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []  # the worker's staged file went with the failed set
    with osm.output_set("sphere", [tmp_path]):
        p = ctx.Process(target=_worker_write, args=(str(tmp_path / "m.png"),))
        p.start()
        p.join()
    assert json.loads((tmp_path / "m.png").read_text()) == "from a worker"
    assert sorted(p.name for p in tmp_path.iterdir()) == [osm.MANIFEST, "m.png"]


def test_every_output_directory_is_locked_when_the_set_opens(tmp_path):
    out, other = tmp_path / "out", tmp_path / "new" / "other"
    with osm.output_set("compress", [out, other]) as s:
        # before anything is written: a second run refuses now, not when both write at the end
        for d in (out, other):
            assert json.loads((d / osm.LOCK).read_text())["id"] == s.id
        with pytest.raises(HeadlensError, match="is in use by pid"):
            osm.acquire_lock(out, {"pid": os.getpid() + 1, "host": socket.gethostname(), "id": "f00"})
    assert list(tmp_path.iterdir()) == []  # nothing written: the directories it created go again


def test_atomic_dir_joins_the_set_and_follows_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    from headlens.io.files import atomic_dir

    previous = os.umask(0o027)
    try:
        with osm.output_set("compress", [tmp_path / "out"]):
            write_json(tmp_path / "out" / "summary.json", 1)
            with atomic_dir(tmp_path / "model") as tmp:
                assert tmp.parent == tmp_path / "model"  # staged inside the locked directory
                save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
                write_json(tmp / "config.json", {"a": 1})  # written at once: the staging directory is staged whole
                (tmp / "sub").mkdir()
                (tmp / "sub" / "x.txt").write_text("x")
            assert not (tmp_path / "model" / "config.json").exists()  # staged until the command's set commits
            assert json.loads((tmp_path / "model" / osm.LOCK).read_text())["pid"] == os.getpid()
        modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
        files = ["model/config.json", "model/model.safetensors", "model/sub/x.txt", "out/summary.json"]
        files += [f"{d}/{osm.MANIFEST}" for d in ("model", "model/sub", "out")]
        assert modes == {**{f: 0o640 for f in files}, "model": 0o750, "model/sub": 0o750, "out": 0o750}
        with pytest.raises(RuntimeError):  # a failure leaves no staging directory and no directory it created
            with atomic_dir(tmp_path / "model2") as tmp:
                (tmp / "model.safetensors").write_text("half")
                raise RuntimeError
        assert not (tmp_path / "model2").exists()
    finally:
        os.umask(previous)


def test_a_signal_during_the_commit_lets_it_finish(tmp_path, monkeypatch):
    import signal

    from headlens.io import interrupts

    real = osm.update_manifest

    def signal_then_manifest(*a, **k):
        signal.raise_signal(signal.SIGINT)  # held back: the renames go on
        return real(*a, **k)

    monkeypatch.setattr(osm, "update_manifest", signal_then_manifest)
    with pytest.raises(interrupts.AfterWriting) as exc:
        with osm.output_set("cmd", [tmp_path / "a", tmp_path / "b"]):
            write_json(tmp_path / "a" / "x.json", 1)
            write_json(tmp_path / "b" / "y.json", 2)
    assert exc.value.signum == signal.SIGINT
    assert _tree(tmp_path) == {"a/x.json": b"1\n", "b/y.json": b"2\n", f"a/{osm.MANIFEST}": _tree(tmp_path)[
        f"a/{osm.MANIFEST}"], f"b/{osm.MANIFEST}": _tree(tmp_path)[f"b/{osm.MANIFEST}"]}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back
