"""The sweep's resume store: one JSON file per finished layer under ``<out_dir>/sweep_layers/``.

- ``run.json``: what produced the latest parts (the run's fingerprint, see :func:`run_id`), for people.
- ``layer_XXXX.json``: ``{"fingerprint", "head_rows", "group_rows", "group_plain", "group_white",
  "group_white_heldout", "key_plain", "key_white", "key_white_heldout"}``: the fingerprint of the run that computed
  it (model with a content hash, analysis config and dtype, calibration data, the parts' format), the layer's table
  rows (:mod:`headlens.circuits.sweep_results`) and its kv-group value and key spectra as nested lists. ``--resume`` reuses a part only when its fingerprint equals the current
  run's; any other part (another model, ``--k``, ``--fold-norm``, calibration, or weights changed on disk) is
  recomputed and overwritten. Parts are written at once (not staged with the command's output set), so an
  interrupted sweep keeps them.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from headlens.circuits.sweep_results import LayerResult, group_from_row, group_row, head_from_row, head_row
from headlens.errors import HeadlensError
from headlens.io.files import ensure_dir, write_json

if TYPE_CHECKING:
    from headlens.io.checkpoint import Checkpoint

PARTS = "sweep_layers"  # the directory under out_dir
RUN = "run.json"
# What a part holds and how it was computed; parts of another format are computed again. 2: the QK columns with
# q/k norm gains folded, the stacked key operators and their spectra (key_plain, ...).
FORMAT = 2


def texts_hash(texts: list[str]) -> str:
    """A short SHA-256 of the calibration texts (16 hex digits)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def run_id(model: dict, config: dict, texts: list[str] | None, max_tokens: int) -> dict[str, Any]:
    """What ``run.json`` holds: ``{"model", "config", "data", "format"}`` (``data`` None without calibration
    texts; ``format`` the parts' :data:`FORMAT`)."""
    return {"model": model, "config": config,
            "data": None if texts is None else {"texts": len(texts), "max_tokens": max_tokens,
                                                "hash": texts_hash(texts)}, "format": FORMAT}


