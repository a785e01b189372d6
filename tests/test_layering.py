"""The house rules are checked by import-linter (``[tool.importlinter]`` in pyproject.toml), and the check can fail."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root / "src"), "PATH": str(LINT.parent)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "house"
    shutil.copytree(REPO / "src" / "headlens", root / "src" / "headlens",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_house_keeps_every_contract(tmp_path):
    out = _lint(_copy(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout and out.stdout.count("KEPT") >= 4


@pytest.mark.parametrize("module, line, contract", [
    ("circuits/spectrum.py", "import matplotlib.pyplot  # noqa", "only report/ draws"),
    ("residual/sphere.py", "from headlens.report import figures  # noqa", "never import the report or CLI"),
    ("io/files.py", "from headlens.circuits import spectrum  # noqa", "io/ is the bottom room"),
    ("report/figures.py", "from headlens import cli  # noqa", "reports never import the CLI"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    root = _copy(tmp_path)
    path = root / "src" / "headlens" / module
    path.write_text(path.read_text() + f"\n\ndef _smuggled():\n    {line}\n")
    out = _lint(root)
    assert out.returncode != 0
    broken = [ln for ln in out.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken), out.stdout
