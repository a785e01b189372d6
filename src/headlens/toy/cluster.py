"""Token clustering in a toy transformer: "particles on the sphere" (Geshkovski, Letrouit, Polyanskiy, Rigollet).

"A mathematical perspective on transformers" (2023) models a deep stack of attention layers with shared
weights as interacting particles: each token ``x_i`` is a point on the unit sphere, and every layer moves it
towards the softmax-weighted average of the others,

    x_i  <-  normalise( x_i + step * sum_j softmax_j(beta * <Q x_i, K x_j>) V x_j ),

with the same ``Q``, ``K``, ``V`` at every layer (``step`` is the residual step size, ``beta`` the inverse
temperature). With ``Q = K = V = I`` the tokens collapse through depth: first into a few clusters, then into
one. This module runs that toy model and feeds its residual stream to :func:`headlens.residual.sphere.project`,
exactly like a real model's stream, so the GIF and the clustering metrics of ``headlens sphere`` show the
collapse on a case where it is known to happen (:func:`run_demo`; :mod:`headlens.report.cluster` draws it).

The metrics are computed on the full-width normalised tokens (``dim`` > 3 is the interesting case). The
picture is a 3-D PCA of the full-width tokens: by default about the origin (the centre of the sphere the
tokens live on), so a collapsed cluster stays a point; ``center=True`` centres each layer first, as
``headlens sphere`` does for a real model, which blows a fully collapsed cluster back up over the sphere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from headlens.errors import HeadlensError
from headlens.residual.sphere import SphereConfig, SphereResult, project
from headlens.residual.sphere_geometry import align_to

MAX_FRAMES = 30
# Upper limits: the demo keeps (N, N) attention and every layer's (N, d) stream in float64.
CLUSTER_LIMITS = {"tokens": 4096, "dim": 4096, "layers": 10_000, "heads": 64}
MAX_STREAM_VALUES = 100_000_000  # (layers + 1) * tokens * dim, kept in float64 (800 MB)


@dataclass
class ClusterConfig:
    tokens: int = 64  # number of particles
    dim: int = 16  # width of the residual stream
    layers: int = 30  # depth of the stack (the same weights at every layer)
    heads: int = 1  # heads are averaged
    beta: float = 4.0  # inverse temperature of the attention softmax
    step: float = 0.25  # residual step size
    seed: int = 0  # initial tokens and random weights
    normalize: bool = True  # project the tokens back onto the unit sphere after every layer
    weights: str = "identity"  # "identity": Q = K = V = I; "random": a random well-conditioned matrix each

    def check(self) -> None:
        """Raise HeadlensError (naming the field) on a size or weight kind the demo cannot run."""
        if self.tokens < 4:
            raise HeadlensError(f"`tokens` must be at least 4 (a sphere needs 4 points), got {self.tokens}")
        if self.dim < 3:
            raise HeadlensError(f"`dim` must be at least 3, got {self.dim}")
        if self.layers < 1 or self.heads < 1:
            raise HeadlensError(f"`layers` and `heads` must be at least 1, got {self.layers} and {self.heads}")
        if self.weights not in ("identity", "random"):
            raise HeadlensError(f"`weights` {self.weights!r}: choose identity or random")
        for name, limit in CLUSTER_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value > limit:
                raise HeadlensError(f"`{name}` must be an integer of at most {limit}, got {value}")
        cells = (self.layers + 1) * self.tokens * self.dim
        if cells > MAX_STREAM_VALUES:
            raise HeadlensError(f"`tokens` x `dim` x (`layers` + 1) = {cells:,} stream values (limit "
                                f"{MAX_STREAM_VALUES:,}): lower one of them")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and 0 <= self.beta <= 1e6):
            raise HeadlensError(f"`beta` (the inverse temperature) must be a finite number in [0, 1e6], got {self.beta}")
        if not (isinstance(self.step, (int, float)) and math.isfinite(self.step) and 0 < self.step <= 1e3):
            raise HeadlensError(f"`step` (the residual step size) must be a finite number in (0, 1e3], got {self.step}")


def _well_conditioned(d: int, gen: torch.Generator) -> torch.Tensor:
    """A random (d, d) matrix with singular values in [0.5, 1]: spectral norm 1, condition number <= 2."""
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    W, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = 0.5 + 0.5 * torch.rand(d, generator=gen, dtype=torch.float64)
    s[0] = 1.0
    return U @ torch.diag(s) @ W.T


def make_weights(cfg: ClusterConfig) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(Q, K, V)`` for each head, shared by every layer."""
    eye = torch.eye(cfg.dim, dtype=torch.float64)
    if cfg.weights == "identity":
        return [(eye, eye, eye) for _ in range(cfg.heads)]
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # not the stream of the initial tokens
    return [tuple(_well_conditioned(cfg.dim, gen) for _ in range(3)) for _ in range(cfg.heads)]


