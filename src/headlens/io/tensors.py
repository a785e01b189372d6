"""Lazy tensor access over every checkpoint format headlens accepts.

A :class:`TensorSource` lists tensor names and shapes and reads one tensor, or a row/column block of
one, on demand. Safetensors files are read with positional reads of just the requested bytes (row blocks
are contiguous), never memory-mapped, so memory stays bounded by what the caller holds; ``.pt``/``.bin``
state dicts go through ``torch.load(weights_only=True, mmap=True)``.
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

    def is_quantized(self, name: str) -> bool:
        """Whether tensor ``name`` is a weight stored quantized (read dequantized): never, for a plain source."""
        return False

    @property
    def stored(self) -> "TensorSource":
        """The tensors as the files store them (a dequantizing view answers its underlying source): what identifies
        the checkpoint's content."""
        return self


_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "U16": (torch.uint16, 2), "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8), "C64": (torch.complex64, 8),
}
# The fp8 formats of quantized checkpoints (their numbers are codes: headlens.io.quantized reads them with their
# scales and refuses them alone).
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = (getattr(torch, _attr), 1)


def _read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header dict); checks the file holds every byte its header declares."""
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
            begin, stop = (int(v) for v in info["data_offsets"])
            if info["dtype"] not in _ST_DTYPES:
                raise HeadlensError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which headlens cannot read "
                                    f"(it reads {', '.join(_ST_DTYPES)})")
            n_el = 1
            for dim in info["shape"]:
                n_el *= int(dim)
            if stop - begin != n_el * _ST_DTYPES[info["dtype"]][1] or begin < 0:
                raise ValueError("byte range does not match shape and dtype")
            end = max(end, stop)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise HeadlensError(f"{path} is not a valid safetensors file (bad entry for {name!r}: {exc})") from None
    if 8 + n + end > size:
        raise HeadlensError(
            f"{path} is truncated: its header declares {8 + n + end} bytes but the file has {size}"
        )
    return 8 + n, header


class SafetensorsSource(TensorSource):
    """One or more safetensors files (a sharded checkpoint maps each tensor to its shard).

    Tensors are read with positional reads of just the bytes asked for (a row block is one contiguous
    range), not through a memory map: pages of a mapped file stay resident while it is open, so a sweep
    over a model larger than RAM would grow without bound. Memory is what the returned tensors hold.
    """

    def __init__(self, files: dict[str, Path] | Path, description: str = ""):
        self._info: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        paths = [files] if isinstance(files, Path) else sorted(set(files.values()))
        for path in paths:
            data_start, header = _read_safetensors_header(path)
            for k, info in header.items():
                if k == "__metadata__":
                    continue
                b, e = info["data_offsets"]
                self._info[k] = (path, info["dtype"], tuple(int(x) for x in info["shape"]), data_start + b,
                                 data_start + e)
        if not isinstance(files, Path):
            missing = [k for k in files if k not in self._info]
            if missing:
                raise HeadlensError(
                    f"the shard index names {len(missing)} tensors that its shards do not hold "
                    f"(first: {missing[0]})"
                )
        self.description = description or str(paths[0])

    def keys(self) -> list[str]:
        return list(self._info)

    def _get(self, name: str):
        try:
            return self._info[name]
        except KeyError:
            raise HeadlensError(f"tensor {name!r} not found in {self.description}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get(name)[2]

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self._get(name)[1]][0]

    def read(self, name: str, index: Index = None) -> torch.Tensor:
        path, st_dtype, shape, begin, end = self._get(name)
        dtype, itemsize = _ST_DTYPES[st_dtype]
        rows, cols = (index if isinstance(index, tuple) else (index, None)) if index is not None else (None, None)
        row_len = 1
        for dim in shape[1:]:
            row_len *= dim
        lo, hi = 0, shape[0] if shape else 1
        if rows is not None and shape:
            lo, hi, step = rows.indices(shape[0])
            if step != 1:
                raise HeadlensError(f"strided row reads are not supported ({name})")
        count = max(hi - lo, 0) * row_len if shape else 1
        buf = bytearray(count * itemsize)
        try:
            with open(path, "rb", buffering=0) as fh:
                fh.seek(begin + lo * row_len * itemsize)
                got = fh.readinto(buf)
        except OSError as exc:
            raise HeadlensError(f"cannot read tensor {name!r} from {path}: {exc.strerror or exc}") from None
        if got != len(buf):
            raise HeadlensError(f"{path} ended early while reading {name!r}")
        t = torch.frombuffer(buf, dtype=dtype) if count else torch.empty(0, dtype=dtype)
        t = t.reshape((max(hi - lo, 0),) + tuple(shape[1:])) if shape else t.reshape(())
        if cols is not None:
            t = t[:, cols]
        return t


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
        raise HeadlensError(f"`weights` {path}: no such file or directory")
    if path.is_dir():
        return _open_dir(path)
    if not os.access(path, os.R_OK):
        raise HeadlensError(f"`weights` {path}: permission denied")
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in STATE_DICT_SUFFIXES:
        return StateDictSource([path])
    raise HeadlensError(f"`weights` {path}: unsupported file type {path.suffix!r}; expected {ACCEPTED}")


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
        f"`weights` {path}: directory has no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin"
    )


def read_safetensors_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json`` (tensor name -> shard file name)."""
    try:
        return dict(json.loads(path.read_text())["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadlensError(f"{path} is not a valid shard index ({exc})") from None
