"""Token clustering in a toy transformer: "particles on the sphere" (Geshkovski, Letrouit, Polyanskiy, Rigollet).

"A mathematical perspective on transformers" (2023) models a deep stack of attention layers with shared
weights as interacting particles: each token ``x_i`` is a point on the unit sphere, and every layer moves it
towards the softmax-weighted average of the others,

    x_i  <-  normalise( x_i + step * sum_j softmax_j(beta * <Q x_i, K x_j>) V x_j ),

with the same ``Q``, ``K``, ``V`` at every layer (``step`` is the residual step size, ``beta`` the inverse
temperature). With ``Q = K = V = I`` the tokens collapse through depth: first into a few clusters, then into
one. This module runs that toy model and feeds its residual stream to :func:`headlens.sphere.project`,
exactly like a real model's stream, so the GIF and the clustering metrics of ``headlens sphere`` show the
collapse on a case where it is known to happen.

The metrics are computed on the full-width normalised tokens (``dim`` > 3 is the interesting case). The
picture is a 3-D PCA of the full-width tokens: by default about the origin (the centre of the sphere the
tokens live on), so a collapsed cluster stays a point; ``center=True`` centres each layer first, as
``headlens sphere`` does for a real model, which blows a fully collapsed cluster back up over the sphere.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from headlens.errors import HeadlensError

MAX_FRAMES = 30


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
        if self.tokens < 4:
            raise HeadlensError(f"tokens must be at least 4 (a sphere needs 4 points), got {self.tokens}")
        if self.dim < 3:
            raise HeadlensError(f"dim must be at least 3, got {self.dim}")
        if self.layers < 1 or self.heads < 1:
            raise HeadlensError(f"layers and heads must be at least 1, got {self.layers} and {self.heads}")
        if self.weights not in ("identity", "random"):
            raise HeadlensError(f"weights {self.weights!r}: choose identity or random")


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


def origin_frames(hidden: dict[int, torch.Tensor], layers: list[int]) -> tuple[list[np.ndarray], list[float]]:
    """3-D picture about the origin: per layer, the top-3 uncentred principal directions of the unit tokens,
    each token projected and put back on the sphere, aligned to the previous frame; and the fraction of
    the tokens' squared norm those 3 directions keep."""
    from headlens.residual.sphere import align_to

    points, kept = [], []
    for layer in layers:
        X = hidden[layer].double()
        U = X / X.norm(dim=1, keepdim=True)
        _, S, Vh = torch.linalg.svd(U, full_matrices=False)
        Y = U @ Vh[:3].T
        P = (Y / Y.norm(dim=1, keepdim=True).clamp_min(1e-300)).numpy()
        if points:
            P = P @ align_to(P, points[-1])
        points.append(P)
        kept.append(float((S[:3] ** 2).sum() / (S**2).sum()))
    return points, kept


def metrics_csv(metrics: list[dict]) -> str:
    """The per-layer metrics as CSV text (``headlens sphere``'s columns)."""
    try:  # the same columns as headlens sphere's table when that helper is there
        from headlens.cli.sphere import _metrics_csv

        return _metrics_csv(metrics)
    except ImportError:
        pass
    flat = [{k: v for k, v in {**m, **m["cos_quantiles"]}.items() if k not in ("cos_quantiles", "cos_hist")}
            for m in metrics]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(flat[0]))
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


def describe(cfg: ClusterConfig) -> str:
    w = "Q = K = V = I" if cfg.weights == "identity" else "random well-conditioned Q, K, V"
    heads = f"{cfg.heads} heads" if cfg.heads > 1 else "1 head"
    return (f"Toy transformer (Geshkovski et al.): {cfg.tokens} tokens in {cfg.dim} dimensions, {cfg.layers} layers "
            f"sharing {w} ({heads}), beta = {cfg.beta:g}, step = {cfg.step:g}, seed {cfg.seed}"
            f"{', renormalised to the unit sphere after every layer' if cfg.normalize else ''}.")


