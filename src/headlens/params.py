"""The shapes a public parameter may take, checked once: every config and entry point of ``import headlens`` runs
its arguments through these, so a wrong type is one :class:`HeadlensError` naming the parameter and the type it
expects, never a raw ``TypeError`` or a string silently iterated character by character.

- a list of texts (:func:`texts`) also takes one string, as one text; a ``Path`` is refused (read the file with
  :func:`headlens.io.files.read_text_lines`, ``headlens.read_texts``);
- a list of choices (:func:`choices`) or of numbers (:func:`integers`, :func:`numbers`) also takes one item;
- an integer is an ``int`` (numpy integers too), never a bool or a numeric string (``layer="3"`` is refused);
- a number is an int or a float; a flag is a bool.

No torch here: the configs that use it are built before anything heavy is imported.
"""

from __future__ import annotations

import numbers as _numbers
import os
from typing import Any, Iterable

from headlens.errors import HeadlensError


def _shown(value: Any) -> str:
    """``value``'s type and a short preview, for the messages: ``str '3'``, ``PosixPath 'calib.txt'``."""
    text = repr(os.fspath(value)) if isinstance(value, os.PathLike) else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _refuse(name: str, expected: str, value: Any, hint: str = "") -> HeadlensError:
    return HeadlensError(f"`{name}` must be {expected}, got {_shown(value)}{hint}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, _numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number that is not a bool (ints, floats, numpy scalars)."""
    return isinstance(value, _numbers.Real) and not isinstance(value, bool)


def integer(value: Any, name: str, optional: bool = False) -> int | None:
    """``value`` as an int (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if not is_int(value):
        raise _refuse(name, "an integer" + (" or None" if optional else ""), value)
    return int(value)


def number(value: Any, name: str, optional: bool = False) -> float | None:
    """``value`` as a float (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if not is_number(value):
        raise _refuse(name, "a number" + (" or None" if optional else ""), value)
    return float(value)


def flag(value: Any, name: str) -> bool:
    """``value`` as a bool (numpy bools included); ``"yes"``, 1 or None are refused."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise _refuse(name, "True or False", value)


def text(value: Any, name: str, optional: bool = True) -> str | None:
    """One text (str), or None when ``optional``; a list of texts is refused (this parameter takes one)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        hint = (": give one text" if isinstance(value, (list, tuple)) else
                ": read the file first, e.g. Path(path).read_text()" if isinstance(value, os.PathLike) else "")
        raise _refuse(name, "a text (str)" + (" or None" if optional else ""), value, hint)
    return value


def texts(value: Any, name: str, optional: bool = False) -> list[str] | None:
    """A list of texts: one str is one text; a list, tuple or other iterable of str as a list; a path is refused
    (read it with ``headlens.read_texts(path)``, one text per line). None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        return [value]
    expected = "a text or a list of texts (str)"
    if isinstance(value, os.PathLike):
        raise _refuse(name, expected, value, ": read the file first, e.g. headlens.read_texts(path) (one text per "
                                             "line)")
    if isinstance(value, (bytes, bytearray, dict)) or not isinstance(value, Iterable):
        raise _refuse(name, expected, value)
    out = list(value)
    for i, item in enumerate(out):
        if not isinstance(item, str):
            raise HeadlensError(f"`{name}` must be a list of texts (str), but item {i} is {_shown(item)}")
    return out


def choice(value: Any, name: str, allowed: Iterable[str]) -> str:
    """One of ``allowed`` (a str); anything else names the choices."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise HeadlensError(f"`{name}` {value!r}: choose {', '.join(allowed)}")
    return value


def choices(value: Any, name: str, allowed: Iterable[str]) -> list[str]:
    """A list of ``allowed`` strings; one str is one item (``"plain"`` -> ``["plain"]``)."""
    allowed = tuple(allowed)
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (bytes, dict, os.PathLike)) or not isinstance(items, Iterable):
        raise _refuse(name, f"one of {', '.join(allowed)} or a list of them", value)
    out = list(items)
    for item in out:
        if not isinstance(item, str) or item not in allowed:
            raise HeadlensError(f"`{name}` {item!r}: choose {', '.join(allowed)}")
    return out


def _scalars(value: Any, name: str, check, expected: str) -> list:
    items = [value] if check(value) else value
    if isinstance(items, (str, bytes, dict, os.PathLike)) or not isinstance(items, Iterable):
        raise _refuse(name, f"{expected} or a list of them", value)
    out = list(items)
    for i, item in enumerate(out):
        if not check(item):
            raise HeadlensError(f"`{name}` must be a list of {expected}s, but item {i} is {_shown(item)}")
    return out


def integers(value: Any, name: str) -> list[int]:
    """A list of ints; one int is one item."""
    return [int(v) for v in _scalars(value, name, is_int, "an integer")]


def numbers(value: Any, name: str) -> list[float]:
    """A list of floats; one number is one item."""
    return [float(v) for v in _scalars(value, name, is_number, "a number")]


def selection(value: Any, name: str) -> str | None:
    """A layer or latent-size selection as the text :mod:`headlens.selection` parses: a str as it is (``"0:4"``,
    ``"1,4,9"``, ``"all"``), one int, or a list of ints (``[1, 4, 9]`` -> ``"1,4,9"``); None passes."""
    if value is None or isinstance(value, str):
        return value
    if is_int(value):
        return str(int(value))
    if isinstance(value, range):
        value = list(value)
    if isinstance(value, (bytes, dict, os.PathLike)) or not isinstance(value, Iterable):
        raise _refuse(name, 'a selection: a str ("0:4", "1,4,9", "all"), an integer or a list of integers', value)
    items = list(value)
    for i, item in enumerate(items):
        if not is_int(item):
            raise HeadlensError(f"`{name}` must be a list of integers, but item {i} is {_shown(item)}")
    return ",".join(str(int(v)) for v in items)


def path(value: Any, name: str, optional: bool = True) -> str | os.PathLike | None:
    """A file system path (str or ``os.PathLike``); None passes when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise _refuse(name, "a path (str or pathlib.Path)" + (" or None" if optional else ""), value)
    return value


def instance(value: Any, name: str, cls: type, example: str) -> Any:
    """``value`` if it is a ``cls``; else one line naming the type expected and how to make one (``example``)."""
    if not isinstance(value, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise _refuse(name, f"{article} {cls.__name__} ({example})", value)
    return value
