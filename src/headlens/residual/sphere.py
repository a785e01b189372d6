"""Residual stream on the unit sphere: per-layer PCA to 3-D, alignment between layers, clustering metrics.

Definitions (DOMAIN.md):

- Per layer: centre the tokens, take the top-3 principal directions, project, divide each token by its
  norm so it lies on the unit sphere. The explained variance of the 3 components says how faithful the
  picture is.
- PCA signs and near-degenerate directions flip between layers: with ``align`` each layer's coordinates
  are aligned to the previous layer's (sign fix, then orthogonal Procrustes with det +1). Both steps only
  ever lower the summed squared movement of the tokens between consecutive frames (the identity is
  always a candidate), so alignment never increases it. ``basis="global"`` fits one basis on all layers.
- Clustering through depth is measured on the full-width tokens (:mod:`headlens.residual.clustering`).

Entry points: :func:`sphere_from_model` runs a prompt through a checkpoint (one forward pass, hooks on the
unmodified HuggingFace model) and :func:`sphere_from_stream` projects a stream given as tensors (a toy's
traces, see :func:`headlens.toy.traces.sphere_from_traces`). Both return a :class:`SphereResult`.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from headlens.errors import HeadlensError
from headlens.selection import LABEL_CHOICES
from headlens.residual.clustering import LayerMetrics, clustering_metrics, summarize
from headlens.residual.sphere_geometry import align_to, global_basis, movement, normalise, pca

SPHERE_SITES = ("resid_pre", "resid_mid", "resid_post")
GIF_MAX_SECONDS = 655.35  # a GIF frame lasts at most 65535 hundredths of a second
# The options that shape the projection and the metrics: what sphere.json records as its "config".
PROJECTION_OPTIONS = ("align", "basis", "drop_first", "drop_outliers", "outlier_factor", "cluster_threshold", "seed")


@dataclass
class SphereConfig:
    """Every option of a sphere run: the projection and metrics (:data:`PROJECTION_OPTIONS`), what to run, and
    how the report draws it."""

    align: bool = True  # align each layer's 3-D basis to the previous one
    basis: str = "layer"  # "layer": PCA per layer; "global": one PCA basis for all selected layers
    drop_first: bool = False  # leave the first token out (attention sink of decoder models)
    drop_outliers: bool = False  # leave out tokens whose norm is > outlier_factor x the layer median
    outlier_factor: float = 8.0  # a token is an outlier above this multiple of its layer's median norm
    cluster_threshold: float = 0.9  # cosine threshold for counting clusters
    seed: int = 0  # random-direction baseline
    prompt: str | None = None  # text run through the model (None: the notebook's prompt)
    truncate: bool = False  # cut a prompt longer than the model's positions instead of refusing it
    layers: str | None = None  # layer selection: "7:35" (slice), "1,4,9", "all" or None (every layer)
    site: str = "resid_pre"  # residual site per layer: resid_pre, resid_mid or resid_post
    dtype: str = "auto"  # precision the model runs in: auto (float32 on the CPU), float32, float64, bfloat16, float16
    half: bool = False  # store the captured residual stream in float16
    frame_seconds: float = 1.0  # report: GIF seconds per frame
    labels: str = "auto"  # report: GIF token labels: auto (a non-overlapping subset), all, none (True/False: all/none)
    workers: int | None = None  # report: frame-rendering processes (None: up to 4 cores)

    def __post_init__(self) -> None:
        if isinstance(self.labels, bool):  # the field was a bool: draw every label or none
            self.labels = "all" if self.labels else "none"
        self._coerce()

    def _coerce(self) -> None:
        """Each field in its one form, or a HeadlensError naming the field and the type expected."""
        from headlens import params
        from headlens.selection import DTYPE_CHOICES

        for name in ("align", "drop_first", "drop_outliers", "truncate", "half"):
            setattr(self, name, params.flag(getattr(self, name), name))
        for name in ("outlier_factor", "cluster_threshold", "frame_seconds"):
            setattr(self, name, params.number(getattr(self, name), name))
        self.seed = params.integer(self.seed, "seed")
        self.workers = params.integer(self.workers, "workers", optional=True)
        self.prompt = params.text(self.prompt, "prompt")
        self.layers = params.selection(self.layers, "layers")
        self.basis = params.choice(self.basis, "basis", ("layer", "global"))
        self.site = params.choice(self.site, "site", SPHERE_SITES)
        self.dtype = params.choice(self.dtype, "dtype", DTYPE_CHOICES)
        self.labels = params.choice(self.labels, "labels", LABEL_CHOICES)

    def check(self) -> None:
        """Raise HeadlensError on an option out of range or of the wrong type (before any file is read)."""
        self.__post_init__()  # fields set after construction (labels to a bool, say)
        if self.labels not in LABEL_CHOICES:
            raise HeadlensError(f"`labels` {self.labels!r}: choose {', '.join(LABEL_CHOICES)}")
        if self.frame_seconds <= 0:
            raise HeadlensError(f"`frame_seconds` must be positive, got {self.frame_seconds:g}")
        if not self.frame_seconds <= GIF_MAX_SECONDS:  # also nan
            raise HeadlensError(f"`frame_seconds` must be at most {GIF_MAX_SECONDS:g} (the longest frame a GIF "
                                f"holds), got {self.frame_seconds:g}")
        if not -1.0 <= self.cluster_threshold <= 1.0:
            raise HeadlensError(f"`cluster_threshold` must be a cosine in [-1, 1], got {self.cluster_threshold:g}")
        if self.outlier_factor <= 1.0:
            raise HeadlensError(f"`outlier_factor` must be above 1, got {self.outlier_factor:g}")
        if self.workers is not None and self.workers < 1:
            raise HeadlensError(f"`workers` must be at least 1, got {self.workers}")
        if self.site not in SPHERE_SITES:
            raise HeadlensError(f"`site` {self.site!r}: choose {', '.join(SPHERE_SITES)}")

    def projection_json(self) -> dict:
        """The options that shape the projection and metrics, as ``sphere.json`` records them."""
        return {name: getattr(self, name) for name in PROJECTION_OPTIONS}


@dataclass
class Frame:
    """One layer on the sphere. ``points`` (N, 3) unit rows; ``kept`` indexes the prompt's tokens."""

    layer: int
    points: np.ndarray  # (N, 3)
    norms3: np.ndarray  # (N,) norm of the 3-D projection before normalising
    full_norms: np.ndarray  # (N,) residual-stream norm of each kept token
    explained_variance: np.ndarray  # (3,) fraction of the layer's variance along each component
    kept: np.ndarray  # (N,) token positions kept
    # (3, 3) orthogonal map from the components to the drawn axes: points = (unit PCA coordinates) @ axes. The
    # identity unless alignment rotated the layer; column j says how much of each component axis j carries.
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def explained_total(self) -> float:
        return float(self.explained_variance.sum())

    @property
    def axis_variance(self) -> np.ndarray:
        """(3,) fraction of the layer's variance along each drawn axis (x, y, z). The components' projections are
        uncorrelated, so axis j carries sum_k axes[k, j]^2 of component k's variance; equal to
        ``explained_variance`` (reordered) when ``axes`` is a signed permutation."""
        return (self.axes**2).T @ self.explained_variance


