"""The lazy safetensors reader (headlens.io.tensors): reads give exactly what safetensors gives, touch only the
bytes asked for, and a damaged file is one HeadlensError line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from headlens.errors import HeadlensError
from headlens.io import tensors as tensors_mod
from headlens.io.tensors import SafetensorsSource, StateDictSource, open_path


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(6, 3, generator=g).to(torch.float16),
        "f32": torch.randn(9, 4, generator=g),
        "f64": torch.randn(3, 2, generator=g).double(),
        "i64": torch.arange(12).reshape(4, 3),
        "cube": torch.randn(4, 3, 2, generator=g),
        "vec": torch.randn(5, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture()
def st_file(tmp_path) -> Path:
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    return path


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8:8 + n])


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got, want)


def test_names_shapes_dtypes(st_file):
    src = SafetensorsSource(st_file)
    ref = load_file(str(st_file))
    assert sorted(src.keys()) == sorted(ref)
    for name, t in ref.items():
        assert src.shape(name) == tuple(t.shape)
        assert src.dtype(name) == t.dtype
        assert name in src


def test_whole_tensors_match_load_file(st_file):
    src = SafetensorsSource(st_file)
    for name, t in load_file(str(st_file)).items():
        _same(src.read(name), t)


@pytest.mark.parametrize("name", ["bf16", "fp16", "f32", "f64", "i64", "cube"])
@pytest.mark.parametrize("rows", [slice(0, 1), slice(2, 5), slice(None, 3), slice(4, None), slice(-2, None),
                                  slice(None), slice(3, 3), slice(0, 100)])
def test_row_blocks_match_load_file(st_file, name, rows):
    want = load_file(str(st_file))[name][rows]
    _same(SafetensorsSource(st_file).read(name, rows), want)


@pytest.mark.parametrize("name", ["bf16", "fp16", "f32"])
@pytest.mark.parametrize("index", [(slice(None), slice(1, 3)), (slice(1, 3), slice(0, 2)), (slice(2, 4), slice(-1, None)),
                                   (slice(None), slice(None))])
def test_row_and_column_index(st_file, name, index):
    want = load_file(str(st_file))[name][index]
    _same(SafetensorsSource(st_file).read(name, index), want)


def test_scalar_and_vector(st_file):
    src = SafetensorsSource(st_file)
    ref = load_file(str(st_file))
    _same(src.read("scalar"), ref["scalar"])
    assert src.shape("scalar") == ()
    _same(src.read("vec"), ref["vec"])
    _same(src.read("vec", slice(1, 4)), ref["vec"][1:4])
    _same(src.read("empty"), ref["empty"])


def test_strided_rows_are_refused(st_file):
    with pytest.raises(HeadlensError, match=r"strided row reads are not supported \(f32\)"):
        SafetensorsSource(st_file).read("f32", slice(0, 6, 2))


def test_unknown_tensor(st_file):
    with pytest.raises(HeadlensError, match="tensor 'nope' not found in"):
        SafetensorsSource(st_file).read("nope")


@pytest.mark.parametrize("name,rows", [("f32", slice(3, 6)), ("bf16", slice(0, 2)), ("cube", slice(1, 2)),
                                       ("vec", slice(2, 3))])
def test_read_touches_only_the_requested_bytes(st_file, tmp_path, monkeypatch, name, rows):
    """Every data byte outside the requested rows is overwritten with garbage (0xff: NaN for floats), and the
    bytes the reader takes from the file are counted: exactly the rows' bytes, nothing else."""
    start, header = _header(st_file)
    want = load_file(str(st_file))[name][rows]
    begin, _ = header[name]["data_offsets"]
    row_bytes = want[0].numel() * want.element_size() if want.dim() > 1 else want.element_size()
    lo = start + begin + rows.start * row_bytes
    hi = lo + want.numel() * want.element_size()
    raw = bytearray(st_file.read_bytes())
    raw[start:lo] = b"\xff" * (lo - start)
    raw[hi:] = b"\xff" * (len(raw) - hi)
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(bytes(raw))
    src = SafetensorsSource(garbled)  # the header is read here, before counting

    counted: list[tuple[int, int]] = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def seek(self, pos, *args):
            return self.fh.seek(pos, *args)

        def readinto(self, buf):
            pos = self.fh.tell()
            got = self.fh.readinto(buf)
            counted.append((pos, got))
            return got

        def read(self, *args):  # pragma: no cover - the reader uses readinto; fail loudly if that changes
            raise AssertionError("unexpected read()")

    monkeypatch.setattr(tensors_mod, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    got = src.read(name, rows)
    _same(got, want)
    assert counted == [(lo, hi - lo)]


def test_bytes_outside_a_tensor_do_not_matter(st_file, tmp_path):
    """A whole-tensor read of ``f32`` is unchanged when every other tensor's bytes are garbage."""
    start, header = _header(st_file)
    begin, end = header["f32"]["data_offsets"]
    raw = bytearray(st_file.read_bytes())
    for i in range(start, len(raw)):
        if not start + begin <= i < start + end:
            raw[i] = 0xFF
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(bytes(raw))
    _same(SafetensorsSource(garbled).read("f32"), load_file(str(st_file))["f32"])


# ------------------------------------------------------------------------------------------ damaged files


def _one_line_error(path: Path) -> str:
    with pytest.raises(HeadlensError) as info:
        SafetensorsSource(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_file(st_file, tmp_path):
    raw = st_file.read_bytes()
    start, _ = _header(st_file)
    for cut in (len(raw) - 1, start + 10, (start + len(raw)) // 2):
        f = tmp_path / f"cut{cut}.safetensors"
        f.write_bytes(raw[:cut])
        msg = _one_line_error(f)
        assert "is truncated: its header declares" in msg and f"but the file has {cut}" in msg


def _with_header(tmp_path: Path, header: dict | bytes | list, data: bytes = b"", name: str = "h") -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    f = tmp_path / f"{name}.safetensors"
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return f


@pytest.mark.parametrize("make,expect", [
    (lambda d: _with_header(d, b"{not json"), "is not a valid safetensors file"),
    (lambda d: _with_header(d, [1, 2]), "is not a valid safetensors file (header is not a JSON object)"),
    (lambda d: _with_header(d, {"x": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}, b"\0\0\0"),
     "tensor 'x' has dtype F6_E3M2, which headlens cannot read (it reads F64, F32"),
    (lambda d: _with_header(d, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8),
     "bad entry for 'x': byte range does not match shape and dtype"),
    (lambda d: _with_header(d, {"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "bad entry for 'x'"),
    (lambda d: _with_header(d, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     "is truncated: its header declares"),
])
def test_bad_header(tmp_path, make, expect):
    assert expect in _one_line_error(make(tmp_path))


def test_header_length_past_the_end_and_short_file(tmp_path):
    f = tmp_path / "long.safetensors"
    f.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    assert "header length points past the end of the file" in _one_line_error(f)
    f = tmp_path / "short.safetensors"
    f.write_bytes(b"\x01\x02")
    assert "file shorter than the 8-byte header length" in _one_line_error(f)


def test_file_shrunk_after_opening(st_file, tmp_path):
    f = tmp_path / "shrinks.safetensors"
    f.write_bytes(st_file.read_bytes())
    src = SafetensorsSource(f)
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(HeadlensError, match="ended early while reading 'empty'|ended early while reading"):
        for name in src.keys():
            src.read(name)


def test_shard_index_naming_missing_tensors(st_file):
    with pytest.raises(HeadlensError, match=r"the shard index names 1 tensors that its shards do not hold "
                                            r"\(first: ghost\)"):
        SafetensorsSource({"f32": st_file, "ghost": st_file})


def test_open_path_errors_name_the_weights_parameter(tmp_path):
    with pytest.raises(HeadlensError, match=r"^`weights` .*nope\.safetensors: no such file or directory$"):
        open_path(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(HeadlensError, match=r"^`weights` .*w\.npz: unsupported file type '\.npz'"):
        open_path(tmp_path / "w.npz")


def test_state_dict_source_reads_the_same_blocks(st_file, tmp_path):
    ref = load_file(str(st_file))
    pt = tmp_path / "sd.pt"
    torch.save(ref, pt)
    src, st = StateDictSource([pt]), SafetensorsSource(st_file)
    for name in ("bf16", "f32", "cube"):
        assert src.shape(name) == st.shape(name) and src.dtype(name) == st.dtype(name)
        for index in (None, slice(1, 3), (slice(0, 2), slice(1, 2))):
            _same(src.read(name, index), st.read(name, index))
