"""Residual stream on the unit sphere: per-layer PCA to 3-D, alignment between layers, clustering metrics.

Definitions (DOMAIN.md):

- Per layer: centre the tokens, take the top-3 principal directions, project, divide each token by its
  norm so it lies on the unit sphere. The explained variance of the 3 components says how faithful the
  picture is.
- PCA signs and near-degenerate directions flip between layers: with ``align`` each layer's coordinates
  are aligned to the previous layer's (sign fix, then orthogonal Procrustes with det +1). Both steps only
  ever lower the summed squared movement of the tokens between consecutive frames (the identity is
  always a candidate), so alignment never increases it. ``basis="global"`` fits one basis on all layers.
- Clustering through depth is measured on the full-width tokens normalised to unit norm: mean pairwise
  cosine and its histogram, the number of clusters at a cosine threshold (connected components of the
  graph ``cos >= threshold``, i.e. single linkage), the effective rank (Roy & Vetterli: ``exp`` of the
  entropy of the normalised singular values), and a baseline from random isotropic directions of the
  same count and width (anisotropy = mean cosine above that baseline).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from headlens.errors import HeadlensError

COS_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HIST_BINS = 40


@dataclass
class SphereConfig:
    align: bool = True  # align each layer's 3-D basis to the previous one
    basis: str = "layer"  # "layer": PCA per layer; "global": one PCA basis for all selected layers
    drop_first: bool = False  # leave the first token out (attention sink of decoder models)
    drop_outliers: bool = False  # leave out tokens whose norm is > outlier_factor x the layer median
    outlier_factor: float = 8.0
    cluster_threshold: float = 0.9  # cosine threshold for counting clusters
    seed: int = 0  # random-direction baseline


@dataclass
class Frame:
    """One layer on the sphere. ``points`` (N, 3) unit rows; ``kept`` indexes the prompt's tokens."""

    layer: int
    points: np.ndarray  # (N, 3)
    norms3: np.ndarray  # (N,) norm of the 3-D projection before normalising
    full_norms: np.ndarray  # (N,) residual-stream norm of each kept token
    explained_variance: np.ndarray  # (3,) fraction of the layer's variance along each component
    kept: np.ndarray  # (N,) token positions kept

    @property
    def explained_total(self) -> float:
        return float(self.explained_variance.sum())


@dataclass
class Outlier:
    position: int
    token: str
    max_ratio: float  # largest norm / median-norm ratio over the selected layers
    layer: int  # where that ratio is reached
    norm: float


@dataclass
class LayerMetrics:
    layer: int
    n_tokens: int
    mean_cos: float  # mean pairwise cosine of the full-width normalised tokens (off-diagonal)
    cos_quantiles: dict[str, float]
    cos_hist: list[int]  # HIST_BINS bins over [-1, 1]
    n_clusters: int  # connected components of cos >= threshold
    largest_cluster: int
    effective_rank: float
    baseline_mean_cos: float  # same N, same width, random isotropic directions
    baseline_effective_rank: float
    anisotropy: float  # mean_cos - baseline_mean_cos
    mean_norm: float  # mean residual norm (before normalising)
    explained_variance_3: float


@dataclass
class SphereResult:
    layers: list[int]
    tokens: list[str]
    frames: list[Frame]
    metrics: list[LayerMetrics]
    outliers: list[Outlier]
    dropped: list[int]
    config: SphereConfig
    movement_aligned: float | None = None
    movement_unaligned: float | None = None
    summary: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "layers": self.layers,
            "tokens": self.tokens,
            "dropped_positions": self.dropped,
            "outliers": [asdict(o) for o in self.outliers],
            "config": asdict(self.config),
            "movement_aligned": self.movement_aligned,
            "movement_unaligned": self.movement_unaligned,
            "metrics": [asdict(m) for m in self.metrics],
            "frames": [
                {"layer": f.layer, "explained_variance": f.explained_variance.tolist(), "kept": f.kept.tolist(),
                 "points": f.points.tolist(), "norms3": f.norms3.tolist(), "full_norms": f.full_norms.tolist()}
                for f in self.frames
            ],
            "summary": self.summary,
        }


# ------------------------------------------------------------------------------------------- outliers


