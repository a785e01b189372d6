"""The sweep's resume store: one JSON file per finished layer under ``<out_dir>/sweep_layers/``.

- ``run.json``: what produced the parts (model description, analysis config and dtype, calibration data);
  a resumed run must match it exactly.
- ``layer_XXXX.json``: ``{"head_rows", "group_rows", "group_plain", "group_white", "group_white_heldout"}``,
  the layer's table rows (:mod:`headlens.circuits.sweep_results`) and its kv-group spectra as nested lists.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from headlens.circuits.sweep_results import LayerResult, group_from_row, group_row, head_from_row, head_row
from headlens.errors import HeadlensError
from headlens.io.files import ensure_dir, write_json

PARTS = "sweep_layers"  # the directory under out_dir
RUN = "run.json"


def texts_hash(texts: list[str]) -> str:
    """A short SHA-256 of the calibration texts (16 hex digits)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def run_id(model: dict, config: dict, texts: list[str] | None, max_tokens: int) -> dict[str, Any]:
    """What ``run.json`` holds: ``{"model", "config", "data"}`` (``data`` None without calibration texts)."""
    return {"model": model, "config": config,
            "data": None if texts is None else {"texts": len(texts), "max_tokens": max_tokens,
                                                "hash": texts_hash(texts)}}


def _tensor(values) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float64)


def _list(t: torch.Tensor | None):
    return None if t is None else t.tolist()


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A table row as strict JSON: the one non-finite value a row holds, the condition number of a rank-0
    operator (inf), is written as null (read back by :func:`_table_row`)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: float("inf") if v is None and k.endswith("_condition") else v for k, v in row.items()}


class SweepParts:
    """The per-layer parts of one sweep's output directory."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir) / PARTS

    def layer_path(self, layer: int) -> Path:
        return self.dir / f"layer_{layer:04d}.json"

    def load(self, run: dict[str, Any], layers: Sequence[int], ks: Sequence[int]) -> dict[int, LayerResult]:
        """The finished layers among ``layers`` of a previous run; {} when there is none. Raises a
        HeadlensError (naming ``resume``) when the previous run had another model or configuration."""
        path = self.dir / RUN
        if not path.exists():
            return {}
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(run)):
            raise HeadlensError(f"`resume`: {self.dir} was written by a different model or configuration; use "
                                "another `out_dir` or drop `resume`")
        done = {}
        for layer in layers:
            f = self.layer_path(layer)
            if f.exists():
                done[layer] = self._from_json(json.loads(f.read_text()), layer, ks)
        return done

    @staticmethod
    def _from_json(part: dict[str, Any], layer: int, ks: Sequence[int]) -> LayerResult:
        plain = torch.tensor(part["group_plain"], dtype=torch.float64)  # (G, r)
        assert plain.dim() == 2 and plain.shape[0] == len(part["group_rows"]), tuple(plain.shape)
        return LayerResult(layer=layer, heads=[head_from_row(_table_row(r), ks) for r in part["head_rows"]],
                           groups=[group_from_row(_table_row(r), ks) for r in part["group_rows"]],
                           group_plain=plain,
                           group_white=_tensor(part["group_white"]),
                           group_white_heldout=_tensor(part.get("group_white_heldout")))

    def start(self, run: dict[str, Any]) -> None:
        """Create the directory and (re)write ``run.json``."""
        ensure_dir(self.dir)
        write_json(self.dir / RUN, run)

    def save(self, result: LayerResult) -> Path:
        """Write one finished layer; returns its path."""
        part = {"head_rows": [_json_row(head_row(h)) for h in result.heads],
                "group_rows": [_json_row(group_row(g)) for g in result.groups],
                "group_plain": result.group_plain.tolist(), "group_white": _list(result.group_white),
                "group_white_heldout": _list(result.group_white_heldout)}
        return write_json(self.layer_path(result.layer), part)