def cluster_demo(cfg: ClusterConfig, out_dir, frame_seconds: float = 0.5, threshold: float = 0.9,
                 workers: int | None = None, labels: bool = False, center: bool = False,
                 max_frames: int = MAX_FRAMES) -> dict:
    """Run the toy model and write ``tokens.gif``, ``sphere_metrics.png``, ``sphere_metrics.json`` and ``.csv``.

    Metrics are computed at every layer; the GIF shows up to ``max_frames`` evenly spaced layers (first and
    last included). Returns the paths, the frame layers, the per-layer metrics and the summary sentences.
    """
    from headlens.io.files import atomic_path, check_writable_dir, write_json
    from headlens.residual.sphere import SphereConfig, project
    from headlens.report.sphere_frames import Deferred, render_frame, start_pool, write_gif, write_metrics_png

    if frame_seconds <= 0:
        raise HeadlensError(f"frame_seconds must be positive, got {frame_seconds:g}")
    if not -1.0 <= threshold <= 1.0:
        raise HeadlensError(f"threshold must be a cosine in [-1, 1], got {threshold:g}")
    out_dir = Path(out_dir)
    check_writable_dir(out_dir)
    hidden = run_cluster(cfg)
    names = [f"t{i}" for i in range(cfg.tokens)]
    result = project(hidden, names, SphereConfig(cluster_threshold=threshold, seed=cfg.seed))
    shown = frame_layers(len(result.layers), max_frames)
    if center:  # headlens sphere's picture: each layer centred, then PCA
        frames = [result.frames[k] for k in shown]
        points, explained = [f.points for f in frames], [f.explained_total for f in frames]
    else:
        points, explained = origin_frames(hidden, [result.layers[k] for k in shown])
    picture = "centred PCA-3" if center else "PCA-3 about the origin"
    jobs = [{"points": p, "tokens": names, "positions": list(range(cfg.tokens)), "labels": labels,
             "title": f"toy transformer, beta={cfg.beta:g}, layer {result.layers[k]}: {picture} keeps {ev:.0%}"}
            for k, p, ev in zip(shown, points, explained)]

    metrics = result.to_json()["metrics"]
    summary = [describe(cfg)] + result.summary
    if not center:
        summary.append(f"The GIF projects about the origin (the sphere's centre), so a cluster stays a point; its "
                       f"3-D views keep {min(explained):.0%}-{max(explained):.0%} of the tokens' squared norm.")
    paths = {"gif": out_dir / "tokens.gif", "metrics_png": out_dir / "sphere_metrics.png",
             "metrics_json": out_dir / "sphere_metrics.json", "metrics_csv": out_dir / "sphere_metrics.csv"}
    pool = start_pool(workers) if len(jobs) > 4 else None
    try:  # Deferred draws in this process when there is no pool or it broke (e.g. no importable __main__)
        calls = [Deferred(pool, render_frame, job) for job in jobs]
        pngs = [call.result() for call in calls]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    write_gif(paths["gif"], pngs, frame_seconds)
    write_metrics_png(paths["metrics_png"], metrics, threshold,
                      f"toy transformer (beta={cfg.beta:g}, step={cfg.step:g}, {cfg.weights} weights): "
                      "clustering through depth")
    write_json(paths["metrics_json"], {"model": "toy_cluster", "config": asdict(cfg), "threshold": threshold,
                                       "frame_layers": [result.layers[k] for k in shown], "metrics": metrics,
                                       "summary": summary})
    with atomic_path(paths["metrics_csv"]) as tmp:
        tmp.write_text(metrics_csv(metrics), encoding="utf-8")
    from headlens.report.sphere_html import write_sphere_html

    paths["html"] = out_dir / "tokens.html"
    norms = {}
    for k in shown:  # |3-D projection| of each token before it is put back on the sphere
        l = result.layers[k]
        if center:
            norms[l] = result.frames[k].norms3
        else:
            U = hidden[l].double() / hidden[l].double().norm(dim=1, keepdim=True)
            norms[l] = (U @ torch.linalg.svd(U, full_matrices=False)[2][:3].T).norm(dim=1).numpy()
    by_layer = {m["layer"]: m for m in metrics}
    frames_html = [{"layer": result.layers[k], "points": p, "tokens": names, "positions": list(range(cfg.tokens)),
                    "norms": norms[result.layers[k]], "explained_variance": float(min(max(ev, 0.0), 1.0)),
                    "site": picture} for k, p, ev in zip(shown, points, explained)]
    write_sphere_html(paths["html"], frames_html, title=f"toy transformer (beta={cfg.beta:g}): tokens on the sphere",
                      metrics=[by_layer[f["layer"]] for f in frames_html])
    return {**paths, "frame_layers": [result.layers[k] for k in shown], "metrics": metrics, "summary": summary}