def _file_stats(ck: "Checkpoint") -> list[list]:
    """[name, size, mtime_ns] of the files the checkpoint's tensors come from (where they are known)."""
    paths: set[Path] = set()
    info = getattr(ck.tensors.stored, "_info", None)  # SafetensorsSource: {tensor: (path, ...)}
    if isinstance(info, dict):
        paths = {Path(v[0]) for v in info.values()}
    elif ck.directory is not None:
        paths = {f for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth") for f in Path(ck.directory).glob(pattern)}
    elif Path(str(ck.source)).is_file():
        paths = {Path(str(ck.source))}
    stats = []
    for f in sorted(paths):
        try:
            st = f.stat()
        except OSError:
            continue
        stats.append([f.name, st.st_size, st.st_mtime_ns])
    return stats


def _hash_tensors(h, src) -> None:
    """Every tensor's name, shape and dtype and the bytes of its first and last rows, into the hash ``h``."""
    for name in sorted(src.keys()):
        shape = tuple(src.shape(name))
        h.update(f"{name}|{shape}|{src.dtype(name)}\n".encode())
        rows = [slice(0, 1), slice(shape[0] - 1, shape[0])] if shape and shape[0] > 0 else [None]
        for rows_index in rows:
            t = src.read(name, rows_index).contiguous()
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


_TENSOR_HASHES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _tensors_hash(ck: "Checkpoint"):
    """A SHA-256 object fed by :func:`_hash_tensors` over ``ck.tensors``: a copy for the caller to finish, computed
    once per tensor source (a sweep asks twice, for its resume fingerprint and its weights digest)."""
    h = _TENSOR_HASHES.get(ck.tensors)
    if h is None:
        h = _TENSOR_HASHES[ck.tensors] = hashlib.sha256()
        _hash_tensors(h, ck.tensors.stored)  # the stored bytes (a quantized weight's codes and scales)
    return h.copy()


def weights_digest(ck: "Checkpoint") -> str:
    """16 hex digits of a SHA-256 over the checkpoint's tensors (names, shapes, dtypes, first and last rows), not
    its files: a copy of the same weights has the same digest, other weights another. It names the model a
    ``sweep_budget.csv`` belongs to (column ``model_weights``), so that ``compress --budget`` can refuse a budget
    made for another model."""
    return _tensors_hash(ck).hexdigest()[:16]


def model_fingerprint(ck: "Checkpoint") -> dict[str, Any]:
    """The checkpoint's description plus ``content``: a SHA-256 (16 hex digits) of every tensor's name, shape
    and dtype, the bytes of its first and last rows, and the size and modification time of its files. Cheap
    (two rows per tensor), and it changes when the weights are replaced or rewritten."""
    h = _tensors_hash(ck)
    h.update(json.dumps(_file_stats(ck)).encode())
    return {**ck.describe(), "content": h.hexdigest()[:16]}


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
        self.run: dict[str, Any] | None = None  # the fingerprint saved parts carry (set by load/start)
        self.stale: list[int] = []  # layers whose part was computed by another run (found by load)

    fingerprint = staticmethod(model_fingerprint)

    def layer_path(self, layer: int) -> Path:
        return self.dir / f"layer_{layer:04d}.json"

    def load(self, run: dict[str, Any], layers: Sequence[int], ks: Sequence[int]) -> dict[int, LayerResult]:
        """The finished layers among ``layers`` whose part carries ``run`` (:func:`run_id`) as its fingerprint;
        the others (another model or configuration, an older format, unreadable) go to ``self.stale`` and are
        computed again."""
        self.run = json.loads(json.dumps(run))
        self.stale = []
        done = {}
        for layer in layers:
            f = self.layer_path(layer)
            if not f.exists():
                continue
            try:
                part = json.loads(f.read_text())
            except (OSError, ValueError):
                part = None
            if not isinstance(part, dict) or part.get("fingerprint") != self.run:
                self.stale.append(layer)
                continue
            done[layer] = self._from_json(part, layer, ks)
        return done

    @staticmethod
    def _from_json(part: dict[str, Any], layer: int, ks: Sequence[int]) -> LayerResult:
        plain = torch.tensor(part["group_plain"], dtype=torch.float64)  # (G, r)
        assert plain.dim() == 2 and plain.shape[0] == len(part["group_rows"]), tuple(plain.shape)
        return LayerResult(layer=layer, heads=[head_from_row(_table_row(r), ks) for r in part["head_rows"]],
                           groups=[group_from_row(_table_row(r), ks) for r in part["group_rows"]],
                           group_plain=plain,
                           group_white=_tensor(part["group_white"]),
                           group_white_heldout=_tensor(part.get("group_white_heldout")),
                           key_plain=_tensor(part.get("key_plain")), key_white=_tensor(part.get("key_white")),
                           key_white_heldout=_tensor(part.get("key_white_heldout")))

    def start(self, run: dict[str, Any]) -> None:
        """Create the directory and (re)write ``run.json``; later parts carry ``run`` as their fingerprint."""
        self.run = json.loads(json.dumps(run))
        ensure_dir(self.dir)
        write_json(self.dir / RUN, run, immediate=True)

    def save(self, result: LayerResult) -> Path:
        """Write one finished layer at once (with the run's fingerprint); returns its path."""
        if self.run is None:
            raise HeadlensError("the sweep's resume store was not started")
        part = {"fingerprint": self.run,
                "head_rows": [_json_row(head_row(h)) for h in result.heads],
                "group_rows": [_json_row(group_row(g)) for g in result.groups],
                "group_plain": result.group_plain.tolist(), "group_white": _list(result.group_white),
                "group_white_heldout": _list(result.group_white_heldout), "key_plain": _list(result.key_plain),
                "key_white": _list(result.key_white), "key_white_heldout": _list(result.key_white_heldout)}
        return write_json(self.layer_path(result.layer), part, immediate=True)
