"""Every command writes its files as one set: locked output directories, nothing mixed after a failure or an
interrupt, no temporary file left, and file flags that name a directory refused up front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.io import output_set as osm


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(root: Path) -> list[str]:
    """Staged, temporary or lock files under ``root``."""
    return [p.name for p in root.rglob("*") if p.name.startswith(".headlens-") and p.name != osm.MANIFEST
            or p.name == osm.LOCK or p.name.endswith(".tmp")]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


HOLD = """
import sys
from headlens.io import output_set as osm
from headlens.io.files import write_json
with osm.output_set("sweep", [sys.argv[1]], argv="headlens sweep --out-dir " + sys.argv[1]):
    write_json(sys.argv[1] + "/sweep_summary.json", {"from": "the first run"})
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_sweep_into_a_busy_directory_refuses_naming_the_first(ckpts, capsys, tmp_path):
    out = tmp_path / "sw"
    d = str(ckpts.path("qwen3", "gqa"))
    capsys.readouterr()
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert first.stdout.readline().strip() == "locked"
        code = main(["sweep", "--weights", d, "--out-dir", str(out)])
        err = _err_line(capsys)
        assert code == 2 and f"is in use by pid {first.pid} on " in err and "headlens sweep --out-dir" in err
    finally:
        first.stdin.write("\n")
        first.stdin.flush()
        first.wait(timeout=120)
    assert first.returncode == 0
    # the first run's set is whole: the second run wrote nothing, not even its resume parts
    assert sorted(_tree(out)) == [osm.MANIFEST, "sweep_summary.json"]
    assert json.loads((out / "sweep_summary.json").read_text()) == {"from": "the first run"}


@pytest.mark.parametrize("failure", [HeadlensError("disk full"), KeyboardInterrupt()])
def test_a_sweep_failing_midway_leaves_the_previous_set_byte_identical(ckpts, capsys, tmp_path, monkeypatch, failure):
    import headlens.report.sweep as report_sweep

    d = str(ckpts.path("qwen3", "gqa"))
    out = tmp_path / "sw"
    assert main(["sweep", "--weights", d, "--k", "4", "--out-dir", str(out)]) == 0
    before = {k: v for k, v in _tree(out).items() if not k.startswith("sweep_layers/")}
    assert "sweep_heads.csv" in before and "sweep.html" in before

    def fail(*a, **k):  # the summary comes after the tables and the figures
        raise failure

    monkeypatch.setattr(report_sweep, "write_json", fail)
    capsys.readouterr()
    code = main(["sweep", "--weights", d, "--k", "8", "--out-dir", str(out)])
    assert code == (2 if isinstance(failure, HeadlensError) else 130)
    after = {k: v for k, v in _tree(out).items() if not k.startswith("sweep_layers/")}
    assert after == before and _leftovers(out) == []
    # the resume parts of the failed run were kept at once, with their own fingerprint
    part = json.loads((out / "sweep_layers" / "layer_0000.json").read_text())
    assert part["fingerprint"]["config"]["ks"] == [8]


def test_router_set_is_whole_or_absent(ckpts, capsys, tmp_path, monkeypatch):
    import headlens.io.files as files

    d = str(ckpts.path("qwen3_moe", "gqa"))
    out = tmp_path / "r"
    assert main(["router", "--weights", d, "--prompt", "a", "--out-dir", str(out)]) == 0  # one token
    names = sorted(_tree(out))
    assert "router_dump.json" in names and "router_dump.safetensors" in names
    real = files.write_json

    def nan_json(path, obj, immediate=False):  # what the one-token NaN did to the strict JSON writer
        if Path(path).name == "router_dump.json":
            raise ValueError("Out of range float values are not JSON compliant")
        return real(path, obj, immediate)

    monkeypatch.setattr(files, "write_json", nan_json)
    fresh = tmp_path / "r2"
    with pytest.raises(ValueError):
        main(["router", "--weights", d, "--prompt", "a", "--out-dir", str(fresh)])
    assert not fresh.exists()  # no dump without its .json, no directory
    before = _tree(out)
    with pytest.raises(ValueError):
        main(["router", "--weights", d, "--prompt", "b c", "--out-dir", str(out)])
    assert _tree(out) == before and _leftovers(out) == []