def initial_tokens(cfg: ClusterConfig) -> torch.Tensor:
    """``tokens`` points drawn uniformly on the unit sphere in ``dim`` dimensions (seeded), (N, d) float64."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.tokens, cfg.dim, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def layer_step(x: torch.Tensor, weights, beta: float, step: float, normalize: bool) -> torch.Tensor:
    """One layer: ``x_i + step * mean_heads sum_j softmax_j(beta <Q x_i, K x_j>) V x_j``, then renormalise."""
    update = torch.zeros_like(x)
    for Q, K, V in weights:
        scores = beta * (x @ Q.T) @ (x @ K.T).T  # (N, N): scores[i, j] = beta * <Q x_i, K x_j>
        attn = torch.softmax(scores, dim=1)  # each row sums to 1 over j
        update += attn @ (x @ V.T)  # row i: sum_j attn[i, j] V x_j
    x = x + step * update / len(weights)
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    return x


def run_cluster(cfg: ClusterConfig) -> dict[int, torch.Tensor]:
    """The residual stream at the input of every layer: ``{0: x0, 1: x1, ..., layers: x_L}``, (N, d) float64."""
    cfg.check()
    weights = make_weights(cfg)
    x = initial_tokens(cfg)
    hidden = {0: x}
    for layer in range(1, cfg.layers + 1):
        x = layer_step(x, weights, cfg.beta, cfg.step, cfg.normalize)
        hidden[layer] = x
    return hidden


def frame_layers(num_states: int, max_frames: int = MAX_FRAMES) -> list[int]:
    """Up to ``max_frames`` evenly spaced indices of ``range(num_states)``, always the first and the last."""
    if num_states <= max_frames:
        return list(range(num_states))
    return sorted({int(round(v)) for v in np.linspace(0, num_states - 1, max(max_frames, 2))})


def _origin_view(X: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """One layer's tokens X (N, d) seen about the origin: (unit 3-D points (N, 3), the norm (N,) of each unit
    token's projection on the top-3 uncentred principal directions, the fraction of squared norm they keep)."""
    X = X.double()
    U = X / X.norm(dim=1, keepdim=True)  # (N, d) unit rows
    _, S, Vh = torch.linalg.svd(U, full_matrices=False)
    Y = U @ Vh[:3].T  # (N, 3)
    P = (Y / Y.norm(dim=1, keepdim=True).clamp_min(1e-300)).numpy()
    return P, Y.norm(dim=1).numpy(), float((S[:3] ** 2).sum() / (S**2).sum())


def origin_frames(hidden: dict[int, torch.Tensor], layers: list[int]) -> tuple[list[np.ndarray], list[float]]:
    """3-D picture about the origin: per layer, the top-3 uncentred principal directions of the unit tokens,
    each token projected and put back on the sphere, aligned to the previous frame ((N, 3) each); and the
    fraction of the tokens' squared norm those 3 directions keep."""
    points, kept, _ = _origin_frames(hidden, layers)
    return points, kept


