"""What every figure module shares: matplotlib on the Agg backend, and saving a PNG atomically.

Never imported by the computation modules; each command's figures live in its own report module
(``report/ov.py``, ``report/router.py``, ...)."""

from __future__ import annotations

from pathlib import Path

from headlens.io.files import atomic_path


def _pyplot():
    import logging

    import matplotlib

    # mathtext ($W_{OV}$ in titles) looks for STIX/Computer Modern fonts first and logs each fallback to DejaVu
    # Sans as a warning; the fallback is what we draw with, so those lines are noise on a user's terminal.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (temporary name, then rename) and close it; returns ``path``."""
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)
