"""``headlens ov``: one head's OV circuit, its spectrum, and what a rank-k latent cache of it loses.

:func:`analyze_head` is the library entry point: it opens the checkpoint a :class:`~headlens.io.source.ModelSource`
names, runs the prompt through the model (or reads toy traces) when one is given, and returns an
:class:`OVResult` (plain data, JSON-ready)::

    from headlens.circuits.ov import OVConfig, analyze_head
    from headlens.io.source import ModelSource
    r = analyze_head(ModelSource(), OVConfig(layer=3, head=5, latent_dim=8, prompt="The true meaning of life"))
    r.singular_values, r.cache_error, r.data_aware.whitened_error

:func:`analyze_ov` does the computation on an open checkpoint, with the attention inputs from ``capture_fn``.
The printed lines and the pictures are :mod:`headlens.report.ov`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from headlens import params
from headlens.arch import GENERIC
from headlens.circuits.heads import HeadFactors, check_layer_head, read_head
from headlens.circuits.mla import (MLACheckpoint, head_latent_use, is_mla_config, latent_token_scale,
                                   mla_head_factors, open_mla)
from headlens.circuits.qk import CIRCUITS, QKReport, analyze_qk
from headlens.circuits.spectrum import (
    FactoredSVD,
    data_aware_latent,
    factored_svd,
    gaussian_probes,
    plain_cache_error,
    spectrum_block,
)
from headlens.errors import HeadlensError
from headlens.io.checkpoint import Checkpoint
from headlens.io.source import ModelSource
from headlens.residual.capture import PromptCapture
from headlens.selection import DTYPE_CHOICES

DEFAULT_LATENT_DIM = 32
DEFAULT_PROBE_TOKENS = 2048
PROBE_BYTES = 1 << 30  # the Gaussian probes (d x N float64) may take at most 1 GiB


@dataclass
class OVConfig:
    """What to analyse (no argparse here: the CLI builds this). Checks its own fields when built."""

    layer: int  # decoder layer index
    head: int  # query head index h (it reads kv head h // (H / G))
    latent_dim: int | None = None  # latent size k for rel_error / cache_error; None: min(32, numerical rank)
    fold_norm: bool = False  # analyse W_OV diag(gamma) with the pre-attention norm gain folded in
    dtype: torch.dtype | str = torch.float32  # weights are rounded to this (the model's run dtype); a name or auto
    prompt: str | None = None  # real attention inputs for cache_error and the data-aware latent
    traces: str | None = None  # or a toy trace file (headlens toy trace) providing the attention inputs
    heatmap: bool = False  # also record this head's attention pattern over the prompt (or the traces)
    truncate: bool = False  # cut a prompt longer than the model's positions instead of refusing it
    probe_tokens: int = DEFAULT_PROBE_TOKENS  # Gaussian probes for cache_error when there is no prompt
    seed: int = 0  # seed of the Gaussian probes
    circuit: str = "ov"  # "ov", "qk" (W_QK = W_Q^T W_K, headlens.circuits.qk) or "both"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`HeadlensError` (naming the field) for a request that cannot be answered, a wrong type
        included (``layer="3"``, a list of prompts)."""
        self._coerce()
        if self.heatmap and not (self.prompt or self.traces):
            raise HeadlensError("`heatmap` needs `prompt` TEXT (the tokens to draw attention over)")
        if self.prompt is not None and not self.prompt.strip():
            raise HeadlensError("`prompt` is empty")
        if self.latent_dim is not None and self.latent_dim <= 0:
            raise HeadlensError(f"`latent_dim` must be positive, got {self.latent_dim}")
        if self.prompt is not None and self.traces is not None:
            raise HeadlensError("give either `prompt` or `traces`, not both")
        if self.probe_tokens <= 0:
            raise HeadlensError(f"`probe_tokens` must be positive, got {self.probe_tokens}")
        if not 0 <= self.seed < 2**63:
            raise HeadlensError(f"`seed` must be in 0..{2**63 - 1}, got {self.seed}")


    def _coerce(self) -> None:
        for name in ("layer", "head", "probe_tokens", "seed"):
            setattr(self, name, params.integer(getattr(self, name), name))
        self.latent_dim = params.integer(self.latent_dim, "latent_dim", optional=True)
        for name in ("fold_norm", "heatmap", "truncate"):
            setattr(self, name, params.flag(getattr(self, name), name))
        self.prompt = params.text(self.prompt, "prompt")
        self.traces = params.path(self.traces, "traces")
        self.circuit = params.choice(self.circuit, "circuit", CIRCUITS)
        if not isinstance(self.dtype, torch.dtype):
            name = params.choice(self.dtype, "dtype", DTYPE_CHOICES)
            self.dtype = name if name == "auto" else getattr(torch, name)  # auto: the source's, in analyze_head