def test_sphere_workers_write_into_the_set(capsys, tmp_path, monkeypatch):
    import headlens.report.sphere as report_sphere

    out = tmp_path / "sph"
    argv = ["sphere", "--prompt", "The Eiffel Tower is in Paris. Octopuses have three hearts.", "--layers", "0,5",
            "--workers", "2", "--out-dir", str(out)]
    assert main(argv) == 0
    before = _tree(out)
    assert "sphere_metrics.png" in before and "tokens.gif" in before and _leftovers(out) == []
    real = report_sphere.write_gif

    def fail(*a, **k):  # the metrics plot is drawn in a worker meanwhile
        raise HeadlensError("disk full")

    monkeypatch.setattr(report_sphere, "write_gif", fail)
    capsys.readouterr()
    assert main(argv[:-1] + [str(out)]) == 2
    assert _tree(out) == before and _leftovers(out) == []
    monkeypatch.setattr(report_sphere, "write_gif", real)


@pytest.mark.parametrize("argv", [
    ["ov", "--layer", "0", "--head", "0", "--json", "{dir}"],
    ["ov", "--layer", "0", "--head", "0", "--json", "{dir}/"],
    ["ov", "--layer", "0", "--head", "0", "--plot-path", "{dir}"],
    ["sphere", "--layers", "0", "--json", "{dir}"],
    ["sweep", "--layers", "0", "--json", "{dir}/"],
    ["diagram", "--layer", "0", "--json", "{dir}"],
    ["ov", "--layer", "0", "--head", "0", "--json", "/"],
    ["sweep", "--layers", "0", "--json", "{file}/x.json"],
    ["ov", "--layer", "0", "--head", "0", "--plot-path", "{file}/x.png"],
])
def test_file_flags_naming_a_directory_or_an_unwritable_place(capsys, tmp_path, argv):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("a file")
    argv = [a.replace("{dir}", str(tmp_path / "d")).replace("{file}", str(tmp_path / "f")) for a in argv]
    root_before = sorted(os.listdir("/"))
    code = main([*argv, "--out-dir", str(tmp_path / "out")])
    err = _err_line(capsys)
    assert code == 2 and ("is a directory: give a file name" in err or "cannot create output directory" in err), err
    assert ("--json" in err) or ("--plot-path" in err)
    assert _tree(tmp_path) == {"f": b"a file"} and sorted(os.listdir("/")) == root_before


def test_toy_out_naming_a_directory(capsys, tmp_path):
    d = tmp_path / "toys"
    assert main(["toy", "create", "--out", f"{d}/", "--layers", "1", "--heads", "2", "--head-dim", "4",
                 "--d-model", "8"]) == 0
    assert f"saved toy -> {d}/toy.safetensors" in capsys.readouterr().out
    (tmp_path / "tr").mkdir()
    assert main(["toy", "trace", "--weights", str(d / "toy.safetensors"), "--tokens", "8",
                 "--out", str(tmp_path / "tr")]) == 0
    out = capsys.readouterr().out
    assert f"saved traces -> {tmp_path}/tr/traces.safetensors" in out
    assert sorted(p.name for p in (tmp_path / "tr").iterdir()) == [osm.MANIFEST, "traces.json", "traces.safetensors"]
    assert not (tmp_path / "tr.safetensors").exists() and not (tmp_path / "tr.json").exists()


