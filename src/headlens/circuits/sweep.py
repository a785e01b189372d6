"""Every head of a model at once: OV/QK spectra, kv-group operators, data-aware latents and an MLA budget.

The definitions are :mod:`headlens.circuits.sweep_layer`'s: per query head the OV circuit ``W_O^h W_V^g`` and the QK
form ``W_QK^h = (W_Q^h)^T W_K^g`` (at relative position 0: no rotary; q/k norm gains folded in, their per-token
RMS scale left out); per kv group the stacked value operator ``[W_O^h W_V^g]_h`` and the stacked key operator
``M^K_g = [(W_Q^h)^T W_K^g]_h``, whose spectra the value and key budgets are cut from.

:func:`run_sweep` is the one entry point: it opens the checkpoint of a :class:`~headlens.io.source.ModelSource`,
captures the calibration tokens' attention inputs (data-aware mode), streams the layers through
:func:`~headlens.circuits.sweep_layer.analyze_layer` (weights read one layer ahead in a thread, never the
whole model), keeps every finished layer in the resume store (:class:`~headlens.circuits.sweep_parts.SweepParts`)
and computes the KV budget (:func:`~headlens.circuits.budget.budget`). It returns a :class:`SweepResult`.

    from headlens.io.source import ModelSource
    result = run_sweep(ModelSource(hf_repo="Qwen/Qwen3-0.6B"), SweepConfig(layers="0:4", target_error=0.2))
    result.budget.totals.saving_plain_pct, result.layers[0].heads[3].ov.rel_error[16]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch

from headlens import params
from headlens.circuits.budget import Budget, BudgetTarget
from headlens.circuits.sweep_layer import AnalysisConfig, NonFiniteWeights, analyze_layer
from headlens.circuits.sweep_results import (GroupSpectrum, HeadSpectrum, LayerAggregate, LayerResult,
                                             layer_aggregates, to_rows)
from headlens.errors import HeadlensError
from headlens.io.checkpoint import Checkpoint, ModelShape
from headlens.selection import DTYPE_CHOICES, parse_ks

if TYPE_CHECKING:
    from headlens.io.source import ModelSource



def _text(selection: str | Sequence[int]) -> str:
    return selection if isinstance(selection, str) else ",".join(str(int(x)) for x in selection)


MAX_KV_BYTES = 8  # float64


@dataclass
class SweepConfig:
    """What :func:`run_sweep` does."""

    layers: str | Sequence[int] | None = None  # "0:12" (slice), "1,4,9", "all" or a list; None: every layer
    ks: str | Sequence[int] | None = None  # latent sizes "8,16" or a list; None: 8,16,32,64 up to head_dim
    fold_norm: bool = False  # fold the pre-attention norm gain into the inputs (W diag(gamma))
    with_qk: bool = True  # also the QK-circuit spectra
    dtype: str = "auto"  # precision the weights are rounded to and the model runs in (auto: float32 on the CPU)
    target_error: float | None = None  # budget: relative error <= this per kv group (default 0.1)
    target_energy: float | None = None  # budget: kept energy >= this instead
    kv_bytes: int = 2  # bytes per cached value
    calibration: list[str] | None = None  # calibration texts (data-aware mode); None: weight-only
    max_calib_tokens: int = 2048  # cap on calibration tokens; half fit the latents, half are held out
    out_dir: str | Path | None = None  # where finished layers are kept (<out_dir>/sweep_layers); None: nowhere
    resume: bool = False  # skip the layers already finished in out_dir
    truncate: bool = False  # cut calibration texts longer than the model's positions instead of refusing them

    def __post_init__(self) -> None:
        self._coerce()

    def _coerce(self) -> None:
        """Each field in its one form (one calibration text is a list of one), or a HeadlensError naming the field
        and the type expected."""
        self.layers = params.selection(self.layers, "layers")
        self.ks = params.selection(self.ks, "ks")
        for name in ("fold_norm", "with_qk", "resume", "truncate"):
            setattr(self, name, params.flag(getattr(self, name), name))
        self.dtype = params.choice(self.dtype, "dtype", DTYPE_CHOICES)
        for name in ("target_error", "target_energy"):
            setattr(self, name, params.number(getattr(self, name), name, optional=True))
        for name in ("kv_bytes", "max_calib_tokens"):
            setattr(self, name, params.integer(getattr(self, name), name))
        self.calibration = params.texts(self.calibration, "calibration", optional=True)
        self.out_dir = params.path(self.out_dir, "out_dir")

    def validate(self) -> None:
        """Raise a HeadlensError naming the first bad parameter."""
        self._coerce()  # fields may have been set after construction
        if self.ks is not None:
            parse_ks(_text(self.ks))
        if not 1 <= self.kv_bytes <= MAX_KV_BYTES:
            raise HeadlensError(f"`kv_bytes` must be in 1..{MAX_KV_BYTES} (bytes of one cached value: 1 for fp8, 2 for "
                                f"fp16/bf16, 4 for fp32, 8 for fp64), got {self.kv_bytes}")
        if self.target_error is not None and not 0 <= self.target_error < 1:
            raise HeadlensError(f"`target_error` must be in [0, 1), got {self.target_error:g}")
        if self.target_energy is not None and not 0 < self.target_energy <= 1:
            raise HeadlensError(f"`target_energy` must be in (0, 1], got {self.target_energy:g}")
        if self.max_calib_tokens < 4:
            raise HeadlensError(f"`max_calib_tokens` must be at least 4, got {self.max_calib_tokens}")
        if self.target_error is not None and self.target_energy is not None:
            raise HeadlensError("`target_error` and `target_energy`: give one of them")
        if self.dtype not in DTYPE_CHOICES:
            raise HeadlensError(f"`dtype` {self.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        if self.calibration is not None and not self.calibration:
            raise HeadlensError("`calibration` holds no text")
        if self.resume and self.out_dir is None:
            raise HeadlensError("`resume` needs `out_dir`, where the finished layers are kept")

    def target(self) -> BudgetTarget:
        """The budget target: ``target_energy`` if given, else ``target_error`` (default 0.1)."""
        if self.target_energy is not None:
            return BudgetTarget("energy", self.target_energy)
        return BudgetTarget("error", 0.1 if self.target_error is None else self.target_error)

    def analysis(self, head_dim: int) -> AnalysisConfig:
        """The per-layer config for a model with ``head_dim``."""
        if self.ks is None:
            ks = [k for k in (8, 16, 32, 64) if k <= head_dim] or [head_dim]
        else:
            ks = parse_ks(_text(self.ks), head_dim)
        eps_dtype = torch.float64 if self.dtype == "float64" else torch.float32
        return AnalysisConfig(ks=ks, fold_norm=self.fold_norm, with_qk=self.with_qk,
                              rank_eps=float(torch.finfo(eps_dtype).eps))


@dataclass
class SweepStart:
    """What :func:`run_sweep` is about to do, handed to ``on_start`` before the first layer."""

    name: str  # the model's short name
    shape: ModelShape  # its layers, heads, kv heads, head_dim and hidden size
    todo: list[int]  # layers to analyse now
    done: list[int]  # layers taken from the resume store
    calibration_tokens: int  # captured now (0 without calibration or when nothing is left to do)
    data_aware: bool  # calibration texts were given
    ks: list[int]  # the latent sizes each layer's errors are given at
    model: dict = field(default_factory=dict)  # the checkpoint's description (quantization included)


@dataclass
class SweepResult:
    """Everything a sweep found, in layer order."""

    model: dict[str, Any]  # the checkpoint's description (name, source, family, shape)
    name: str  # the model's short name
    shape: ModelShape  # its layers, heads, kv heads, head_dim and hidden size
    config: AnalysisConfig  # what each layer's analysis computed (latent sizes, rank precision, ...)
    dtype: str  # precision the weights were rounded to
    layers: list[LayerResult]  # the selected layers, in order (resumed ones included)
    budget: Budget  # the KV-cache budget over those layers
    data_aware: bool  # calibration texts were given
    calibration_tokens: int  # tokens captured in this run (fit + held out)
    device: str = "cpu"  # where the Gram products and eigensolves ran
    gram_precision: str = "float64"  # their precision (float32 on MPS, which has no float64)

    def heads(self) -> list[HeadSpectrum]:
        """Every query head of every layer, in layer order."""
        return [h for r in self.layers for h in r.heads]

    def groups(self) -> list[GroupSpectrum]:
        """Every kv group of every layer, in layer order."""
        return [g for r in self.layers for g in r.groups]

    def rows(self) -> tuple[list[dict], list[dict]]:
        """(head rows, group rows): the ``sweep_heads`` / ``sweep_groups`` tables."""
        return to_rows(self.layers)

    def to_json(self) -> dict[str, Any]:
        """Everything as strict JSON data: :meth:`summary` (the ``sweep_summary.json`` content) with the budget's
        rows, and the ``heads`` and ``groups`` table rows (an undefined number, such as a zero head's condition
        number, is null)."""
        from headlens.results import strict

        heads, groups = self.rows()
        return strict({**self.summary(), "budget": self.budget.to_json(with_rows=True), "heads": heads,
                       "groups": groups})

    def __repr__(self) -> str:
        from headlens.results import short_repr

        s, t = self.shape, self.budget.totals
        mode = f"data-aware on {self.calibration_tokens} calibration tokens" if self.data_aware else "weight-only"
        lines = [f"layer {a.layer:>3}: mean OV rank@90% {a.rank_e90.mean:.1f}"
                 + "".join(f", rel_error@{k} {a.rel_error[k].mean:.3f}" for k in self.config.ks)
                 for a in self.aggregates()]
        lines.append(f"budget ({self.budget.target.label()}): KV bytes/token {t.kv_bytes_before} -> "
                     f"{t.kv_bytes_after_plain} plain ({t.saving_plain_pct:.1f}% saved)"
                     + (f", {t.kv_bytes_after_data} data-aware ({t.saving_data_pct:.1f}% saved)"
                        if t.kv_bytes_after_data is not None and t.saving_data_pct is not None else ""))
        return short_repr(self, f"{self.name}: {len(self.layers)} of {s.num_layers} layers, {s.num_heads} query / "
                                f"{s.num_kv_heads} kv heads, head_dim {s.head_dim}; {mode}", lines,
                          "layers[i].heads[h], layers[i].groups[g], budget, rows(), summary(), to_json()")

    def aggregates(self) -> list[LayerAggregate]:
        """One :class:`LayerAggregate` per layer (means/min/max over its heads and kv groups)."""
        return layer_aggregates(self.layers, self.config.ks)

    def config_json(self) -> dict[str, Any]:
        """``{"ks", "fold_norm", "with_qk", "rank_eps", "dtype", "device", "gram_precision"}``, as in
        ``run.json`` and the summary."""
        return {**asdict(self.config), "dtype": self.dtype, "device": self.device,
                "gram_precision": self.gram_precision}

    def summary(self) -> dict[str, Any]:
        """The ``sweep_summary.json`` content: model, config, layers, budget (without its rows), per-layer
        means and notes."""
        per_layer = [{"layer": a.layer, "ov_rank_e90_mean": a.rank_e90.mean,
                      **{f"ov_rel_error_k{k}_mean": a.rel_error[k].mean for k in self.config.ks},
                      **({"qk_rank_e90_mean": a.qk_rank_e90.mean} if a.qk_rel_error else {}),
                      **{f"qk_rel_error_k{k}_mean": a.qk_rel_error[k].mean for k in a.qk_rel_error}}
                     for a in self.aggregates()]
        qk = self.config.with_qk
        notes = (["QK spectra describe W_QK^h = (W_Q^h)^T W_K^g at relative position 0: rotary, which acts between "
                  "W_Q and W_K, is left out; q/k norm gains (Qwen3, OLMo 2, Gemma 3, ...) are folded into W_Q/W_K, "
                  "their per-token RMS scale is left out."] if qk else []) + [
            "Budget: keys are kept in full; each kv group's values become a latent of k_g numbers per token."] + ([
                "Key budget (key_k_plain, key_k_data): the smallest latent of each kv group's keys meeting the same "
                "target on the stacked key operator [(W_Q^h)^T W_K^g]_h, whose error is the relative logit error at "
                "relative position 0 for isotropic query inputs; under rotary it is not directly a cache size."]
                if qk else []) + [
            f"Numerical rank: singular values above max(m, n) * {self.config.rank_eps:.3g} * sigma_1."]
        if self.data_aware:
            notes.append(f"Data-aware: {self.calibration_tokens} calibration tokens at each layer's attention "
                         "input; even positions fit the latents, odd positions are held out.")
        return {"model": self.model, "config": self.config_json(), "layers": [r.layer for r in self.layers],
                "data_aware": self.data_aware, "calibration_tokens": self.calibration_tokens,
                "budget": self.budget.to_json(with_rows=False), "per_layer": per_layer, "notes": notes}


def model_for_texts(source: "ModelSource", ck: Checkpoint, texts: list[str], dtype: torch.dtype, max_tokens: int,
                    truncate: bool = False, purpose: str = "data-aware mode"):
    """(tokenizer, model, position limit) of ``ck`` for running ``texts`` through it: each text checked against the
    model's positions (refused, or cut with ``truncate``); ``purpose`` names what needs the model in the error of a
    checkpoint without a model directory."""
    from headlens.io.source import check_text_lengths
    from headlens.residual.capture import max_positions

    if ck.directory is None:
        raise HeadlensError(f"{purpose} runs the model: pass `weights` DIR (a HuggingFace model directory with "
                            "config.json and tokenizer) or `hf_repo`")
    tok = source.tokenizer(ck.directory)
    limit = max_positions(ck.config or {})
    check_text_lengths(tok, texts, limit, truncate, "calibration text", max_tokens)
    return tok, source.model(ck.directory, dtype), limit


def capture_calibration(source: "ModelSource", ck: Checkpoint, texts: list[str], layers: list[int], dtype: torch.dtype,
                        max_tokens: int, truncate: bool = False) -> tuple[dict[int, torch.Tensor], int]:
    """Every selected layer's attention input for the calibration tokens: ({layer: (d, N) float64}, N). A text
    longer than the model's positions is refused, or cut there with ``truncate``."""
    from headlens.residual.capture import capture_attention_inputs

    tok, model, limit = model_for_texts(source, ck, texts, dtype, max_tokens, truncate)
    X, n = capture_attention_inputs(model, tok, ck.spec, texts, layers, max_tokens, limit)
    if n < 4:
        raise HeadlensError(f"the calibration text gives {n} tokens: at least 4 are needed (half fit, half held out)")
    return X, n


