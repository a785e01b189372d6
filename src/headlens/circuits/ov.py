"""``headlens ov``: one head's OV circuit, its spectrum, and what a rank-k latent cache of it loses.

:func:`analyze_ov` does the computation and returns an :class:`OVResult` (plain data, JSON-ready);
:func:`report_lines` formats it exactly as the seed tool ``latent_projection.py`` printed it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from headlens.residual.capture import PromptCapture
from headlens.errors import HeadlensError
from headlens.circuits.heads import check_layer_head, read_head
from headlens.io.checkpoint import Checkpoint
from headlens.circuits.spectrum import (
    condition_number,
    cumulative_energy,
    data_aware_latent,
    factored_svd,
    gaussian_probes,
    numerical_rank,
    plain_cache_error,
    rank_tolerance,
    rel_error,
)

DEFAULT_LATENT_DIM = 32
DEFAULT_PROBE_TOKENS = 2048


@dataclass
class OVConfig:
    """What to analyse (no argparse here: the CLI builds this)."""

    layer: int
    head: int
    latent_dim: int | None = None  # None: min(32, numerical rank)
    fold_norm: bool = False  # analyse W_OV diag(gamma) with the pre-attention norm gain folded in
    dtype: torch.dtype = torch.float32  # weights are rounded to this (the model's run dtype) before analysis
    prompt: str | None = None  # real attention inputs for cache_error and the data-aware latent
    traces: str | None = None  # or a toy trace file (headlens toy trace) providing the attention inputs
    heatmap: bool = False  # also record this head's attention pattern over the prompt
    probe_tokens: int = DEFAULT_PROBE_TOKENS  # Gaussian probes when there is no prompt
    seed: int = 0


@dataclass
class DataAwareReport:
    """Data-aware (whitened) latent versus the plain one, on the prompt's tokens."""

    n_tokens: int
    whitened_error: float  # in-sample, equals the spectrum prediction
    plain_cache_error: float  # same tokens, plain latent
    whitened_singular_values: list[float]
    heldout_fit_tokens: int  # fit on even positions, measured on odd ones
    heldout_test_tokens: int
    heldout_whitened_error: float | None
    heldout_plain_error: float | None