@pytest.mark.parametrize("argv,flag", [
    (["toy", "cluster", "--beta", "nan"], "--beta"),
    (["toy", "cluster", "--beta", "inf"], "--beta"),
    (["toy", "cluster", "--tokens", "0"], "--tokens"),
    (["toy", "cluster", "--tokens", "100000000"], "--tokens"),
    (["toy", "cluster", "--dim", "100000000"], "--dim"),
    (["toy", "cluster", "--tokens", "4096", "--dim", "4096"], "--tokens"),
    (["toy", "create", "--out", "{tmp}/t.pt", "--plant", "geometric", "--plant-decay", "-1"], "--plant-decay"),
    (["toy", "create", "--out", "{tmp}/t.pt", "--plant", "power", "--plant-decay", "nan"], "--plant-decay"),
    (["toy", "create", "--out", "{tmp}/t.pt", "--plant", "geometric", "--plant-decay", "1.5"], "--plant-decay"),
    (["toy", "create", "--out", "{tmp}/t.pt", "--d-model", "0"], "--d-model"),
    (["toy", "create", "--out", "{tmp}/t.pt", "--heads", "100000"], "--heads"),
    (["toy", "create", "--out", "{tmp}/t.pt", "--d-model", "4096", "--head-dim", "1024", "--layers", "64"],
     "--d-model"),
    (["toy", "run", "--out-dir", "{tmp}/run", "--latent-dim", "99"], "--latent-dim 99 is above"),
    (["toy", "run", "--out-dir", "{tmp}/run", "--latent-dim", "0"], "--latent-dim"),
    (["toy", "run", "--out-dir", "{tmp}/run", "--tokens", "0"], "--tokens"),
    (["toy", "run", "--out-dir", "{tmp}/run", "--tokens", "10000000"], "--tokens"),
])
def test_toy_extreme_values_are_one_line(capsys, tmp_path, argv, flag):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = _err_line(capsys)
    assert code == 2 and flag in err, err
    assert _tree(tmp_path) == {}


def test_toy_run_latent_dim_message_matches_ov(capsys, tmp_path):
    assert main(["toy", "run", "--out-dir", str(tmp_path), "--head-dim", "16", "--latent-dim", "99"]) == 2
    assert _err_line(capsys) == ("headlens toy: error: --latent-dim 99 is above the toy's head_dim (16): "
                                 "choose 1..16")


# ---------------------------------------------------------------------------------- real processes, compress


def _headlens(*argv: str, script: str | None = None) -> subprocess.Popen:
    """``headlens ARGV`` as its own process (or ``script`` run as the program with ARGV), sources as this test's."""
    cmd = [sys.executable, "-m", "headlens", *argv] if script is None else [sys.executable, "-c", script, *argv]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _compress(tmp_path: Path, k: int) -> list[str]:
    """A small compress run of tiny-lm: one layer, plain latents of size ``k``, two eval texts."""
    from headlens.io.embedded import default_texts

    texts = tmp_path / "eval.txt"
    if not texts.exists():
        texts.write_text("\n".join(default_texts("tiny-lm").eval_file.read_text().splitlines()[:2]) + "\n")
    return ["compress", "--model", "tiny-lm", "--layers", "0", "--latent", "plain", "--k", str(k), "--eval", str(texts)]


def _finish(runs: dict) -> dict:
    """{key: (returncode, stdout, stderr)} of processes started together."""
    return {key: (p.wait(timeout=600), *p.communicate()) for key, p in runs.items()}


def _winner(done: dict, runs: dict) -> tuple:
    """(winning key, losing key): exactly one run exits 0, the other 2 with one line naming the winner."""
    assert sorted(rc for rc, _, _ in done.values()) == [0, 2], {k: (rc, err[-2000:]) for k, (rc, _, err) in done.items()}
    win = next(k for k, (rc, _, _) in done.items() if rc == 0)
    lose = next(k for k in done if k != win)
    err = done[lose][2].strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("headlens compress: error: output directory ") and f"is in use by pid {runs[win].pid}" in err
    return win, lose


# Runs headlens as the program, waiting for a line on stdin before it loads the model and computes.
WAIT_THEN_COMPUTE = """
import sys
import headlens.compress.run as run

real = run.run_compress

def wait_then_run(*a, **k):
    sys.stdin.readline()
    return real(*a, **k)

run.run_compress = wait_then_run
from headlens.cli import main
sys.argv = ["headlens", *sys.argv[1:]]
sys.exit(main())
"""