def find_outliers(hidden: dict[int, torch.Tensor], tokens: list[str], factor: float) -> list[Outlier]:
    """Tokens whose residual norm exceeds ``factor`` x the median norm of the layer, in any layer."""
    best: dict[int, Outlier] = {}
    for layer, X in hidden.items():
        norms = X.double().norm(dim=-1)  # (N,)
        med = float(norms.median())
        if med <= 0:
            continue
        ratios = norms / med
        for pos in torch.nonzero(ratios > factor).flatten().tolist():
            r = float(ratios[pos])
            if pos not in best or r > best[pos].max_ratio:
                best[pos] = Outlier(position=pos, token=tokens[pos], max_ratio=r, layer=layer, norm=float(norms[pos]))
    return sorted(best.values(), key=lambda o: o.position)


# ----------------------------------------------------------------------------------------- projection


def _pca(Xc: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions (d, k) and the explained-variance fractions (k,) of centred Xc (N, d)."""
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    total = (S**2).sum()
    frac = (S[:k] ** 2) / total if total > 0 else torch.zeros(k, dtype=Xc.dtype)
    V = Vh[:k].T
    if V.shape[1] < k:  # fewer tokens than components: pad with zero directions
        V = torch.cat([V, torch.zeros(V.shape[0], k - V.shape[1], dtype=V.dtype)], 1)
        frac = torch.cat([frac, torch.zeros(k - frac.shape[0], dtype=frac.dtype)])
    return V, frac


def _global_basis(centred: list[torch.Tensor], k: int = 3) -> torch.Tensor:
    d = centred[0].shape[1]
    n = sum(x.shape[0] for x in centred)
    if n > d:  # accumulate the d x d covariance instead of stacking every layer's tokens
        C = sum(x.T @ x for x in centred)
        _, vecs = torch.linalg.eigh(C)
        return vecs[:, -k:].flip(1)
    V, _ = _pca(torch.cat(centred), k)
    return V


def _normalise(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def project(hidden: dict[int, torch.Tensor], tokens: list[str], cfg: SphereConfig) -> SphereResult:
    """Project every layer of ``hidden`` (layer -> (N, d) residual stream) onto the unit sphere."""
    if not hidden:
        raise HeadlensError("no layers selected")
    if cfg.basis not in ("layer", "global"):
        raise HeadlensError(f"--basis {cfg.basis!r}: choose layer or global")
    layers = sorted(hidden)
    n = len(tokens)
    outliers = find_outliers(hidden, tokens, cfg.outlier_factor)
    drop = set()
    if cfg.drop_first:
        drop.add(0)
    if cfg.drop_outliers:
        drop.update(o.position for o in outliers)
    kept = np.array([i for i in range(n) if i not in drop], dtype=int)
    if len(kept) < 4:
        raise HeadlensError(f"only {len(kept)} tokens left after dropping: a sphere needs at least 4; use a "
                            "longer prompt or drop fewer tokens")
    idx = torch.from_numpy(kept)
    X = {l: hidden[l].double()[idx] for l in layers}  # (N, d) each
    centred = {l: X[l] - X[l].mean(0, keepdim=True) for l in layers}
    gbasis = _global_basis([centred[l] for l in layers]) if cfg.basis == "global" else None

    raw: list[np.ndarray] = []
    norms3: list[np.ndarray] = []
    evs: list[np.ndarray] = []
    for l in layers:
        Xc = centred[l]
        if gbasis is None:
            V, frac = _pca(Xc)
        else:
            V = gbasis
            total = (Xc**2).sum()
            frac = ((Xc @ V) ** 2).sum(0) / total if total > 0 else torch.zeros(3, dtype=Xc.dtype)
        Y = Xc @ V  # (N, 3)
        P, nrm = _normalise(Y)
        raw.append(P.numpy())
        norms3.append(nrm.numpy())
        evs.append(frac.numpy())

    unaligned_move = movement(raw)
    points = [raw[0]]
    if cfg.align and cfg.basis == "layer":
        for P in raw[1:]:
            points.append(P @ align_to(P, points[-1]))
    else:
        points = raw
    aligned_move = movement(points)

    frames = [Frame(layer=l, points=p, norms3=n3, full_norms=X[l].norm(dim=1).numpy(), explained_variance=ev,
                    kept=kept) for l, p, n3, ev in zip(layers, points, norms3, evs)]
    metrics = [clustering_metrics(X[l], l, cfg.cluster_threshold, cfg.seed, float(ev.sum()))
               for l, ev in zip(layers, evs)]
    result = SphereResult(layers=layers, tokens=tokens, frames=frames, metrics=metrics, outliers=outliers,
                          dropped=sorted(drop), config=cfg, movement_aligned=aligned_move,
                          movement_unaligned=unaligned_move)
    result.summary = summarize(result)
    return result


# -------------------------------------------------------------------------------------------- metrics


def _components(adj: np.ndarray) -> list[int]:
    """Sizes of the connected components of a boolean adjacency matrix (union-find)."""
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
    """Roy & Vetterli effective rank: exp(entropy of sigma_i / sum sigma)."""
    s = torch.linalg.svdvals(X.double())
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _cos_stats(U: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    C = U @ U.T
    n = C.shape[0]
    off = C[~torch.eye(n, dtype=torch.bool)].numpy()
    return off, C


def clustering_metrics(X: torch.Tensor, layer: int, threshold: float, seed: int,
                       explained3: float = float("nan")) -> LayerMetrics:
    """Clustering statistics of the tokens X (N, d) after normalising each to unit norm."""
    X = X.double()
    norms = X.norm(dim=1)
    U = X / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    off, C = _cos_stats(U)
    sizes = _components((C >= threshold).numpy())
    gen = torch.Generator().manual_seed(seed + 7919 * layer)
    R = torch.randn(X.shape, generator=gen, dtype=torch.float64)
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


def summarize(r: SphereResult) -> list[str]:
    """One or two sentences about the tokens through depth, computed from the metrics."""
    m = r.metrics
    if len(m) < 2:
        x = m[0]
        return [f"Only layer {x.layer} was selected: its tokens have mean pairwise cosine {x.mean_cos:.2f} "
                f"(random directions: {x.baseline_mean_cos:.2f}) and form {x.n_clusters} clusters at cosine >= "
                f"{r.config.cluster_threshold:g}."]
    first, last = m[0], m[-1]
    peak = max(m, key=lambda x: x.mean_cos)
    fewest = min(m, key=lambda x: x.n_clusters)
    delta = last.mean_cos - first.mean_cos
    if peak.mean_cos - max(first.mean_cos, last.mean_cos) > 0.1 and peak is not first and peak is not last:
        trend = (f"gather towards shared directions up to layer {peak.layer} (mean pairwise cosine "
                 f"{first.mean_cos:.2f} -> {peak.mean_cos:.2f}) and spread again by layer {last.layer} "
                 f"({last.mean_cos:.2f})")
    elif delta > 0.05:
        trend = (f"draw together through depth: mean pairwise cosine rises from {first.mean_cos:.2f} at layer "
                 f"{first.layer} to {last.mean_cos:.2f} at layer {last.layer}")
    elif delta < -0.05:
        trend = (f"spread apart through depth: mean pairwise cosine falls from {first.mean_cos:.2f} at layer "
                 f"{first.layer} to {last.mean_cos:.2f} at layer {last.layer}")
    else:
        trend = (f"keep about the same spread: mean pairwise cosine stays near {first.mean_cos:.2f} "
                 f"(layer {first.layer}: {first.mean_cos:.2f}, layer {last.layer}: {last.mean_cos:.2f})")
    base = float(np.mean([x.baseline_mean_cos for x in m]))
    s1 = (f"The {first.n_tokens} tokens {trend}, against {base:.2f} for random directions; clusters at "
          f"cosine >= {r.config.cluster_threshold:g} go from {first.n_clusters} to {last.n_clusters} "
          f"(fewest: {fewest.n_clusters} at layer {fewest.layer}).")
    ev = [x.explained_variance_3 for x in m]
    s2 = (f"Effective rank goes from {first.effective_rank:.1f} to {last.effective_rank:.1f} "
          f"(random: {first.baseline_effective_rank:.1f}); the 3-D pictures keep {min(ev):.0%}-{max(ev):.0%} "
          f"of each layer's variance, so read them as a {'rough sketch' if min(ev) < 0.3 else 'fair view'} of "
          f"the full-width geometry.")
    return [s1, s2]
