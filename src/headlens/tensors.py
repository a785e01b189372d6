"""Lazy tensor access over every checkpoint format headlens accepts.

A :class:`TensorSource` lists tensor names and shapes and reads one tensor, or a row/column block of
one, on demand. Safetensors files are read through ``safe_open`` slices, so only the bytes of the
requested block are touched; ``.pt``/``.bin`` state dicts go through ``torch.load(weights_only=True,
mmap=True)``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from headlens.errors import HeadlensError

STATE_DICT_SUFFIXES = (".pt", ".bin", ".pth")
ACCEPTED = "a .safetensors file, a .pt/.bin/.pth state dict, or a HuggingFace model directory"

Index = tuple[slice, slice] | slice | None


class TensorSource:
    """Read-only, lazy view of a checkpoint's tensors."""

    description: str = ""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def read(self, name: str, index: Index = None) -> torch.Tensor:
        """Tensor ``name``, or ``tensor[index]`` for a slice / (row slice, column slice) index."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())


def _torch_dtype(st_dtype: str) -> torch.dtype:
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    return table.get(st_dtype, torch.float32)


def _check_safetensors_header(path: Path) -> None:
    """Validate the header and that the file holds every byte it declares (catches truncation)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise ValueError("header length points past the end of the file")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise HeadlensError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeadlensError(f"{path} is not a valid safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise HeadlensError(f"{path} is not a valid safetensors file (header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise HeadlensError(f"{path} is not a valid safetensors file (bad entry for {name!r})") from None
    if 8 + n + end > size:
        raise HeadlensError(
            f"{path} is truncated: its header declares {8 + n + end} bytes but the file has {size}"
        )


class SafetensorsSource(TensorSource):
    """One or more safetensors files (a sharded checkpoint maps each tensor to its shard)."""

    def __init__(self, files: dict[str, Path] | Path, description: str = ""):
        from safetensors import safe_open

        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        paths = [files] if isinstance(files, Path) else sorted(set(files.values()))
        for path in paths:
            _check_safetensors_header(path)
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise HeadlensError(f"{path} is not a valid safetensors file ({exc})") from None
            self._handles[path] = handle
            for k in handle.keys():
                self._where[k] = path
        if not isinstance(files, Path):
            missing = [k for k, p in files.items() if k not in self._where]
            if missing:
                raise HeadlensError(
                    f"the shard index names {len(missing)} tensors that its shards do not hold "
                    f"(first: {missing[0]})"
                )
        self.description = description or str(paths[0])

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, name: str):
        try:
            return self._handles[self._where[name]].get_slice(name)
        except KeyError:
            raise HeadlensError(f"tensor {name!r} not found in {self.description}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self._slice(name).get_dtype())

    def read(self, name: str, index: Index = None) -> torch.Tensor:
        sl = self._slice(name)
        try:
            return sl[:] if index is None else sl[index]
        except Exception as exc:
            raise HeadlensError(f"cannot read tensor {name!r} from {self.description}: {exc}") from None


class StateDictSource(TensorSource):
    """A ``torch.save``'d state dict, loaded with ``weights_only=True`` (memory-mapped when possible)."""

    def __init__(self, paths: Iterable[Path], description: str = ""):
        self._tensors: dict[str, torch.Tensor] = {}
        for path in paths:
            self._tensors.update(_load_state_dict(path))
        self.description = description or ", ".join(str(p) for p in paths)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise HeadlensError(f"tensor {name!r} not found in {self.description}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def read(self, name: str, index: Index = None) -> torch.Tensor:
        t = self._get(name)
        return t if index is None else t[index]


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as exc:
        raise HeadlensError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeadlensError(f"{path} is not a loadable torch state dict ({first})") from None
    # Accept the common wrappers {"state_dict": {...}} / {"model": {...}}.
    if isinstance(obj, dict) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise HeadlensError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise HeadlensError(f"{path} holds no tensors")
    return tensors


def open_path(path: Path) -> TensorSource:
    """Open a checkpoint file or HuggingFace directory as a TensorSource."""
    if not path.exists():
        raise HeadlensError(f"--weights {path}: no such file or directory")
    if path.is_dir():
        return _open_dir(path)
    if not os.access(path, os.R_OK):
        raise HeadlensError(f"--weights {path}: permission denied")
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in STATE_DICT_SUFFIXES:
        return StateDictSource([path])
    raise HeadlensError(f"--weights {path}: unsupported file type {path.suffix!r}; expected {ACCEPTED}")


def _open_dir(path: Path) -> TensorSource:
    for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise HeadlensError(f"{index} is not a valid shard index ({exc})") from None
            files = {k: path / v for k, v in weight_map.items()}
            absent = sorted({str(p) for p in files.values() if not p.exists()})
            if absent:
                raise HeadlensError(f"{index} names shard files that are missing: {', '.join(absent[:3])}")
            if kind == "st":
                return SafetensorsSource(files, description=str(path))
            return StateDictSource(sorted(set(files.values())), description=str(path))
    single = path / "model.safetensors"
    if single.exists():
        return SafetensorsSource(single, description=str(path))
    sts = sorted(path.glob("*.safetensors"))
    if len(sts) == 1:
        return SafetensorsSource(sts[0], description=str(path))
    for name in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (path / name).exists():
            return StateDictSource([path / name], description=str(path))
    raise HeadlensError(
        f"--weights {path}: directory has no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin"
    )


def read_safetensors_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json`` (tensor name -> shard file name)."""
    try:
        return dict(json.loads(path.read_text())["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadlensError(f"{path} is not a valid shard index ({exc})") from None