def test_two_compress_runs_into_one_out_dir_started_together_one_refuses(tmp_path):
    out = tmp_path / "out"
    args = {k: [*_compress(tmp_path, k), "--out-dir", str(out), "--save-model", str(tmp_path / f"model{k}")]
            for k in (8, 16)}
    # the k=16 run holds before its computation until the k=8 run has ended: a lock taken only to write would let
    # both finish (the second replacing the first's files); one taken at the start lets exactly one run
    runs = {8: _headlens(*args[8]), 16: _headlens(*args[16], script=WAIT_THEN_COMPUTE)}
    done = {8: (runs[8].wait(timeout=600), *runs[8].communicate())}
    out16, err16 = runs[16].communicate(input="\n", timeout=600)  # go on, if it holds the lock
    done[16] = (runs[16].returncode, out16, err16)
    win, lose = _winner(done, runs)
    # the directory holds the winner's set, whole: its manifest lists exactly the files there, all from its run
    summary = json.loads((out / "compress_summary.json").read_text())
    assert [c["name"] for c in summary["configurations"]] == [f"plain k={win}"]
    (entry,) = json.loads((out / osm.MANIFEST).read_text())["sets"].values()
    assert f"--k {win} " in entry["command"] and sorted(entry["files"]) == sorted(
        p.name for p in out.iterdir() if p.name != osm.MANIFEST)
    plan = json.loads((tmp_path / f"model{win}" / "headlens_latent.json").read_text())
    assert plan["info"]["configuration"] == f"plain k={win}"
    assert not (tmp_path / f"model{lose}").exists() and _leftovers(tmp_path) == []


