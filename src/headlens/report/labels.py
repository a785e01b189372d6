"""Tick labels and titles that stay readable whatever the input size: which positions to label, how to print a
token as a label, and a title wrapped to the figure's width. Shared by the attention heatmap and the router
figures; plain functions of numbers and strings (no matplotlib)."""

from __future__ import annotations

import math
import textwrap

MAX_TICK_LABELS = 40  # labels per axis at most; up to this many positions, every one is labelled
CHAR_WIDTH_EM = 0.62  # a DejaVu Sans character is at most about this many em wide on average (for wrapping)


def tick_step(n: int, most: int = MAX_TICK_LABELS) -> int:
    """The stride between labelled positions of an axis of ``n`` positions: 1 when ``n <= most``, else the
    smallest of 2, 5, 10, 20, 50, 100, ... that leaves at most ``most`` labels."""
    if n <= most:
        return 1
    need = n / most
    exp = 10 ** math.floor(math.log10(need))
    for m in (1, 2, 5, 10):
        if m * exp >= need:
            return int(m * exp)
    return int(10 * exp)  # pragma: no cover - the loop always returns


def tick_positions(n: int, most: int = MAX_TICK_LABELS) -> list[int]:
    """The positions 0, s, 2s, ... < ``n`` to label (``s = tick_step(n, most)``); at most ``most`` of them."""
    return list(range(0, n, tick_step(n, most)))


def token_label(token: str, width: int = 14) -> str:
    """A token as a tick label: escaped like ``repr`` (whitespace-only tokens keep their quotes), ``$`` kept
    literal (no mathtext), cut to ``width`` characters with an ellipsis."""
    text = repr(token)[1:-1] if token.strip() else repr(token)
    if len(text) > width:
        text = text[: width - 1] + "\u2026"
    return text.replace("$", r"\$")


def wrap_title(title: str, width_in: float, fontsize: float) -> str:
    """``title`` broken into lines that fit ``width_in`` inches at ``fontsize`` points."""
    chars = max(int(width_in * 72 / (CHAR_WIDTH_EM * fontsize)), 12)
    return "\n".join(textwrap.wrap(title, chars)) or title