@dataclass
class DataAwareReport:
    """Data-aware (whitened) latent versus the plain one, on the prompt's tokens."""

    n_tokens: int  # N tokens the latent was fitted on
    whitened_error: float  # in-sample, equals the spectrum prediction
    plain_cache_error: float  # same tokens, plain latent
    whitened_singular_values: list[float]  # (hd,) singular values of W_OV S, S S^T = X X^T
    heldout_fit_tokens: int  # fit on even positions, measured on odd ones
    heldout_test_tokens: int
    heldout_whitened_error: float | None  # None when there is no odd position
    heldout_plain_error: float | None


@dataclass
class OVResult:
    """Every number ``headlens ov`` reports about one head (``to_json`` is what ``--json`` writes)."""

    model: dict  # the checkpoint's name, source, family, revision and shape
    layer: int
    head: int
    kv_head: int  # g = h // (H / G)
    num_heads: int  # H
    num_value_heads: int  # G
    head_dim: int  # hd
    hidden_size: int  # d
    shape: tuple[int, int]  # (d, d), the shape of W_OV (never built)
    tensors: list[str]  # the checkpoint tensors read (v, o)
    rank: int  # numerical rank r
    rank_tolerance: float  # max(d, d) * eps * sigma_1
    rank_eps_dtype: str  # the precision whose eps sets the tolerance
    condition_number: float  # sigma_1 / sigma_r
    condition_number_definition: str
    singular_values: list[float]  # (hd,) descending
    cumulative_energy: list[float]  # (hd,) E_k
    frobenius_norm: float  # ||W_OV||_F
    latent_dim: int  # k
    rel_error: float  # sqrt(1 - E_k)
    cache_error: float  # ||(W - W_k) X||_F / ||W X||_F, plain latent
    cache_inputs: str  # "prompt", "traces" or "gaussian"
    cache_tokens: int  # N columns of X
    seed: int | None  # of the Gaussian probes; None with a prompt or traces
    norm_folded: bool
    norm_key: str | None  # the norm weight folded (or found)
    dtype: str  # the precision the weights were rounded to
    data_aware: DataAwareReport | None = None  # with a prompt or traces
    prompt: str | None = None
    tokens: list[str] | None = None  # (N,) each prompt token decoded on its own
    attention: list[list[float]] | None = None  # (N, N) query x key, when a heatmap was asked for
    files: dict[str, str] = field(default_factory=dict)  # what the report wrote: plot, heatmap, json
    latent: dict | None = None  # multi-head latent attention: kv_lora_rank and the latent directions read
    device: str = "cpu"  # where the factored SVD and the cache errors ran (float64 throughout)
    circuit: str = "ov"  # what was asked for: "ov", "qk" or "both"
    qk: QKReport | None = None  # the QK circuit, with circuit "qk" or "both"

    def to_json(self) -> dict:
        """Every field as strict JSON data (tuples as lists, an undefined number as None): what ``--json`` writes.
        With circuit "ov" exactly the OV circuit's fields; "both" adds ``circuit`` and the ``qk`` block; "qk" keeps
        the head's description (model, layer, head, sizes, inputs, files) and ``qk``, not the OV numbers."""
        from headlens.results import strict

        out = strict(asdict(self))
        if self.circuit == "ov":
            del out["circuit"], out["qk"]
        elif self.circuit == "qk":
            out = {k: v for k, v in out.items() if k not in OV_ONLY_FIELDS}
        return out

    def __repr__(self) -> str:
        from headlens.results import short_repr

        name = self.model.get("name", "?") if isinstance(self.model, dict) else "?"
        if self.qk is not None:
            q = self.qk
            head_line = (f"{name} layer {self.layer} head {self.head} (kv head {self.kv_head}): W_QK rank {q.rank} "
                         f"of head_dim {self.head_dim}, condition number {q.condition_number:.4g}")
            qk_lines = [f"W_QK latent_dim {q.latent_dim}: rel_error {q.rel_error:.3f}"]
            if q.prompt_logit_rel_error is not None:
                qk_lines.append(f"prompt logits: rel_error {q.prompt_logit_rel_error:.3f}, attention KL "
                                f"{q.prompt_attention_kl:.3g}")
            if self.circuit == "qk":
                return short_repr(self, head_line, qk_lines, "qk, to_json()")
        lines = [f"latent_dim {self.latent_dim}: rel_error {self.rel_error:.3f}, cache_error {self.cache_error:.3f} "
                 f"({self.cache_inputs}, {self.cache_tokens} tokens)"]
        if self.data_aware is not None:
            d = self.data_aware
            held = "n/a" if d.heldout_whitened_error is None else f"{d.heldout_whitened_error:.3f}"
            lines.append(f"data-aware latent: error {d.whitened_error:.3f} in-sample, {held} held out")
        if self.qk is not None:
            lines += qk_lines
        return short_repr(self, f"{name} layer {self.layer} head {self.head} (kv head {self.kv_head}): rank "
                                f"{self.rank} of head_dim {self.head_dim}, condition number {self.condition_number:.4g}",
                          lines, "singular_values, cumulative_energy, data_aware, attention, "
                                 + ("qk, " if self.qk is not None else "") + "to_json()")