def test_two_runs_saving_one_model_directory_one_refuses(tmp_path):
    model = tmp_path / "model"
    runs = {k: _headlens(*_compress(tmp_path, k), "--out-dir", str(tmp_path / f"out{k}"), "--save-model", str(model))
            for k in (8, 16)}
    win, lose = _winner(_finish(runs), runs)
    assert json.loads((model / "headlens_latent.json").read_text())["info"]["configuration"] == f"plain k={win}"
    assert sorted(p.name for p in model.iterdir()) == sorted([
        osm.MANIFEST, "config.json", "generation_config.json", "headlens_latent.json", "latent_factors.safetensors",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert (tmp_path / f"out{win}" / "compress_summary.json").exists() and not (tmp_path / f"out{lose}").exists()
    assert _leftovers(tmp_path) == []


# Runs headlens as the program, stopping inside --save-model once the compressed model is in its staging directory.
SAVE_AND_WAIT = """
import sys, time
import headlens.compress.apply as apply

def wait(*a, **k):
    print("saving", flush=True)
    time.sleep(600)

apply.save_latent_factors = wait
from headlens.cli import main
sys.argv = ["headlens", *sys.argv[1:]]
sys.exit(main())
"""


def _wait_for_saving(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line.strip() == "saving":
            return
    raise AssertionError(f"ended before saving: {proc.wait()} {proc.stderr.read()[-2000:]}")


# Stages a model directory as compress --save-model does (io.files.atomic_dir in an output set), then waits.
STAGE_AND_WAIT = """
import sys, time
from headlens.io.files import atomic_dir
from headlens.io.output_set import output_set
with output_set("compress", [sys.argv[1]]), atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(bytes(1 << 20))
    print("saving", flush=True)
    time.sleep(600)
"""


def test_sigterm_during_save_model_rolls_back_and_a_killed_runs_staging_is_removed(tmp_path):
    model = tmp_path / "model"
    killed = _headlens(str(model), script=STAGE_AND_WAIT)
    _wait_for_saving(killed)
    killed.kill()  # SIGKILL: nothing of it runs again
    killed.wait()
    stale = json.loads((model / osm.LOCK).read_text())
    staging = [p for p in model.iterdir() if p.name != osm.LOCK]
    assert stale["pid"] == killed.pid and len(staging) == 1 and staging[0].name.startswith(f".headlens-{stale['id']}")
    assert (staging[0] / "model.safetensors").stat().st_size == 1 << 20

    term = _headlens(*_compress(tmp_path, 8), "--out-dir", str(tmp_path / "out"), "--save-model", str(model),
                     script=SAVE_AND_WAIT)
    _wait_for_saving(term)
    # the compress run took the dead run's lock over and removed its staging directory; its own holds the model
    lock = json.loads((model / osm.LOCK).read_text())
    assert lock["pid"] == term.pid and not staging[0].exists()
    ours = [p for p in model.iterdir() if p.name != osm.LOCK]
    assert ours and all(p.name.startswith(f".headlens-{lock['id']}") for p in ours)
    assert any(p.name.endswith(".model.safetensors") or (p / "model.safetensors").exists() for p in ours)
    term.send_signal(signal.SIGTERM)
    out, err = term.communicate(timeout=120)
    assert term.returncode == 143, (term.returncode, err[-2000:])
    assert err.strip().splitlines() == ["headlens: terminated"], err
    assert list(model.iterdir()) == [] and not (tmp_path / "out").exists()  # rolled back: no staging, no lock


def test_save_model_in_a_read_only_place_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    import headlens.compress.run as run

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere whatever the mode: make the permission check see the mode
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: access(p, mode, **k) and not (
            mode & os.W_OK and Path(p).resolve() == ro.resolve()))

    def computed(*a, **k):
        raise AssertionError("the model was loaded and measured before the bad --save-model was refused")

    monkeypatch.setattr(run, "run_compress", computed)
    capsys.readouterr()
    code = main([*_compress(tmp_path, 8), "--out-dir", str(tmp_path / "out"), "--save-model", str(ro / "model")])
    err = _err_line(capsys)
    assert code == 2 and err.startswith(f"headlens compress: error: --save-model {ro}/model: ") and "not writable" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.txt", "ro"] and list(ro.iterdir()) == []


# ------------------------------------------------------------------------------- a signal after the files


@pytest.mark.parametrize("when", ["during the commit", "after the commit"])
def test_ctrl_c_once_the_files_are_written_stops_nothing_and_says_so(capsys, tmp_path, monkeypatch, when):
    if when == "during the commit":  # Ctrl-C lands while the files are being renamed into place
        real_manifest = osm.update_manifest

        def ctrl_c_then_manifest(*a, **k):
            signal.raise_signal(signal.SIGINT)
            return real_manifest(*a, **k)

        monkeypatch.setattr(osm, "update_manifest", ctrl_c_then_manifest)
    else:  # ... or once they all are, before headlens has returned
        real_set = osm.output_set

        @contextmanager
        def then_ctrl_c(*a, **k):
            with real_set(*a, **k) as s:
                yield s
            signal.raise_signal(signal.SIGINT)

        monkeypatch.setattr(osm, "output_set", then_ctrl_c)
    out = tmp_path / "t"
    capsys.readouterr()
    code = main(["toy", "create", "--out", f"{out}/", "--layers", "1", "--heads", "2", "--head-dim", "4",
                 "--d-model", "8"])
    assert code == 130
    assert _err_line(capsys) == "headlens: interrupted after writing: every file of this run is complete"
    assert sorted(p.name for p in out.iterdir()) == [osm.MANIFEST, "toy.safetensors", "toy.safetensors.toy.json"]
    assert _leftovers(tmp_path) == []


def test_ctrl_c_as_the_program_ends_is_not_a_traceback_nor_a_silent_death(tmp_path):
    out = tmp_path / "t"
    proc = _headlens("toy", "create", "--out", f"{out}/", "--layers", "1", "--heads", "2", "--head-dim", "4",
                     "--d-model", "8")
    while not (out / osm.MANIFEST).exists():  # the set is committed: the command is ending
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 130:  # still in the command: it says so, in one line
        assert err.strip().splitlines() == ["headlens: interrupted after writing: every file of this run is complete"]
    else:  # shutting down: the outcome stands
        assert proc.returncode == 0 and err.strip() == "", (proc.returncode, err)
    assert sorted(p.name for p in out.iterdir()) == [osm.MANIFEST, "toy.safetensors", "toy.safetensors.toy.json"]