@dataclass
class OVResult:
    model: dict
    layer: int
    head: int
    kv_head: int
    num_heads: int
    num_value_heads: int
    head_dim: int
    hidden_size: int
    shape: tuple[int, int]
    tensors: list[str]
    rank: int
    rank_tolerance: float
    rank_eps_dtype: str
    condition_number: float
    condition_number_definition: str
    singular_values: list[float]
    cumulative_energy: list[float]
    frobenius_norm: float
    latent_dim: int
    rel_error: float
    cache_error: float
    cache_inputs: str  # "prompt" or "gaussian"
    cache_tokens: int
    seed: int | None
    norm_folded: bool
    norm_key: str | None
    dtype: str
    data_aware: DataAwareReport | None = None
    prompt: str | None = None
    tokens: list[str] | None = None
    attention: list[list[float]] | None = None  # (N, N) query x key, when a heatmap was asked for
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _eps_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision that sets the numerical-rank tolerance: the weights' precision, at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def analyze_ov(
    ck: Checkpoint,
    cfg: OVConfig,
    capture_fn: Callable[[], PromptCapture] | None = None,
) -> OVResult:
    """Analyse query head ``cfg.head`` of layer ``cfg.layer``.

    ``capture_fn`` runs the prompt through the model and returns that layer's capture; it is required
    when ``cfg.prompt`` is set (the CLI passes one that loads the HuggingFace model).
    """
    check_layer_head(ck, cfg.layer, cfg.head)
    if cfg.heatmap and not (cfg.prompt or cfg.traces):
        raise HeadlensError("--heatmap needs --prompt TEXT (the tokens to draw attention over)")
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise HeadlensError("--prompt is empty")
    if cfg.latent_dim is not None and cfg.latent_dim <= 0:
        raise HeadlensError(f"--latent-dim must be positive, got {cfg.latent_dim}")
    if cfg.probe_tokens <= 0:
        raise HeadlensError(f"--probe-tokens must be positive, got {cfg.probe_tokens}")

    f = read_head(ck, cfg.layer, cfg.head, fold_norm=cfg.fold_norm, load_dtype=cfg.dtype)
    d = ck.shape.hidden_size
    svd = factored_svd(f.W_O, f.W_V)  # W_OV = U diag(S) Vh, (d, hd) (hd,) (hd, d)
    S = svd.S
    eps_dtype = _eps_dtype(cfg.dtype)
    eps = torch.finfo(eps_dtype).eps
    rank = int(numerical_rank(S, (d, d), eps))
    tol = float(rank_tolerance(S, (d, d), eps))
    latent_dim = cfg.latent_dim if cfg.latent_dim is not None else min(DEFAULT_LATENT_DIM, rank)
    if rank == 0:
        raise HeadlensError(f"W_OV of layer {cfg.layer} head {cfg.head} is numerically zero (rank 0)")
    if latent_dim > rank:
        raise HeadlensError(f"--latent-dim {latent_dim} is above the rank of W_OV ({rank}): "
                            f"choose 1..{rank}")
    energy = cumulative_energy(S)

    capture: PromptCapture | None = None
    if cfg.prompt or cfg.traces:
        if capture_fn is None:
            raise HeadlensError("--prompt needs a model that can run: pass --weights DIR (a HuggingFace "
                                "model directory with config.json and tokenizer) or --hf-repo")
        capture = capture_fn()
        X = capture.attn_input.to(torch.float64).T  # (d, N): the layer's attention inputs, one column a token
        if X.shape[0] != d:
            raise HeadlensError(f"captured attention input has width {X.shape[0]}, expected {d}")
        if cfg.fold_norm:
            assert f.gain is not None
            # W_OV diag(gamma) acts on x / gamma; where gamma is 0 the folded column is 0 as well.
            safe = torch.where(f.gain != 0, f.gain, torch.ones_like(f.gain))
            X = torch.where((f.gain != 0)[:, None], X / safe[:, None], torch.zeros_like(X))
        cache_inputs, seed = ("traces" if cfg.traces else "prompt"), None
    else:
        X = gaussian_probes(d, cfg.probe_tokens, cfg.seed)
        cache_inputs, seed = "gaussian", cfg.seed
    cache_err = plain_cache_error(svd, X, latent_dim)

    data_aware: DataAwareReport | None = None
    if capture is not None:
        fit = data_aware_latent(svd, f.W_V, X)
        n = X.shape[1]
        even, odd = X[:, 0::2], X[:, 1::2]
        h_white = h_plain = None
        if odd.shape[1] > 0:
            fit_even = data_aware_latent(svd, f.W_V, even)
            h_white = fit_even.measured_error(f.W_O, f.W_V, odd, latent_dim)
            h_plain = plain_cache_error(svd, odd, latent_dim)
        data_aware = DataAwareReport(
            n_tokens=n,
            whitened_error=fit.predicted_error(latent_dim),
            plain_cache_error=cache_err,
            whitened_singular_values=fit.S.tolist(),
            heldout_fit_tokens=even.shape[1],
            heldout_test_tokens=odd.shape[1],
            heldout_whitened_error=h_white,
            heldout_plain_error=h_plain,
        )

    attention = None
    if cfg.heatmap and capture is not None:
        assert capture.attn_probs is not None
        attention = capture.attn_probs[cfg.head].to(torch.float64).tolist()

    return OVResult(
        model=ck.describe(),
        layer=cfg.layer,
        head=cfg.head,
        kv_head=f.kv_head,
        num_heads=ck.shape.num_heads,
        num_value_heads=ck.shape.num_kv_heads,
        head_dim=ck.shape.head_dim,
        hidden_size=d,
        shape=(d, d),
        tensors=f.tensor_names,
        rank=rank,
        rank_tolerance=tol,
        rank_eps_dtype=str(eps_dtype).replace("torch.", ""),
        condition_number=condition_number(S, rank),
        condition_number_definition="sigma_1 / sigma_r over the numerical rank r",
        singular_values=S.tolist(),
        cumulative_energy=energy.tolist(),
        frobenius_norm=float(torch.linalg.norm(S)),
        latent_dim=latent_dim,
        rel_error=float(rel_error(S, latent_dim)),
        cache_error=cache_err,
        cache_inputs=cache_inputs,
        cache_tokens=int(X.shape[1]),
        seed=seed,
        norm_folded=cfg.fold_norm,
        norm_key=f.norm_key,
        dtype=str(cfg.dtype).replace("torch.", ""),
        data_aware=data_aware,
        prompt=cfg.prompt,
        tokens=capture.tokens if capture is not None else None,
        attention=attention,
    )