@dataclass
class Outlier:
    """A token whose residual norm is far above its layer's median (e.g. a decoder's attention sink)."""

    position: int
    token: str
    max_ratio: float  # largest norm / median-norm ratio over the selected layers
    layer: int  # where that ratio is reached
    norm: float


@dataclass
class SphereResult:
    """The projected layers, their metrics and the summary; ``name``/``model``/``header``/``prompt`` say what
    was run (``header`` is the one-line description the CLI prints first)."""

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
    name: str = ""  # the model's (or trace file's) short name
    model: dict = field(default_factory=dict)  # what the checkpoint or trace is (written as "model")
    header: str = ""  # "<name>: N tokens, L of M layers; site ...: <hook>"
    prompt: str = ""  # the text run ("" for traces)

    def metrics_json(self) -> list[dict]:
        """The per-layer metrics as plain dicts (the rows of ``sphere_metrics.json``), each with the layer's
        ``explained_variance_pcs`` (3,: the fraction of its variance along PC1..PC3) and ``explained_variance_axes``
        (3,: along the drawn axes x, y, z, which alignment rotates away from the components)."""
        frames = {f.layer: f for f in self.frames}
        rows = []
        for m in self.metrics:
            row, f = asdict(m), frames.get(m.layer)
            if f is not None:
                row["explained_variance_pcs"] = f.explained_variance.tolist()
                row["explained_variance_axes"] = f.axis_variance.tolist()
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        from headlens.results import short_repr

        lines = [f"layer {m.layer:>3}: {m.n_tokens} tokens, PCA-3 keeps {100 * m.explained_variance_3:.1f}%, mean cos "
                 f"{m.mean_cos:.3f}, clusters {m.n_clusters}, eff. rank {m.effective_rank:.1f}" for m in self.metrics]
        if self.outliers:
            lines.append(f"outliers: positions {[o.position for o in self.outliers]}")
        return short_repr(self, f"{self.name or 'stream'}: {len(self.tokens)} tokens, {len(self.layers)} layer(s) on "
                                f"the sphere, site {self.config.site}", lines,
                          "frames[i].points, metrics[i], outliers, summary, to_json()")

    def to_json(self) -> dict:
        """Everything computed, as JSON-ready data (``sphere.json`` adds model, site and prompt)."""
        return {
            "layers": self.layers,
            "tokens": self.tokens,
            "dropped_positions": self.dropped,
            "outliers": [asdict(o) for o in self.outliers],
            "config": self.config.projection_json(),
            "movement_aligned": self.movement_aligned,
            "movement_unaligned": self.movement_unaligned,
            "metrics": self.metrics_json(),
            "frames": [
                {"layer": f.layer, "explained_variance": f.explained_variance.tolist(),
                 "axis_variance": f.axis_variance.tolist(), "axes": f.axes.tolist(), "kept": f.kept.tolist(),
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


def _kept_positions(n: int, outliers: list[Outlier], cfg: SphereConfig) -> tuple[np.ndarray, list[int]]:
    """(positions kept (K,), positions dropped) after ``drop_first`` / ``drop_outliers``."""
    drop = set()
    if cfg.drop_first:
        drop.add(0)
    if cfg.drop_outliers:
        drop.update(o.position for o in outliers)
    kept = np.array([i for i in range(n) if i not in drop], dtype=int)
    if len(kept) < 4:
        left = f"{len(kept)} token" + ("" if len(kept) == 1 else "s")
        raise HeadlensError(f"only {left} left after dropping: a sphere needs at least 4; use a longer prompt or "
                            "drop fewer tokens")
    return kept, sorted(drop)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Hand the pages that the C heap holds free back to the system. Each layer's float64 temporaries (12 MB
    apiece at 587 tokens x 2560) are freed into glibc's heap, where they fragment: without this the resident set
    grows by ~20 MB a layer (~700 MB over 36 layers) though nothing is kept. Changes no number."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _layer_tokens(hidden: dict[int, torch.Tensor], layer: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kept tokens of ``layer`` in float64 (K, d), the same centred). One layer at a time, so that no float64
    copy of the whole stream is ever held (it is 4x the stream in bfloat16)."""
    X = hidden[layer].double()[idx]
    return X, X - X.mean(0, keepdim=True)


def _centred_layers(hidden: dict[int, torch.Tensor], layers: list[int], idx: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each layer's kept tokens, centred (K, d) in float64, one at a time (for :func:`_global_basis`)."""
    for layer in layers:
        yield _layer_tokens(hidden, layer, idx)[1]
        _release_freed_memory()


def _project_layer(Xc: torch.Tensor, gbasis: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit 3-D points (N, 3), 3-D norms (N,), explained variance (3,)) of one layer, before alignment."""
    if gbasis is None:
        V, frac = pca(Xc)
    else:
        V = gbasis
        total = (Xc**2).sum()
        frac = ((Xc @ V) ** 2).sum(0) / total if total > 0 else torch.zeros(3, dtype=Xc.dtype)
    Y = Xc @ V  # (N, 3)
    P, nrm = normalise(Y)
    return P.numpy(), nrm.numpy(), frac.numpy()


def project(hidden: dict[int, torch.Tensor], tokens: list[str], cfg: SphereConfig) -> SphereResult:
    """Project every layer of ``hidden`` (layer -> (N, d) residual stream, N = len(tokens)) onto the unit
    sphere; returns the frames, per-layer metrics, outliers and summary as a :class:`SphereResult`."""
    if not hidden:
        raise HeadlensError("no layers selected")
    if cfg.basis not in ("layer", "global"):
        raise HeadlensError(f"`basis` {cfg.basis!r}: choose layer or global")
    layers = sorted(hidden)
    n = len(tokens)
    for l in layers:
        if hidden[l].ndim != 2 or hidden[l].shape[0] != n:
            raise HeadlensError(f"`hidden` layer {l} has shape {tuple(hidden[l].shape)}: expected ({n}, d), one row "
                                "per token")
    outliers = find_outliers(hidden, tokens, cfg.outlier_factor)
    kept, dropped = _kept_positions(n, outliers, cfg)
    idx = torch.from_numpy(kept)
    gbasis = None
    if cfg.basis == "global":
        gbasis = global_basis(lambda: _centred_layers(hidden, layers, idx), len(kept) * len(layers),
                               hidden[layers[0]].shape[1])
    raw, norms3, evs, full_norms, metrics = [], [], [], [], []
    for l in layers:  # each layer converted to float64 on its own, and let go before the next
        X, Xc = _layer_tokens(hidden, l, idx)  # (K, d) each
        P, n3, ev = _project_layer(Xc, gbasis)
        del Xc
        raw.append(P)
        norms3.append(n3)
        evs.append(ev)
        full_norms.append(X.norm(dim=1).numpy())
        metrics.append(clustering_metrics(X, l, cfg.cluster_threshold, cfg.seed, float(ev.sum())))
        del X
        _release_freed_memory()

    unaligned_move = movement(raw)
    points, maps = [raw[0]], [np.eye(3)]
    if cfg.align and cfg.basis == "layer":
        for P in raw[1:]:
            maps.append(align_to(P, points[-1]))  # (3, 3) orthogonal
            points.append(P @ maps[-1])
    else:
        points, maps = raw, [np.eye(3)] * len(raw)
    aligned_move = movement(points)

    frames = [Frame(layer=l, points=p, norms3=n3, full_norms=fn, explained_variance=ev, kept=kept, axes=m)
              for l, p, n3, fn, ev, m in zip(layers, points, norms3, full_norms, evs, maps)]
    return SphereResult(layers=layers, tokens=tokens, frames=frames, metrics=metrics, outliers=outliers,
                        dropped=dropped, config=cfg, movement_aligned=aligned_move,
                        movement_unaligned=unaligned_move, summary=summarize(metrics, cfg.cluster_threshold))


# ---------------------------------------------------------------------------------------- entry points


def sphere_from_stream(hidden: dict[int, torch.Tensor], tokens: list[str], cfg: SphereConfig, *, name: str = "",
                       model: dict | None = None, header: str = "", prompt: str = "") -> SphereResult:
    """:func:`project` ``hidden`` ({layer: (N, d)}) and label the result with what was run."""
    cfg.check()
    result = project(hidden, tokens, cfg)
    result.name, result.model, result.header, result.prompt = name, dict(model or {}), header, prompt
    return result


def _check_site(target, site: str) -> None:
    """Refuse resid_mid where the config already says the layers are parallel (the trace decides the rest)."""
    from headlens.residual.sites import is_parallel

    spec = target.spec
    if site == "resid_mid" and spec is not None and spec.parallel_flag and is_parallel(spec, target.config):
        raise HeadlensError(f"{spec.family} layers add attention and MLP to the same stream in parallel: there is "
                            "no resid_mid; use `site` resid_pre or resid_post")


def _record_stream(model, spec, layers: list[int], ids: torch.Tensor, cfg: SphereConfig) -> tuple[dict, str]:
    """Run ``ids`` (1, N) once through ``model`` with hooks on ``cfg.site`` of ``layers`` (the residual identities
    are checked on the way); returns ({layer: (N, d) stream}, how the site was captured)."""
    from headlens.io.placement import input_device
    from headlens.residual.capture import record_sites

    with torch.no_grad(), record_sites(model, spec, (cfg.site,), layers,
                                       store_dtype=torch.float16 if cfg.half else None) as rec:
        if cfg.site in rec.missing:  # decided from the traced structure (parallel layers have no resid_mid)
            raise HeadlensError(rec.missing[cfg.site] + "; use `site` resid_pre or resid_post")
        model(input_ids=ids.to(input_device(model)))  # the one forward pass
    hidden = {}
    for layer in layers:
        x = rec.values[cfg.site][layer]  # (1, N, d)
        assert x.ndim == 3 and x.shape[:2] == ids.shape, (tuple(x.shape), tuple(ids.shape))
        hidden[layer] = x[0]  # (N, d)
    return hidden, rec.hooks[cfg.site]


def sphere_from_model(source, cfg: SphereConfig, on_checked: Callable[[], object] | None = None) -> SphereResult:
    """Run ``cfg.prompt`` through ``source`` (a :class:`~headlens.io.source.ModelSource`) and project the
    residual stream at ``cfg.site`` of each selected layer onto the unit sphere. Returns a :class:`SphereResult`.

    Any model whose blocks can be found runs, also one whose family the spec table does not know. Everything
    that can be checked without the weights (the options, the layer selection, the site, the prompt's length and
    ids) is checked before they load; ``on_checked`` is called then, just before loading (the CLI starts its
    renderer processes there, so their imports overlap loading and running the model).
    """
    from headlens.prompts import NOTEBOOK_PROMPT
    from headlens.residual.capture import max_positions, prompt_ids, vocab_size
    from headlens.residual.modules import count_layers
    from headlens.residual.target import open_run_target
    from headlens.selection import parse_layers

    from headlens import params
    from headlens.io.source import ModelSource

    params.instance(source, "source", ModelSource, 'e.g. headlens.ModelSource(embedded="tiny-lm")')
    params.instance(cfg, "cfg", SphereConfig, 'e.g. headlens.SphereConfig(prompt="...")')
    cfg.check()
    target = open_run_target(source, "sphere runs the model: pass `weights` DIR (a HuggingFace model directory "
                                     "with config.json and tokenizer) or `hf_repo`, not a bare state dict")
    layers = parse_layers(cfg.layers, target.num_layers) if target.num_layers else None
    _check_site(target, cfg.site)
    prompt = NOTEBOOK_PROMPT if cfg.prompt is None else cfg.prompt
    tokenizer = source.tokenizer(target.directory)
    ids, tokens = prompt_ids(tokenizer, prompt, max_positions(target.config), truncate=cfg.truncate,
                             vocab_size=vocab_size(target.config))  # ids (1, N)
    if on_checked is not None:
        on_checked()
    model = source.model(target.directory, cfg.dtype)
    spec = target.spec_for(model)
    n_layers = count_layers(model, spec)
    if layers is None:
        layers = parse_layers(cfg.layers, n_layers)
    hidden, hook = _record_stream(model, spec, layers, ids, cfg)
    header = (f"{target.name}: {len(tokens)} tokens, {len(layers)} of {n_layers} layers; site {cfg.site}: {hook}")
    return sphere_from_stream(hidden, tokens, cfg, name=target.name, model=target.info, header=header, prompt=prompt)