# The OVResult fields that are the OV circuit's numbers (left out of the JSON when only the QK circuit was asked for).
OV_ONLY_FIELDS = ("shape", "tensors", "rank", "rank_tolerance", "rank_eps_dtype", "condition_number",
                  "condition_number_definition", "singular_values", "cumulative_energy", "frobenius_norm",
                  "latent_dim", "rel_error", "cache_error", "cache_inputs", "cache_tokens", "seed", "data_aware",
                  "latent")


# ------------------------------------------------------------------------------------------ entry point


def open_head(source: ModelSource, cfg: OVConfig) -> Checkpoint | MLACheckpoint:
    """The checkpoint :func:`analyze_head` reads: layer ``cfg.layer``'s attention tensors, or everything a
    forward pass needs (config, weights, tokenizer) when ``cfg.prompt`` is set. A multi-head latent attention
    checkpoint (DeepSeek-V2/V3, TransMLA/MHA2MLA conversions) opens as an :class:`MLACheckpoint`."""
    if is_mla_config(source.peek_config()):
        return open_mla(source)
    return source.checkpoint(layers=[cfg.layer], full=bool(cfg.prompt))


def analyze_head(source: ModelSource, cfg: OVConfig, checkpoint: Checkpoint | None = None) -> OVResult:
    """Analyse query head ``cfg.head`` of layer ``cfg.layer`` of the model ``source`` names.

    With ``cfg.prompt`` the HuggingFace model and tokenizer are loaded and the prompt's attention inputs at that
    layer are hooked; with ``cfg.traces`` they are read from a toy trace file; otherwise seeded Gaussian probes
    stand in. ``checkpoint``: one already opened with :func:`open_head` (the CLI names its files first).
    Returns the :class:`OVResult`.
    """
    params.instance(source, "source", ModelSource, 'e.g. headlens.ModelSource(embedded="tiny-lm")')
    params.instance(cfg, "cfg", OVConfig, "e.g. headlens.OVConfig(layer=3, head=5)")
    cfg.check()
    if cfg.dtype == "auto":
        cfg = replace(cfg, dtype=source.dtype("auto"))
    if not cfg.prompt and source.device_map is not None:
        raise HeadlensError("`device_map` places the modules of a loaded model, but without `prompt` the head is "
                            "analysed from its weights alone and no model is loaded: leave it out and choose `device`")
    ck = checkpoint if checkpoint is not None else open_head(source, cfg)
    capture_fn = _prompt_capture(source, ck, cfg) if cfg.prompt else None  # traces: analyze_ov reads them
    return analyze_ov(ck, cfg, capture_fn=capture_fn, device=source.torch_device)


