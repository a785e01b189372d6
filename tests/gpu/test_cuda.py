"""Every command's numbers on CUDA against the CPU, float32 to 1e-4 (run where ``torch.cuda.is_available()``;
``bench/device_check.sh`` runs them on a machine with a GPU). Elsewhere the module is skipped with one message."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))

from outputs import PLACE_KEYS, close, numbers  # noqa: E402
from test_placement import COMMANDS, eval_texts  # noqa: E402

from headlens.cli import main  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU tests need one")


def _run(argv: list[str], out: Path, extra: list[str], capsys) -> None:
    capsys.readouterr()
    assert main([*argv, "--out-dir", str(out), "--dtype", "float32", *extra]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_cuda_numbers_match_the_cpu(name, tmp_path, capsys):
    texts = eval_texts(tmp_path)
    argv = [a.format(**texts) for a in COMMANDS[name]]
    _run(argv, tmp_path / "cpu", ["--device", "cpu"], capsys)
    _run(argv, tmp_path / "cuda", ["--device", "cuda"], capsys)
    a, b = numbers(tmp_path / "cpu"), numbers(tmp_path / "cuda")
    assert a and a.keys() == b.keys()
    for key in a:
        if key.endswith(".csv"):  # printed tables: compare their cells as numbers
            rows_a = [r.split(",") for r in str(a[key]).splitlines()]
            rows_b = [r.split(",") for r in str(b[key]).splitlines()]
            close([[_num(c) for c in r] for r in rows_a], [[_num(c) for c in r] for r in rows_b], key,
                  rel=1e-4, abs_=1e-4)
        else:
            close(a[key], b[key], key, rel=1e-4, abs_=1e-4, skip=PLACE_KEYS | {"command"})


def _num(cell: str):
    try:
        return float(cell)
    except ValueError:
        return cell.replace("cuda:0", "cpu").replace("cuda", "cpu")


def test_cuda_sweep_runs_its_products_on_the_gpu(tmp_path, capsys):
    assert main(["sweep", "--model", "tiny-lm", "--device", "cuda", "--out-dir", str(tmp_path)]) == 0
    import json

    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert summary["config"]["device"].startswith("cuda") and summary["config"]["gram_precision"] == "float64"