def _fmt_list(values: list[float], fmt: str, n: int = 10) -> str:
    return " ".join(format(v, fmt) for v in values[:n])


def report_lines(r: OVResult) -> list[str]:
    """The seed tool's lines, in its order and number formats (file lines are added by the caller)."""
    return [
        f"layer={r.layer} head={r.head} num_heads={r.num_heads} num_value_heads={r.num_value_heads}",
        f"W_OV shape: ({r.shape[0]}, {r.shape[1]}) rank: {r.rank}",
        f"condition number: {r.condition_number:.3e}",
        f"latent_dim={r.latent_dim} rel_error={r.rel_error:.3e} cache_error={r.cache_error:.3e}",
        f"singular values (top 10): {_fmt_list(r.singular_values, '.3e')}",
        f"cumulative energy (top 10): {_fmt_list(r.cumulative_energy, '.3f')}",
    ]


def extra_lines(r: OVResult) -> list[str]:
    """What headlens adds after the seed's lines: definitions and the data-aware comparison."""
    group = r.num_heads // r.num_value_heads
    kind = "MHA" if group == 1 else ("MQA" if r.num_value_heads == 1 else "GQA")
    norm = "no" if not r.norm_folded else "yes"
    lines = [
        f"condition number is sigma_1/sigma_r over the numerical rank r={r.rank} "
        f"(tolerance {r.rank_tolerance:.3e} = max(d, d) * eps({r.rank_eps_dtype}) * sigma_1)",
        f"head map: query head {r.head} reads kv head {r.kv_head} ({kind}, {group} query head(s) per kv head), "
        f"head_dim={r.head_dim} hidden_size={r.hidden_size}; norm gain folded: {norm}"
        + (f" ({r.norm_key})" if r.norm_key and r.norm_folded else ""),
    ]
    if r.cache_inputs == "prompt":
        lines.append(f"cache_error inputs: the prompt's {r.cache_tokens} tokens at the input of layer "
                     f"{r.layer}'s attention")
    elif r.cache_inputs == "traces":
        lines.append(f"cache_error inputs: {r.cache_tokens} traced tokens at the input of layer {r.layer}'s "
                     f"attention (toy traces)")
    else:
        lines.append(f"cache_error inputs: {r.cache_tokens} seeded Gaussian probe tokens (seed {r.seed}); "
                     f"pass --prompt to use real activations")
    da = r.data_aware
    if da is not None:
        lines.append(f"latent_dim={r.latent_dim} on the {r.cache_inputs}: data-aware (whitened) error={da.whitened_error:.3e} "
                     f"plain cache_error={da.plain_cache_error:.3e} (in-sample, {da.n_tokens} tokens)")
        if da.heldout_whitened_error is not None and da.heldout_plain_error is not None:
            lines.append(f"held-out (fit on {da.heldout_fit_tokens} even-position tokens, measured on "
                         f"{da.heldout_test_tokens} odd ones): data-aware error={da.heldout_whitened_error:.3e} "
                         f"plain cache_error={da.heldout_plain_error:.3e}")
        if da.n_tokens <= r.latent_dim:
            lines.append(f"note: the {r.cache_inputs} have {da.n_tokens} tokens <= latent_dim {r.latent_dim}, so "
                         f"the data-aware latent is exact on them; use more tokens to measure it")
    return lines


def default_stem(model_name: str, layer: int, head: int) -> str:
    """``<model>_layer<L>_head<H>``, as the seed tool named its plots."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name) or "model"
    return f"{safe}_layer{layer}_head{head}"
