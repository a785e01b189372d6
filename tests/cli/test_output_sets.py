"""Every command writes its files as one set: locked output directories, nothing mixed after a failure or an
interrupt, no temporary file left, and file flags that name a directory refused up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
