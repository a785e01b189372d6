"""Tables as CSV and Parquet: lists of dicts of scalars written atomically, and read back to the same rows.

Cells are int, float, str, bool or None (numpy scalars are unwrapped). CSV floats are written with ``repr`` so
they read back bit-exactly; Parquet columns get one type each (int64, float64, bool, string or null). pyarrow
is imported only by the functions that need it.

- ``write_table(stem, rows)`` -> ``<stem>.csv``, ``<stem>.parquet``; ``write_csv``, ``write_parquet``
- ``read_table(path)``        -> the rows, every row with every column (absent cells as None)
"""

from __future__ import annotations

import csv
import re
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from headlens.errors import HeadlensError
from headlens.io.files import atomic_path

__all__ = ["write_table", "write_csv", "write_parquet", "read_table", "columns", "pyarrow_parquet"]


# ------------------------------------------------------------------------------------------------ values

def _plain(value: Any, where: str) -> Any:
    """A table cell as a Python scalar: None, bool, int, float or str (numpy scalars unwrapped)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, (bool, str)):
            return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    raise HeadlensError(f"{where}: unsupported value {value!r} ({type(value).__name__}); "
                        "table cells must be int, float, str, bool or None")


def columns(rows: Sequence[dict]) -> list[str]:
    """Union of the rows' keys in first-seen order."""
    if isinstance(rows, dict) or not isinstance(rows, Sequence):
        raise HeadlensError("rows must be a list of dicts")
    seen: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise HeadlensError(f"row {i} must be a dict, got {type(row).__name__}")
        for key in row:
            if not isinstance(key, str):
                raise HeadlensError(f"row {i}: column names must be strings, got {key!r}")
            seen.setdefault(key, None)
    return list(seen)


def _stem_with(stem: Path, suffix: str) -> Path:
    stem = Path(stem)
    return stem.with_name(stem.name + suffix)  # not with_suffix: "Qwen3-0.6B_heads" has a dot


# ------------------------------------------------------------------------------------------------ tables

def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest string that parses back to the same double ('nan', 'inf' included)
    return str(value)


_INT_RE = re.compile(r"[-+]?\d+\Z")
_FLOAT_RE = re.compile(r"[-+]?(?:(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf)\Z")


def _parse_csv_cell(text: str) -> Any:
    """Inverse of ``_csv_cell``: '' -> None, '3' -> 3, '3.0' -> 3.0, 'true' -> True, anything else a str."""
    if text == "":
        return None
    if _INT_RE.match(text):
        return int(text)
    if _FLOAT_RE.match(text):
        return float(text)
    if text == "true":
        return True
    if text == "false":
        return False
    return text


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as CSV (atomically) and return ``path``.

    Header: the union of the rows' keys in first-seen order; a missing key or None is an empty cell; floats
    are written with ``repr`` (round-trips exactly, ``nan``/``inf`` included), bools as ``true``/``false``.
    """
    cols = columns(rows)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            if cols:
                writer.writerow(cols)
            for i, row in enumerate(rows):
                writer.writerow([_csv_cell(_plain(row.get(c), f"row {i}, column {c!r}")) for c in cols])
    return path


def _arrow_column(name: str, values: list[Any]):
    """One pyarrow array: int64 (nulls allowed), float64 (ints promoted), bool, string, or all-null."""
    import pyarrow as pa

    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        typ = pa.null()
    elif kinds == {bool}:
        typ = pa.bool_()
    elif kinds == {int}:
        typ = pa.int64()
    elif kinds <= {int, float}:
        typ = pa.float64()
        values = [None if v is None else float(v) for v in values]
    elif kinds == {str}:
        typ = pa.string()
    else:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise HeadlensError(f"column {name!r} mixes value types ({names}); Parquet needs one type per column")
    try:
        return pa.array(values, type=typ)
    except (pa.ArrowInvalid, OverflowError) as exc:
        raise HeadlensError(f"column {name!r}: {exc}") from None


def pyarrow_parquet():
    """``pyarrow.parquet``, or a HeadlensError saying how to install it."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise HeadlensError("writing or reading Parquet needs pyarrow: pip install pyarrow") from None
    return pq


def write_parquet(path: Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as a Parquet file (atomically) and return ``path``.

    One column per key (first-seen order). Column types: int64 when every non-null value is an int (nulls
    allowed), float64 when the values are floats or a mix of ints and floats, bool, string, or null when
    every value is None. A column that mixes numbers with strings or bools raises HeadlensError.
    """
    pq = pyarrow_parquet()
    import pyarrow as pa

    cols = columns(rows)
    arrays = []
    for c in cols:
        values = [_plain(row.get(c), f"row {i}, column {c!r}") for i, row in enumerate(rows)]
        arrays.append(_arrow_column(c, values))
    table = pa.Table.from_arrays(arrays, names=cols) if cols else pa.table({})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


def write_table(path_stem: Path, rows: Sequence[dict]) -> list[Path]:
    """Write ``rows`` to ``<path_stem>.csv`` and ``<path_stem>.parquet``; returns ``[csv_path, parquet_path]``.

    ``rows``: a list of dicts of scalars (int, float, str, bool, None; numpy scalars are unwrapped). Both
    files hold the union of the keys in first-seen order; ``read_table`` reads either back to the same rows
    (every row then has every column, absent keys as None). The one difference between the two formats: a
    column mixing ints and floats is float64 in Parquet, while the CSV keeps each cell's own type.
    """
    stem = Path(path_stem)
    return [write_csv(_stem_with(stem, ".csv"), rows), write_parquet(_stem_with(stem, ".parquet"), rows)]


def read_table(path: Path) -> list[dict]:
    """Read a table written by ``write_table``/``write_csv``/``write_parquet`` back into a list of dicts.

    The format follows the suffix (``.csv`` or ``.parquet``). Every row has every column in file order;
    empty cells and nulls are None, ints come back as int, floats as float (bit-exact), bools as bool.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise HeadlensError(f"cannot read {path}: the table format follows the suffix, .csv or .parquet")
    if not path.is_file():
        raise HeadlensError(f"table {path} does not exist")
    if suffix == ".parquet":
        pq = pyarrow_parquet()
        try:
            return pq.read_table(str(path)).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise HeadlensError(f"cannot read Parquet table {path}: {exc}") from None
    return _read_csv(path)


def _read_csv(path: Path) -> list[dict]:
    """The rows of a UTF-8 CSV file; a binary or non-UTF-8 file, or one the csv module cannot parse, is one
    HeadlensError naming the file (and the line)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                return []
            out = []
            for n, cells in enumerate(reader, start=2):
                if len(cells) != len(header):
                    raise HeadlensError(f"{path}:{n}: {len(cells)} cells, the header has {len(header)}")
                out.append({c: _parse_csv_cell(v) for c, v in zip(header, cells)})
            return out
    except UnicodeDecodeError as exc:
        raise HeadlensError(f"{path} is not a CSV table: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except csv.Error as exc:
        raise HeadlensError(f"{path} is not a CSV table: line {reader.line_num}: {exc}") from None
    except OSError as exc:
        raise HeadlensError(f"cannot read table {path}: {exc.strerror or exc}") from None
