"""Reading a command's machine-readable outputs back for comparisons between runs (devices, placements)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PLACE_KEYS = {"device", "seconds"}  # where and how long a run ran: not a number the run measured


def numbers(out: Path) -> dict[str, object]:
    """Every JSON and CSV file under ``out`` (not the manifest), paths written as relative, timings dropped."""
    found: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if p.suffix not in (".json", ".csv") or not p.is_file() or p.name.startswith("."):
            continue
        text = p.read_text(encoding="utf-8").replace(str(out), "<out>")
        if p.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                data.pop("seconds", None)
            found[str(p.relative_to(out))] = data
        else:
            found[str(p.relative_to(out))] = text
    return found


def close(x, y, path: str = "", rel: float = 1e-6, abs_: float = 1e-9, skip: set[str] = frozenset()) -> None:
    """Equal structures, floats to ``rel`` relative (``abs_`` absolute); keys in ``skip`` are not compared."""
    assert type(x) is type(y) or {type(x), type(y)} <= {int, float}, (path, x, y)
    if isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for k in x:
            if k not in skip:
                close(x[k], y[k], f"{path}/{k}", rel, abs_, skip)
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            close(u, v, f"{path}[{i}]", rel, abs_, skip)
    elif isinstance(x, float) or isinstance(y, float):
        assert x == pytest.approx(y, rel=rel, abs=abs_, nan_ok=True), path
    else:
        assert x == y, path
