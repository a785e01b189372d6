"""The sweep's heatmaps drawn in a worker process, and its per-layer lines printed as each layer finishes.

- A worker draws byte-identical PNGs to this process, and ``write_report`` with a pool writes the same files.
- The figure module a worker imports pulls in no torch (that is what keeps the worker's start cheap).
- A worker's staged file is found by the page writer before the command commits (output sets).
- ``run_sweep`` hands each layer to ``on_layer`` before the next layer is analysed; the CLI prints each layer's
  line once, in the order the layers finish, before the budget lines.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from headlens.circuits.sweep import SweepResult
from headlens.circuits.sweep_layer import AnalysisConfig
from headlens.io.checkpoint import ModelShape
from headlens.report.pool import Deferred, WorkerPool
from headlens.report.sweep import write_report
from headlens.report.sweep_figures import draw_heatmap, heatmap_jobs, warm_up

from test_sweep_report import KS, make_budget, make_layers


def _result(data_aware: bool = True) -> SweepResult:
    layers = make_layers(n_layers=6, n_heads=8, n_kv=2, data_aware=data_aware)
    return SweepResult(model={"name": "synthetic"}, name="synthetic", shape=ModelShape("qwen3", 6, 8, 2, 16, 64),
                       config=AnalysisConfig(ks=list(KS)), dtype="float32", layers=layers,
                       budget=make_budget(n_layers=6, data_aware=data_aware), data_aware=data_aware,
                       calibration_tokens=10 if data_aware else 0)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(lambda: 1, warm_up) as p:
        p.start()
        assert p.executor is not None, "no worker process could be started"
        yield p.executor


def test_worker_draws_the_same_bytes(tmp_path, pool):
    result = _result()
    here, away = tmp_path / "here", tmp_path / "away"
    jobs_here = heatmap_jobs(here, result.heads(), KS, result.name)
    jobs_away = heatmap_jobs(away, result.heads(), KS, result.name)
    assert [j["kind"] for _, j in jobs_here] == ["rank", "rank", "per_k", "per_k"]  # OV and QK ranks
    drawn = [draw_heatmap(path, job) for path, job in jobs_here]
    deferred = [Deferred(pool, draw_heatmap, path, job) for path, job in jobs_away]
    assert all(d.future is not None for d in deferred)  # submitted to the worker, not drawn here
    got = [d.result() for d in deferred]
    assert [p.name for p in got] == [p.name for p in drawn]
    for a, b in zip(drawn, got):
        assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.parametrize("data_aware", [True, False])
def test_write_report_with_a_pool_writes_the_same_files(tmp_path, pool, data_aware):
    result = _result(data_aware)
    plain = write_report(result, tmp_path / "plain")
    pooled = write_report(result, tmp_path / "pooled", pool=pool)
    assert [p.name for p in plain] == [p.name for p in pooled]
    for a, b in zip(plain, pooled):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_figure_module_imports_no_torch():
    code = ("import sys, headlens.report.sweep_figures as f; f.warm_up(); "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_page_reads_a_file_a_worker_staged(tmp_path):
    from headlens.io import output_set
    from headlens.io.files import readable

    final = tmp_path / "fig.png"
    with output_set.output_set("sweep", [tmp_path]) as out:
        staged = out.stage_name(final)  # where a worker process of this set stages ``final``
        staged.write_bytes(b"worker bytes")
        assert readable(final) == staged
        assert readable(final).read_bytes() == b"worker bytes"
    assert final.read_bytes() == b"worker bytes"  # and the commit collected it


def test_on_layer_runs_before_the_next_layer(ckpts, monkeypatch):
    import headlens.circuits.sweep as sweep_mod
    from headlens.circuits.sweep import SweepConfig, run_sweep
    from headlens.io.source import ModelSource

    events: list[tuple[str, int]] = []
    orig = sweep_mod.analyze_layer

    def spy(layer, *a, **k):
        events.append(("analyze", layer))
        return orig(layer, *a, **k)

    monkeypatch.setattr(sweep_mod, "analyze_layer", spy)
    d = str(ckpts.path("gemma3", "gqa", "hf_dir"))  # 3 layers
    result = run_sweep(ModelSource(weights=d), SweepConfig(ks="4"), on_layer=lambda r: events.append(("done", r.layer)))
    assert events == [("analyze", 0), ("done", 0), ("analyze", 1), ("done", 1), ("analyze", 2), ("done", 2)]
    assert [r.layer for r in result.layers] == [0, 1, 2]


def test_cli_prints_each_layer_once_before_the_budget(ckpts, tmp_path):
    from headlens.report.sweep import layer_line

    d = str(ckpts.path("gemma3", "gqa", "hf_dir"))
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "headlens", "sweep", "--weights", d, "--k", "4", "--layers", "1:3", "--out-dir",
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    layer_lines = [line for line in lines if line.startswith("layer ")]
    assert [line.split(":")[0] for line in layer_lines] == ["layer   1", "layer   2"]
    first_budget = next(i for i, line in enumerate(lines) if line.startswith("budget ("))
    assert all(lines.index(line) < first_budget for line in layer_lines)
    from headlens.circuits.sweep import SweepConfig, run_sweep
    from headlens.io.source import ModelSource

    again = run_sweep(ModelSource(weights=d), SweepConfig(ks="4", layers="1:3"))
    assert layer_lines == [layer_line(r, [4]) for r in again.layers]  # the same numbers as the library's
    assert (out / "sweep_rel_error.png").is_file()
    assert [p.name for p in out.glob(".headlens-*")] == [".headlens-manifest.json"]  # no staged file left


def _env() -> dict:
    import os

    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_cli_with_and_without_the_worker_writes_the_same_files(ckpts, capsys, tmp_path, monkeypatch):
    import headlens.cli.sweep as cli_sweep
    from headlens.cli import main
    from headlens.report import pool as pool_mod

    d = str(ckpts.path("gemma3", "gqa", "hf_dir"))
    started = []
    real = pool_mod.WorkerPool.start
    monkeypatch.setattr(pool_mod.WorkerPool, "start", lambda self: (started.append(1), real(self)))
    outs = {}
    for cells in (10**9, 0):  # a tiny model: no worker by default; threshold 0 forces one
        monkeypatch.setattr(cli_sweep, "POOL_MIN_CELLS", cells)
        out = tmp_path / f"cells{cells}"
        assert main(["sweep", "--weights", d, "--k", "4", "--out-dir", str(out)]) == 0
        outs[cells] = out
    assert started == [1]  # only the second run started the worker
    capsys.readouterr()
    names = sorted(p.name for p in outs[0].iterdir() if p.is_file() and not p.name.startswith("."))
    assert "sweep_rel_error.png" in names
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[10**9] / name).read_bytes(), name