def _prompt_capture(source: ModelSource, ck: Checkpoint | MLACheckpoint, cfg: OVConfig) -> Callable[[], PromptCapture]:
    """Run ``cfg.prompt`` through the model and hook layer ``cfg.layer``'s attention input (and probabilities)."""
    from headlens.residual.capture import capture_layer, max_positions, prompt_ids

    assert cfg.prompt is not None

    def capture() -> PromptCapture:
        if ck.directory is None:
            raise HeadlensError("`prompt` needs config.json and tokenizer files: pass `weights` DIR (a "
                                "HuggingFace model directory) or `hf_repo`, not a bare state dict")
        tokenizer = source.tokenizer(ck.directory)
        prompt_ids(tokenizer, cfg.prompt, max_positions(ck.config or {}), truncate=cfg.truncate)  # fail early
        model = source.model(ck.directory, cfg.dtype)
        spec = GENERIC if isinstance(ck, MLACheckpoint) else ck.spec  # MLA layers: layers.<l>.self_attn
        return capture_layer(model, tokenizer, spec, cfg.layer, cfg.prompt, want_probs=cfg.heatmap,
                             truncate=cfg.truncate)

    return capture


def _trace_capture(cfg: OVConfig) -> Callable[[], PromptCapture]:
    """Read layer ``cfg.layer``'s attention input (N, d) and probabilities (H, N, N) from ``cfg.traces``."""

    def capture() -> PromptCapture:
        from headlens.io.files import read_json_and_tensors  # a toy trace file (headlens toy trace)

        meta, tensors = read_json_and_tensors(cfg.traces, "traces")
        key = f"layer{cfg.layer}.attn_in"
        if key not in tensors:
            raise HeadlensError(f"`traces` {cfg.traces} has no layer {cfg.layer} (it traced {meta.get('layers')} "
                                "layers)")
        x = tensors[key]  # (N, d)
        probs = tensors.get(f"layer{cfg.layer}.probs")  # (H, N, N) or absent
        n = x.shape[0]
        if x.dim() != 2 or (probs is not None and tuple(probs.shape[1:]) != (n, n)):
            raise HeadlensError(f"`traces` {cfg.traces}: layer {cfg.layer} has attention input {tuple(x.shape)} "
                                f"and probabilities {None if probs is None else tuple(probs.shape)}, expected "
                                "(N, d) and (H, N, N)")
        return PromptCapture(input_ids=list(range(n)), tokens=[f"t{i}" for i in range(n)], attn_input=x,
                             attn_probs=probs)

    return capture


# ------------------------------------------------------------------------------------------ computation


def _captured_inputs(capture: PromptCapture, f: HeadFactors, d: int, cfg: OVConfig) -> torch.Tensor:
    """X (d, N) float64: the captured attention inputs, one column a token, divided by gamma when folding."""
    X = capture.attn_input.to(f.W_O.device, torch.float64).T  # (N, d) -> (d, N), where the factors are
    if X.dim() != 2 or X.shape[0] != d:
        raise HeadlensError(f"captured attention input has width {X.shape[0]}, expected {d}")
    if cfg.fold_norm:
        assert f.gain is not None and f.gain.shape == (d,), f.gain
        # W_OV diag(gamma) acts on x / gamma; where gamma is 0 the folded column is 0 as well.
        safe = torch.where(f.gain != 0, f.gain, torch.ones_like(f.gain))
        X = torch.where((f.gain != 0)[:, None], X / safe[:, None], torch.zeros_like(X))
    return X


