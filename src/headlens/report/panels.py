"""A grid of fixed-size panels placed with room for each one's labels, measured rather than guessed.

matplotlib's constrained and tight layouts do not settle on axes of fixed aspect (an image): they reserve margins
for the box they planned, then the image shrinks inside it, and labels end up on the neighbour or off the figure.
:func:`place_panels` instead measures how far each panel's title, axis labels and tick labels reach beyond its
box, gives every column and row that much room, and sizes the figure to fit: panels keep the size asked for,
nothing overlaps, nothing is clipped.
"""

from __future__ import annotations

from typing import Sequence

PAD_IN = 0.1  # inches between neighbours and at the figure's edge


def _overhang(ax, renderer, dpi: float) -> tuple[float, float, float, float]:
    """How far ``ax``'s decorations reach beyond its box, in inches: (left, right, bottom, top)."""
    box, bb = ax.get_window_extent(renderer), ax.get_tightbbox(renderer)
    return (max(box.x0 - bb.x0, 0) / dpi, max(bb.x1 - box.x1, 0) / dpi, max(box.y0 - bb.y0, 0) / dpi,
            max(bb.y1 - box.y1, 0) / dpi)


def place_panels(fig, grid: Sequence[Sequence[object | None]], panel_in: tuple[float, float], cax=None,
                 cbar_in: float = 0.18, title: str | None = None, title_size: float = 11) -> tuple[float, float]:
    """Place the axes of ``grid`` (rows of axes, ``None`` for an empty slot), each ``panel_in`` (width, height)
    inches, a colour bar axes ``cax`` (``cbar_in`` wide, as tall as the grid) on the right, and ``title`` wrapped
    above; resize ``fig`` to fit. Draw everything on the axes first: their labels are measured here.
    Returns the figure size in inches (width, height)."""
    from headlens.report.labels import wrap_title

    pw, ph = panel_in
    rows, cols = len(grid), max(len(r) for r in grid)
    fig.set_size_inches(cols * (pw + 2) + 2, rows * (ph + 2) + 2)  # provisional: room to measure in
    for r, row in enumerate(grid):  # provisional boxes of the final size (the tick locators see their length)
        for c, ax in enumerate(row):
            if ax is not None:
                ax.set_position(_frac(fig, 1 + c * (pw + 2), 1 + (rows - 1 - r) * (ph + 2), pw, ph))
    if cax is not None:
        cax.set_position(_frac(fig, 1, 1, cbar_in, rows * ph))
    renderer = fig.canvas.get_renderer()
    dpi = fig.dpi
    hang = {(r, c): _overhang(ax, renderer, dpi) for r, row in enumerate(grid) for c, ax in enumerate(row)
            if ax is not None}
    left = [max((hang[k][0] for k in hang if k[1] == c), default=0) for c in range(cols)]
    right = [max((hang[k][1] for k in hang if k[1] == c), default=0) for c in range(cols)]
    bottom = [max((hang[k][2] for k in hang if k[0] == r), default=0) for r in range(rows)]
    top = [max((hang[k][3] for k in hang if k[0] == r), default=0) for r in range(rows)]
    xs, x = [], PAD_IN
    for c in range(cols):
        xs.append(x + left[c])
        x = xs[-1] + pw + right[c] + PAD_IN
    cbar_x = x + 0.1
    if cax is not None:
        x = cbar_x + cbar_in + _overhang(cax, renderer, dpi)[1] + PAD_IN
    width = x
    title_in = 0.0
    text = None
    if title:
        text = fig.suptitle(wrap_title(title, width - 2 * PAD_IN, title_size), fontsize=title_size, va="top")
        title_in = text.get_window_extent(renderer).height / dpi + PAD_IN
    tops, y = [], PAD_IN + title_in  # measured down from the top edge
    for r in range(rows):
        tops.append(y + top[r])
        y = tops[-1] + ph + bottom[r] + PAD_IN
    height = y
    fig.set_size_inches(width, height)
    for r, row in enumerate(grid):
        for c, ax in enumerate(row):
            if ax is not None:
                ax.set_position(_frac(fig, xs[c], height - tops[r] - ph, pw, ph))
    if cax is not None:
        span = tops[-1] + ph - tops[0]
        cax.set_position(_frac(fig, cbar_x, height - tops[0] - span, cbar_in, span))
    if text is not None:
        text.set_y(1 - PAD_IN / height)
    return width, height


def _frac(fig, x: float, y: float, w: float, h: float) -> list[float]:
    """An axes box given in inches from the bottom-left corner, as figure fractions."""
    fw, fh = fig.get_size_inches()
    return [x / fw, y / fh, w / fw, h / fh]
