"""The geometry of ``headlens sphere``: PCA to three dimensions (per layer, or one basis for every layer), points
put on the unit sphere, and the sign-fixed Procrustes rotation that aligns each layer's frame to the previous one
(the notebook's projection, seed ``003``), with the movement between frames it is judged by.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch


def pca(Xc: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions (d, k) and the explained-variance fractions (k,) of centred Xc (N, d)."""
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    total = (S**2).sum()
    frac = (S[:k] ** 2) / total if total > 0 else torch.zeros(k, dtype=Xc.dtype)
    V = Vh[:k].T  # (d, k)
    if V.shape[1] < k:  # fewer tokens than components: pad with zero directions
        V = torch.cat([V, torch.zeros(V.shape[0], k - V.shape[1], dtype=V.dtype)], 1)
        frac = torch.cat([frac, torch.zeros(k - frac.shape[0], dtype=frac.dtype)])
    return V, frac


def global_basis(centred: Callable[[], Iterator[torch.Tensor]], n: int, d: int, k: int = 3) -> torch.Tensor:
    """One (d, k) basis for every layer's centred tokens (``centred()`` yields each layer's (N, d), n rows in all)."""
    if n > d:  # accumulate the d x d covariance instead of stacking every layer's tokens
        C = sum(x.T @ x for x in centred())
        _, vecs = torch.linalg.eigh(C)
        return vecs[:, -k:].flip(1)
    V, _ = pca(torch.cat(list(centred())), k)  # n <= d: the stack is no larger than the covariance
    return V


def normalise(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of Y (N, 3) put on the unit sphere, their norms (N,) before)."""
    n = Y.norm(dim=1)
    return Y / torch.where(n > 0, n, torch.ones_like(n))[:, None], n


def procrustes_rotation(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Rotation R (3x3, det +1) minimising ||P R - Q||_F."""
    U, _, Vt = np.linalg.svd(P.T @ Q)
    D = np.eye(P.shape[1])
    D[-1, -1] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ D @ Vt


def align_to(P: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """(3x3) orthogonal map for P: sign fix per component, then Procrustes rotation (det +1)."""
    signs = np.sign(np.sum(P * prev, axis=0))
    signs[signs == 0] = 1.0
    S = np.diag(signs)
    return S @ procrustes_rotation(P @ S, prev)


def movement(frames: list[np.ndarray]) -> float:
    """Summed squared displacement of the tokens between consecutive frames (same tokens in each)."""
    return float(sum(np.sum((b - a) ** 2) for a, b in zip(frames, frames[1:])))