def _data_aware(svd: FactoredSVD, f: HeadFactors, X: torch.Tensor, latent_dim: int,
                cache_err: float) -> DataAwareReport:
    """The whitened latent fitted on all of X (d, N), and fitted on even positions, measured on odd ones."""
    fit = data_aware_latent(svd, f.W_V, X)
    even, odd = X[:, 0::2], X[:, 1::2]  # (d, ceil(N/2)), (d, floor(N/2))
    h_white = h_plain = None
    if odd.shape[1] > 0:
        fit_even = data_aware_latent(svd, f.W_V, even)
        h_white = fit_even.measured_error(f.W_O, f.W_V, odd, latent_dim)
        h_plain = plain_cache_error(svd, odd, latent_dim)
    return DataAwareReport(
        n_tokens=X.shape[1], whitened_error=fit.predicted_error(latent_dim), plain_cache_error=cache_err,
        whitened_singular_values=fit.S.tolist(), heldout_fit_tokens=even.shape[1],
        heldout_test_tokens=odd.shape[1], heldout_whitened_error=h_white, heldout_plain_error=h_plain)


def _token_inputs(ck: Checkpoint | MLACheckpoint, cfg: OVConfig, f: HeadFactors,
                  capture_fn: Callable[[], PromptCapture] | None
                  ) -> tuple[PromptCapture | None, torch.Tensor, str, int | None]:
    """(capture, X (d, N) float64, what X is, the probes' seed): the prompt's or traces' attention inputs, or
    seeded Gaussian probes."""
    d = ck.shape.hidden_size
    if not (cfg.prompt or cfg.traces):
        return None, gaussian_probes(d, cfg.probe_tokens, cfg.seed), "gaussian", cfg.seed  # (d, probe_tokens)
    if capture_fn is None and cfg.traces:
        capture_fn = _trace_capture(cfg)
    if capture_fn is None:
        raise HeadlensError("`prompt` needs a model that can run: call analyze_head(source, cfg), which "
                            "loads it, or pass `capture_fn`")
    capture = capture_fn()
    X = _captured_inputs(capture, f, d, cfg)  # (d, N)
    if isinstance(ck, MLACheckpoint):  # the latent RMSNorm scales each token's value path by 1 / rms(W_DKV x)
        X = X * latent_token_scale(ck, cfg.layer, capture.attn_input.to(torch.float64).T).to(X.device)[None, :]
    return capture, X, ("traces" if cfg.traces else "prompt"), None


def max_probe_tokens(d: int) -> int:
    """The most Gaussian probe tokens of width ``d`` that fit in :data:`PROBE_BYTES` as float64."""
    return PROBE_BYTES // (8 * d)


