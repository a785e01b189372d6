"""``headlens toy run`` as one library call: create a toy, trace it, and analyse every head's OV circuit on the
traced attention inputs (the sphere on the traced stream is :func:`headlens.toy.traces.sphere_from_traces`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from headlens.errors import HeadlensError
from headlens.toy.stack import Planting, ToyConfig, build_toy, save_toy
from headlens.toy.traces import TraceInputs, save_traces, toy_inputs, trace


@dataclass
class ToyHeadOV:
    """One query head of the toy, analysed with the traced attention inputs."""

    layer: int
    head: int
    rank: int  # numerical rank of W_OV
    rel_error: float  # spectrum prediction at the latent size
    cache_error_plain: float  # plain latent on the traced inputs
    data_aware_error: float  # whitened latent, in-sample
    heldout_data_aware: float | None  # whitened latent fit on even positions, measured on odd ones
    heldout_plain: float | None  # plain latent on the same odd positions
    singular_values: list[float]  # (hd,) descending
    planted_max_rel_dev: float | None = None  # max |sigma - planted| / max |planted|, when a spectrum was planted

    def to_json(self) -> dict:
        """The row of ``toy_ov.json`` (``planted_max_rel_dev`` only when a spectrum was planted)."""
        row = asdict(self)
        if self.planted_max_rel_dev is None:
            del row["planted_max_rel_dev"]
        return row


@dataclass
class ToyRun:
    """What ``toy run`` made and measured."""

    config: ToyConfig
    planted: torch.Tensor | None  # (head_dim,) planted singular values, or None
    inputs: str  # kind of traced inputs
    n_tokens: int  # traced tokens N
    latent_dim: int  # latent size k the heads were analysed at
    weights: Path  # the saved toy
    traces: Path  # the saved traces (.safetensors)
    heads: list[ToyHeadOV]  # every (layer, head), layer-major

    def to_json(self) -> dict:
        """``toy_ov.json``: the config, the planted spectrum and one row per head."""
        return {"config": asdict(self.config), "planted": None if self.planted is None else self.planted.tolist(),
                "heads": [h.to_json() for h in self.heads]}


def _head_ov(ck, layer: int, head: int, latent_dim: int, traces_path: Path, cap, planted) -> ToyHeadOV:
    """Analyse one head with the traced inputs ``cap`` (a PromptCapture of its layer)."""
    from headlens.circuits.ov import OVConfig, analyze_ov

    r = analyze_ov(ck, OVConfig(layer=layer, head=head, latent_dim=latent_dim, traces=str(traces_path)),
                   capture_fn=lambda: cap)
    da = r.data_aware
    dev = None
    if planted is not None:
        dev = float((torch.tensor(r.singular_values) - planted).abs().max() / planted.abs().max())
    return ToyHeadOV(layer=layer, head=head, rank=r.rank, rel_error=r.rel_error, cache_error_plain=r.cache_error,
                     data_aware_error=da.whitened_error, heldout_data_aware=da.heldout_whitened_error,
                     heldout_plain=da.heldout_plain_error, singular_values=r.singular_values,
                     planted_max_rel_dev=dev)


def run_toy(cfg: ToyConfig, inputs: TraceInputs, out_dir: Path, seed: int = 0, planting: Planting | None = None,
            latent_dim: int = 4) -> ToyRun:
    """Build the toy (:func:`~headlens.toy.stack.build_toy`), save it as ``out_dir/toy.safetensors``, trace
    ``inputs`` through it into ``out_dir/traces.{safetensors,json}``, and analyse every head at latent size
    ``latent_dim`` (1..head_dim) on its layer's traced attention inputs. Returns a :class:`ToyRun`."""
    from headlens.io.files import ensure_dir, readable
    from headlens.io.source import ModelSource
    from headlens.residual.capture import PromptCapture

    cfg.validate()
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim <= 0:
        raise HeadlensError(f"`latent_dim` must be positive, got {latent_dim}")
    if latent_dim > cfg.head_dim:
        raise HeadlensError(f"`latent_dim` {latent_dim} is above the toy's head_dim ({cfg.head_dim}): choose "
                            f"1..{cfg.head_dim}")
    inputs.validate()
    model, planted = build_toy(cfg, seed, planting)
    x = toy_inputs(inputs, cfg.d_model)  # (N, d)
    ensure_dir(out_dir)
    wpath = save_toy(model, out_dir / "toy.safetensors")
    traces = trace(model, x)
    tpath, _ = save_traces(out_dir / "traces", model, traces, {"inputs": inputs.inputs})
    ck = ModelSource(weights=readable(wpath), num_heads=cfg.n_heads).checkpoint()  # staged until the command ends
    k = latent_dim
    heads = []
    for layer in range(cfg.n_layers):
        X = traces[layer]["attn_in"]  # (N, d)
        assert X.shape == x.shape, (tuple(X.shape), tuple(x.shape))
        cap = PromptCapture(input_ids=list(range(len(X))), tokens=[f"t{i}" for i in range(len(X))], attn_input=X,
                            attn_probs=traces[layer]["probs"])
        heads += [_head_ov(ck, layer, head, k, tpath, cap, planted) for head in range(cfg.n_heads)]
    return ToyRun(config=cfg, planted=planted, inputs=inputs.inputs, n_tokens=int(x.shape[0]), latent_dim=k,
                  weights=wpath, traces=tpath, heads=heads)