def _origin_frames(hidden: dict[int, torch.Tensor], layers: list[int]) -> tuple[list[np.ndarray], list[float],
                                                                               list[np.ndarray]]:
    """:func:`origin_frames` and the norms (N,) of each frame's 3-D projections before normalising."""
    points, kept, norms = [], [], []
    for layer in layers:
        P, n3, frac = _origin_view(hidden[layer])
        if points:
            P = P @ align_to(P, points[-1])
        points.append(P)
        kept.append(frac)
        norms.append(n3)
    return points, kept, norms


def describe(cfg: ClusterConfig) -> str:
    """One sentence saying which toy was run."""
    w = "Q = K = V = I" if cfg.weights == "identity" else "random well-conditioned Q, K, V"
    heads = f"{cfg.heads} heads" if cfg.heads > 1 else "1 head"
    return (f"Toy transformer (Geshkovski et al.): {cfg.tokens} tokens in {cfg.dim} dimensions, {cfg.layers} layers "
            f"sharing {w} ({heads}), beta = {cfg.beta:g}, step = {cfg.step:g}, seed {cfg.seed}"
            f"{', renormalised to the unit sphere after every layer' if cfg.normalize else ''}.")


@dataclass
class ClusterFrame:
    """One layer of the demo's picture."""

    layer: int
    points: np.ndarray  # (N, 3) unit rows
    norms: np.ndarray  # (N,) norm of each token's 3-D projection before it is put back on the sphere
    explained: float  # fraction of the variance (centred) or squared norm (about the origin) the view keeps


@dataclass
class ClusterDemo:
    """The clustering demo: metrics at every layer, pictures of up to ``max_frames`` of them."""

    config: ClusterConfig
    threshold: float  # cosine threshold of the cluster count
    center: bool  # pictures centred per layer (as headlens sphere) instead of about the origin
    tokens: list[str]  # "t0", "t1", ...
    sphere: SphereResult  # the projection and clustering metrics of every layer
    frames: list[ClusterFrame]  # the pictured layers, in depth order
    summary: list[str]  # sentences: which toy, how the tokens cluster, what the picture keeps

    @property
    def picture(self) -> str:
        """What the 3-D view is, for titles and the page's site label."""
        return "centred PCA-3" if self.center else "PCA-3 about the origin"

    @property
    def frame_layers(self) -> list[int]:
        return [f.layer for f in self.frames]


def run_demo(cfg: ClusterConfig, threshold: float = 0.9, center: bool = False,
             max_frames: int = MAX_FRAMES) -> ClusterDemo:
    """Run the toy model; metrics at every layer, pictures of up to ``max_frames`` evenly spaced layers (first
    and last included). Returns a :class:`ClusterDemo`."""
    if not -1.0 <= threshold <= 1.0:
        raise HeadlensError(f"`threshold` must be a cosine in [-1, 1], got {threshold:g}")
    hidden = run_cluster(cfg)
    names = [f"t{i}" for i in range(cfg.tokens)]
    result = project(hidden, names, SphereConfig(cluster_threshold=threshold, seed=cfg.seed))
    shown = [result.layers[k] for k in frame_layers(len(result.layers), max_frames)]
    if center:  # headlens sphere's picture: each layer centred, then PCA
        by_layer = {f.layer: f for f in result.frames}
        frames = [ClusterFrame(layer=l, points=by_layer[l].points, norms=by_layer[l].norms3,
                               explained=by_layer[l].explained_total) for l in shown]
    else:
        points, explained, norms = _origin_frames(hidden, shown)
        frames = [ClusterFrame(layer=l, points=p, norms=n3, explained=ev)
                  for l, p, n3, ev in zip(shown, points, norms, explained)]
    summary = [describe(cfg)] + result.summary
    if not center:
        kept = [f.explained for f in frames]
        summary.append(f"The GIF projects about the origin (the sphere's centre), so a cluster stays a point; its "
                       f"3-D views keep {min(kept):.0%}-{max(kept):.0%} of the tokens' squared norm.")
    return ClusterDemo(config=cfg, threshold=threshold, center=center, tokens=names, sphere=result, frames=frames,
                       summary=summary)
