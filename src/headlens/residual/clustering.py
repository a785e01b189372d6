"""How clustered the tokens of one layer are, measured on the full-width tokens normalised to unit norm.

Definitions (DOMAIN.md): the mean pairwise cosine and its histogram, the number of clusters at a cosine
threshold (connected components of the graph ``cos >= threshold``, i.e. single linkage), the effective rank
(Roy & Vetterli: ``exp`` of the entropy of the normalised singular values), and a baseline from random
isotropic directions of the same count and width (anisotropy = mean cosine above that baseline). The summary
sentences of ``headlens sphere`` are computed from those numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COS_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HIST_BINS = 40


@dataclass
class LayerMetrics:
    """Clustering statistics of one layer's tokens (N of them, after any dropping)."""

    layer: int
    n_tokens: int
    mean_cos: float  # mean pairwise cosine of the full-width normalised tokens (off-diagonal)
    cos_quantiles: dict[str, float]  # "q05", "q25", "q50", "q75", "q95" of the pairwise cosines
    cos_hist: list[int]  # HIST_BINS bins over [-1, 1]
    n_clusters: int  # connected components of cos >= threshold
    largest_cluster: int
    effective_rank: float
    baseline_mean_cos: float  # same N, same width, random isotropic directions
    baseline_effective_rank: float
    anisotropy: float  # mean_cos - baseline_mean_cos
    mean_norm: float  # mean residual norm (before normalising)
    explained_variance_3: float  # fraction of the layer's variance the 3-D picture keeps


def _components(adj: np.ndarray) -> list[int]:
    """Sizes of the connected components of a boolean (N, N) adjacency matrix (union-find), largest first."""
    n = adj.shape[0]
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(adj, 1))):
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[ri] = rj
    sizes: dict[int, int] = {}
    for i in range(n):
        r = root(i)
        sizes[r] = sizes.get(r, 0) + 1
    return sorted(sizes.values(), reverse=True)


def effective_rank(X: torch.Tensor) -> float:
    """Roy & Vetterli effective rank of X (N, d): exp(entropy of sigma_i / sum sigma)."""
    s = torch.linalg.svdvals(X.double())
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _cos_stats(U: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(off-diagonal cosines (N * (N - 1),), cosine matrix (N, N)) of unit rows U (N, d)."""
    C = U @ U.T  # (N, N)
    n = C.shape[0]
    off = C[~torch.eye(n, dtype=torch.bool)].numpy()
    return off, C


def clustering_metrics(X: torch.Tensor, layer: int, threshold: float, seed: int,
                       explained3: float = float("nan")) -> LayerMetrics:
    """Clustering statistics of the tokens X (N, d) after normalising each to unit norm; the random baseline
    is seeded by ``seed`` and ``layer``. Returns a :class:`LayerMetrics`."""
    assert X.ndim == 2, f"X must be (N, d), got shape {tuple(X.shape)}"
    X = X.double()
    norms = X.norm(dim=1)  # (N,)
    U = X / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]  # (N, d) unit rows
    off, C = _cos_stats(U)
    sizes = _components((C >= threshold).numpy())
    gen = torch.Generator().manual_seed(seed + 7919 * layer)
    R = torch.randn(X.shape, generator=gen, dtype=torch.float64)  # (N, d)
    R = R / R.norm(dim=1, keepdim=True)
    base_off, _ = _cos_stats(R)
    qs = np.quantile(off, COS_QUANTILES)
    hist, _ = np.histogram(off, bins=HIST_BINS, range=(-1.0, 1.0))
    mean_cos = float(off.mean())
    base = float(base_off.mean())
    return LayerMetrics(
        layer=layer,
        n_tokens=int(X.shape[0]),
        mean_cos=mean_cos,
        cos_quantiles={f"q{int(q * 100):02d}": float(v) for q, v in zip(COS_QUANTILES, qs)},
        cos_hist=hist.astype(int).tolist(),
        n_clusters=len(sizes),
        largest_cluster=sizes[0],
        effective_rank=effective_rank(U),
        baseline_mean_cos=base,
        baseline_effective_rank=effective_rank(R),
        anisotropy=mean_cos - base,
        mean_norm=float(norms.mean()),
        explained_variance_3=explained3,
    )


def _trend(first: LayerMetrics, last: LayerMetrics, peak: LayerMetrics) -> str:
    """How the mean pairwise cosine moves from the first to the last layer, as a clause."""
    delta = last.mean_cos - first.mean_cos
    if peak.mean_cos - max(first.mean_cos, last.mean_cos) > 0.1 and peak is not first and peak is not last:
        return (f"gather towards shared directions up to layer {peak.layer} (mean pairwise cosine "
                f"{first.mean_cos:.2f} -> {peak.mean_cos:.2f}) and spread again by layer {last.layer} "
                f"({last.mean_cos:.2f})")
    if delta > 0.05:
        return (f"draw together through depth: mean pairwise cosine rises from {first.mean_cos:.2f} at layer "
                f"{first.layer} to {last.mean_cos:.2f} at layer {last.layer}")
    if delta < -0.05:
        return (f"spread apart through depth: mean pairwise cosine falls from {first.mean_cos:.2f} at layer "
                f"{first.layer} to {last.mean_cos:.2f} at layer {last.layer}")
    return (f"keep about the same spread: mean pairwise cosine stays near {first.mean_cos:.2f} "
            f"(layer {first.layer}: {first.mean_cos:.2f}, layer {last.layer}: {last.mean_cos:.2f})")


def summarize(m: list[LayerMetrics], threshold: float) -> list[str]:
    """One or two sentences about the tokens through depth, computed from the per-layer metrics."""
    if len(m) < 2:
        x = m[0]
        return [f"Only layer {x.layer} was selected: its tokens have mean pairwise cosine {x.mean_cos:.2f} "
                f"(random directions: {x.baseline_mean_cos:.2f}) and form {x.n_clusters} clusters at cosine >= "
                f"{threshold:g}."]
    first, last = m[0], m[-1]
    peak = max(m, key=lambda x: x.mean_cos)
    fewest = min(m, key=lambda x: x.n_clusters)
    base = float(np.mean([x.baseline_mean_cos for x in m]))
    s1 = (f"The {first.n_tokens} tokens {_trend(first, last, peak)}, against {base:.2f} for random directions; "
          f"clusters at cosine >= {threshold:g} go from {first.n_clusters} to {last.n_clusters} "
          f"(fewest: {fewest.n_clusters} at layer {fewest.layer}).")
    ev = [x.explained_variance_3 for x in m]
    s2 = (f"Effective rank goes from {first.effective_rank:.1f} to {last.effective_rank:.1f} "
          f"(random: {first.baseline_effective_rank:.1f}); the 3-D pictures keep {min(ev):.0%}-{max(ev):.0%} "
          f"of each layer's variance, so read them as a {'rough sketch' if min(ev) < 0.3 else 'fair view'} of "
          f"the full-width geometry.")
    return [s1, s2]
