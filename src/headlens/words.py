"""Counts in the words a person reads: ``count(1, "token")`` is "1 token", ``count(3, "token")`` "3 tokens"."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in the right number (``plural`` for irregular nouns; default ``noun + "s"``)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