def _fit_and_test(ck: Checkpoint, layer: int, X: torch.Tensor | None, fold_norm: bool):
    """(fit tokens, held-out tokens) of a layer's captured inputs X (d, N): even and odd positions; inputs
    rescaled by 1/gamma when the norm gain is folded into the weights (so W X is unchanged)."""
    if X is None:
        return None, None
    if fold_norm:
        from headlens.circuits.heads import norm_gain

        gain, _ = norm_gain(ck, layer)
        assert gain is not None and gain.shape == (X.shape[0],), (None if gain is None else gain.shape, X.shape)
        safe = torch.where(gain != 0, gain, torch.ones_like(gain))
        X = torch.where((gain != 0)[:, None], X / safe[:, None], torch.zeros_like(X))
    return X[:, 0::2], X[:, 1::2]


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``t`` on ``device`` (float64 becomes float32 on MPS, which has no float64)."""
    if t is None or device.type == "cpu":
        return t
    return t.to(device, torch.float32 if device.type == "mps" and t.dtype == torch.float64 else t.dtype)


def _analyze(ck: Checkpoint, layer: int, f, cfg: AnalysisConfig, X: torch.Tensor | None,
             device: torch.device | None = None) -> LayerResult:
    """One layer's numbers; the Gram products and eigensolves run on ``device`` (results come back to the CPU)."""
    Xf, Xt = _fit_and_test(ck, layer, X, cfg.fold_norm)
    device = device or torch.device("cpu")
    try:
        return analyze_layer(layer, _on(f.W_O, device), _on(f.W_V, device), cfg, _on(f.W_Q, device),
                             _on(f.W_K, device), _on(Xf, device), _on(Xt, device), f.qk_rank_bound)
    except NonFiniteWeights:
        from headlens.circuits.heads import find_non_finite

        find_non_finite(ck, layer, cfg.with_qk)  # raises, naming the tensor
        raise


