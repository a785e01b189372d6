"""How a result shows itself in a notebook: ``repr(result)`` is a few lines that say what it is and how to see
more, never the thousands of numbers it holds (those are its fields and ``to_json()``).

Every result of ``import headlens`` builds its ``__repr__`` with :func:`short_repr`. No torch here.
"""

from __future__ import annotations

from typing import Any, Sequence

MAX_LINES = 8  # body lines shown; the rest is counted


def short_repr(obj: Any, title: str, lines: Sequence[str] = (), see: str = "to_json()") -> str:
    """``<ClassName title``, up to :data:`MAX_LINES` indented body lines (then ``... N more``), and a last line
    naming the fields and methods that hold the rest (``see``), closed by ``>``."""
    body = list(lines)
    if len(body) > MAX_LINES:
        body = body[:MAX_LINES] + [f"... {len(body) - MAX_LINES} more"]
    return "\n".join([f"<{type(obj).__name__} {title}", *(f"  {line}" for line in body), f"  see: {see}>"])


def strict(obj: Any) -> Any:
    """``obj`` (dicts, lists, tuples, scalars) with every float that JSON cannot hold (nan, inf) as None, so that
    ``json.dumps(..., allow_nan=False)`` takes it: the project's rule for an undefined number."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj
