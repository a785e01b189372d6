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
    with osm.output_set("sphere", [tmp_path]):
        write_json(tmp_path / "sphere.json", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [osm.MANIFEST, "sphere.json"]
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