def analyze_ov(
    ck: Checkpoint | MLACheckpoint,
    cfg: OVConfig,
    capture_fn: Callable[[], PromptCapture] | None = None,
    device: torch.device | None = None,
) -> OVResult:
    """Analyse query head ``cfg.head`` of layer ``cfg.layer`` of the open checkpoint ``ck``; returns the
    :class:`OVResult`.

    ``capture_fn`` returns that layer's attention inputs (a :class:`PromptCapture`); it is required when
    ``cfg.prompt`` is set (:func:`analyze_head` builds it); without one, ``cfg.traces`` is read from its file.
    The factored SVD and the cache errors run in float64 on ``device`` (default the CPU; MPS, without float64,
    stays on the CPU).
    """
    params.instance(cfg, "cfg", OVConfig, "e.g. headlens.OVConfig(layer=3, head=5)")
    cfg.check()
    if cfg.dtype == "auto":  # no source here to ask: the weights as the CPU runs them
        cfg = replace(cfg, dtype=torch.float32)
    check_layer_head(ck, cfg.layer, cfg.head)
    d = ck.shape.hidden_size
    most = max_probe_tokens(d)
    if cfg.probe_tokens > most and not (cfg.prompt or cfg.traces):
        raise HeadlensError(f"`probe_tokens` {cfg.probe_tokens} is above {most}: {most} Gaussian probes of width "
                            f"{d} in float64 already take the {PROBE_BYTES >> 30} GiB allowed")
    mla = isinstance(ck, MLACheckpoint)
    if mla and cfg.circuit != "ov":
        raise HeadlensError(f"`circuit` {cfg.circuit}: multi-head latent attention has no single QK bilinear form "
                            "(its keys are a latent part scaled per token by kv_a_layernorm plus a decoupled rotary "
                            "part that is not): only `circuit` ov applies")
    f = mla_head_factors(ck, cfg.layer, cfg.head, cfg.fold_norm) if mla else \
        read_head(ck, cfg.layer, cfg.head, fold_norm=cfg.fold_norm, load_dtype=cfg.dtype)
    dev = torch.device("cpu") if device is None or device.type == "mps" else device
    f = _factors_on(f, dev)
    svd = factored_svd(f.W_O, f.W_V)  # W_OV = U diag(S) Vh, (d, hd) (hd,) (hd, d)
    block = spectrum_block(svd.S, d, cfg.dtype, cfg.latent_dim, DEFAULT_LATENT_DIM, "W_OV",
                           f"of layer {cfg.layer} head {cfg.head}")
    latent_dim = block["latent_dim"]

    capture, X, cache_inputs, seed = _token_inputs(ck, cfg, f, capture_fn)
    X = X.to(dev)
    cache_err = plain_cache_error(svd, X, latent_dim)
    data_aware = _data_aware(svd, f, X, latent_dim, cache_err) if capture is not None else None
    attention = None
    if cfg.heatmap and capture is not None:
        assert capture.attn_probs is not None and capture.attn_probs.shape[1:] == (X.shape[1],) * 2
        attention = capture.attn_probs[cfg.head].to(torch.float64).tolist()  # (N, N)
    qk = None
    if cfg.circuit != "ov":  # the q/k projections read the same tokens X as v (divided by gamma when folding)
        assert isinstance(ck, Checkpoint)
        qk = analyze_qk(ck, cfg.layer, cfg.head, cfg.latent_dim, DEFAULT_LATENT_DIM, cfg.fold_norm, cfg.dtype,
                        X if capture is not None else None, dev)

    s = ck.shape
    return OVResult(
        model=ck.describe(), layer=cfg.layer, head=cfg.head, kv_head=f.kv_head, num_heads=s.num_heads,
        num_value_heads=s.num_kv_heads, head_dim=s.head_dim, hidden_size=d, shape=(d, d), tensors=f.tensor_names,
        **block, cache_error=cache_err, cache_inputs=cache_inputs,
        cache_tokens=int(X.shape[1]), seed=seed, norm_folded=cfg.fold_norm, norm_key=f.norm_key,
        dtype=str(cfg.dtype).replace("torch.", ""), data_aware=data_aware, prompt=cfg.prompt,
        tokens=capture.tokens if capture is not None else None, attention=attention,
        latent=head_latent_use(ck, cfg.layer, cfg.head) if mla else None, device=str(dev), circuit=cfg.circuit, qk=qk,
    )


def _factors_on(f: HeadFactors, device: torch.device) -> HeadFactors:
    """The head's factors (and norm gain) on ``device``."""
    if device.type == "cpu":
        return f
    from dataclasses import replace

    return replace(f, W_O=f.W_O.to(device), W_V=f.W_V.to(device), gain=None if f.gain is None else f.gain.to(device))