def run_sweep(source: "ModelSource", cfg: SweepConfig, on_start: Callable[[SweepStart], None] | None = None,
              progress: Callable[[Iterable, int], Iterable] | None = None,
              on_layer: Callable[[LayerResult], None] | None = None, executor: Any = None,
              layers_per_task: int | None = None) -> SweepResult:
    """Sweep the layers ``cfg`` selects of ``source`` (a ModelSource); returns a :class:`SweepResult`.

    ``on_start`` is called once the checkpoint is open, the calibration captured and the resume store ready,
    before the first layer; ``progress(iterable, total)`` may wrap the layer loop (e.g. a progress bar);
    ``on_layer`` gets each layer's result as soon as it is there (first the resumed ones, in layer order, then
    each new one as it finishes).
    Every finished layer is written to ``cfg.out_dir`` at once, so an interrupted sweep resumes there.

    ``executor`` (:func:`headlens.executor.make_executor`, entered) runs blocks of ``layers_per_task`` layers as
    tasks (:func:`headlens.circuits.sweep_run.sweep_block`, each reading only its own layers' tensors); None or
    the serial executor sweeps here, one layer after the other, the next one read in a thread.
    """
    from headlens.circuits.sweep_run import SweepRun

    return SweepRun(source, cfg).run(on_start, progress, on_layer, executor, layers_per_task)
