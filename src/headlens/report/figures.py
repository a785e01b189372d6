"""Figures. Takes plain arrays, saves PNGs atomically; never imported by the computation modules."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from headlens.io.files import atomic_path


def _pyplot():
    import matplotlib

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


def save_spectrum_plot(path: Path, singular_values: Sequence[float], energy: Sequence[float], latent_dim: int,
                       title: str, rank: int | None = None) -> Path:
    """Singular values (log scale) and cumulative energy with the latent dim marked."""
    plt = _pyplot()
    s = np.asarray(singular_values, dtype=float)
    e = np.asarray(energy, dtype=float)
    idx = np.arange(1, len(s) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    positive = s > 0
    ax1.semilogy(idx[positive], s[positive], marker=".", lw=1)
    ax1.axvline(latent_dim, color="C3", ls="--", lw=1, label=f"latent dim k={latent_dim}")
    if rank is not None and rank < len(s):
        ax1.axvline(rank, color="0.5", ls=":", lw=1, label=f"numerical rank {rank}")
    ax1.set_xlabel("index i")
    ax1.set_ylabel("singular value $\\sigma_i$")
    ax1.set_title("singular spectrum of $W_{OV}$")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.plot(idx, e, marker=".", lw=1)
    ax2.axvline(latent_dim, color="C3", ls="--", lw=1)
    if 0 < latent_dim <= len(e):
        ek = e[latent_dim - 1]
        ax2.axhline(ek, color="C3", ls=":", lw=1)
        ax2.annotate(f"E_{latent_dim} = {ek:.3f}", (latent_dim, ek), textcoords="offset points",
                     xytext=(6, -14), color="C3")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("k")
    ax2.set_ylabel("cumulative energy $E_k$")
    ax2.set_title("$E_k = \\sum_{i\\leq k} \\sigma_i^2 / \\sum_i \\sigma_i^2$")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def save_attention_heatmap(path: Path, probs: np.ndarray, tokens: Sequence[str], title: str) -> Path:
    """Attention probabilities (query rows x key columns) labelled with the decoded tokens."""
    plt = _pyplot()
    n = len(tokens)
    labels = [repr(t)[1:-1] if t.strip() else repr(t) for t in tokens]
    size = min(4 + 0.32 * n, 40)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=max(float(np.max(probs)), 1e-12), aspect="equal")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("key token (attended to)")
    ax.set_ylabel("query token")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
