"""Multi-head latent attention (DeepSeek-V2/V3, and checkpoints converted by TransMLA or MHA2MLA).

These models already cache a latent: ``c = RMSNorm_gamma(W_DKV x)`` (``kv_a_proj_with_mqa`` rows
``[:kv_lora_rank]`` and ``kv_a_layernorm``) of ``kv_lora_rank`` numbers per token, plus the shared RoPE key.
Head ``h`` rebuilds its values as ``v^h = W_UV^h c`` (``kv_b_proj`` viewed as ``(H, qk_nope + v_head_dim, r)``,
rows ``[qk_nope:]``) and writes ``W_O^h v^h`` into the stream. So the linear part of head ``h``'s OV circuit is

    W_OV^h = W_O^h  W_UV^h  diag(gamma)  W_DKV          (d x d, rank <= min(v_head_dim, kv_lora_rank))

and the RMSNorm multiplies each token's latent by one number ``1 / rms(W_DKV x)``, which scales a token's
contribution but changes no direction: the spectrum describes the circuit up to that per-token factor.

What the latent is used for, per layer:
- the shared latent map ``diag(gamma) W_DKV`` (r x d): its spectrum;
- per head, the read-out ``C_h = W_O^h W_UV^h diag(gamma)`` (d x r): how many latent directions it uses at
  90 / 99% energy;
- the layer, the stack of every head's read-out ``[C_h]_h`` (H d x r), from its r x r Gram matrix.
All of it factored and in float64; nothing d x d is formed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from headlens.circuits.spectrum import cumulative_energy, factored_svd, numerical_rank, rank_at_energy
from headlens.errors import HeadlensError
from headlens.io.checkpoint import ModelShape
from headlens.io.tensors import TensorSource

if TYPE_CHECKING:
    from headlens.circuits.heads import HeadFactors

ENERGY_LEVELS = (0.9, 0.99)
MLA_KEYS = {  # relative to one layer
    "dkv": "self_attn.kv_a_proj_with_mqa.weight",  # (r + rope, d)
    "gamma": "self_attn.kv_a_layernorm.weight",  # (r,)
    "ukv": "self_attn.kv_b_proj.weight",  # (H * (qk_nope + v), r)
    "o": "self_attn.o_proj.weight",  # (d, H * v)
}


@dataclass(frozen=True)
class MLAShape:
    """The latent-attention geometry of a config (DeepSeek names)."""

    num_layers: int  # decoder layers
    num_heads: int  # H, query heads (each with its own W_UV^h and W_O^h)
    hidden_size: int  # d
    kv_lora_rank: int  # r, the cached latent's size per token
    qk_nope_head_dim: int  # key dims rebuilt from the latent (rows of kv_b_proj before the values)
    qk_rope_head_dim: int  # the shared RoPE key, cached beside the latent
    v_head_dim: int  # value dims per head


def is_mla_config(config: dict | None) -> bool:
    """Whether a config (dict) describes multi-head latent attention."""
    return bool(config) and config.get("kv_lora_rank") is not None


def mla_shape(config: dict) -> MLAShape:
    """The :class:`MLAShape` of a DeepSeek-style config; one-line error naming a missing or bad field."""
    names = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "hidden_size": "hidden_size",
             "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
             "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim"}
    values = {}
    for field, key in names.items():
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if field == "qk_rope_head_dim" else 1):
            raise HeadlensError(f"config.json field {key}={v!r} is not a positive integer (multi-head latent "
                                "attention needs it)")
        values[field] = v
    return MLAShape(**values)


@dataclass
class MLAFactors:
    """One layer's latent-attention blocks (float64): ``W_OV^h = W_O[h] @ W_UV[h] @ diag(gamma) @ W_DKV``."""

    layer: int
    W_DKV: torch.Tensor  # (r, d): the latent's down-projection (without the RoPE rows)
    gamma: torch.Tensor  # (r,): the latent RMSNorm's gain
    W_UV: torch.Tensor  # (H, v, r): each head's value up-projection
    W_O: torch.Tensor  # (H, d, v): each head's block of the output projection


def read_mla_layer(tensors: TensorSource, prefix: str, layer: int, shape: MLAShape) -> MLAFactors:
    """Read and split ``layer``'s latent-attention weights; ``prefix`` is the layer list's, e.g. ``model.layers.``."""
    s = shape
    H, d, r, v, nope, rope = (s.num_heads, s.hidden_size, s.kv_lora_rank, s.v_head_dim, s.qk_nope_head_dim,
                              s.qk_rope_head_dim)
    base = f"{prefix}{layer}."
    expected = {"dkv": (r + rope, d), "gamma": (r,), "ukv": (H * (nope + v), r), "o": (d, H * v)}
    got = {}
    for role, rel in MLA_KEYS.items():
        name = base + rel
        if name not in tensors:
            raise HeadlensError(f"no tensor {name}: not a multi-head latent attention checkpoint")
        t = tensors.read(name)
        if tuple(t.shape) != expected[role]:
            raise HeadlensError(f"{name} has shape {tuple(t.shape)}, expected {expected[role]} for the config's "
                                f"heads={H}, hidden={d}, kv_lora_rank={r}, qk_nope={nope}, rope={rope}, v={v}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HeadlensError(f"tensor {name} has non-finite values (NaN/inf)")
        got[role] = t.to(torch.float64)
    W_DKV = got["dkv"][:r]  # (r, d): rows [r:] are the shared RoPE key
    W_UV = got["ukv"].reshape(H, nope + v, r)[:, nope:]  # (H, v, r): per head [k_nope rows; v rows]
    W_O = got["o"].reshape(d, H, v).permute(1, 0, 2)  # (H, d, v)
    return MLAFactors(layer=layer, W_DKV=W_DKV.contiguous(), gamma=got["gamma"], W_UV=W_UV.contiguous(),
                      W_O=W_O.contiguous())


@dataclass
class SpectrumSummary:
    """Singular values of one operator with its numerical rank and ranks at the energy levels."""

    singular_values: list[float]
    rank: int
    rank_e90: int
    rank_e99: int


def _summary(S: torch.Tensor, shape: tuple[int, int]) -> SpectrumSummary:
    eps = torch.finfo(torch.float32).eps  # the weights' precision sets the rank tolerance, as in `ov`
    E = cumulative_energy(S)
    return SpectrumSummary(singular_values=S.tolist(), rank=int(numerical_rank(S, shape, eps)),
                           rank_e90=int(rank_at_energy(E, 0.9, S)), rank_e99=int(rank_at_energy(E, 0.99, S)))


@dataclass
class MLAHead:
    """One head of a latent-attention layer."""

    head: int
    ov: SpectrumSummary  # W_O^h W_UV^h diag(gamma) W_DKV, d x d, rank <= min(v_head_dim, kv_lora_rank)
    latent_use: SpectrumSummary  # the read-out C_h = W_O^h W_UV^h diag(gamma), d x r: latent directions it uses


@dataclass
class MLALayer:
    """Every head's OV circuit through the latent, and how much of ``kv_lora_rank`` they use."""

    layer: int
    kv_lora_rank: int
    heads: list[MLAHead]
    latent_map: SpectrumSummary  # diag(gamma) W_DKV (r x d): the shared down-projection
    layer_latent_use: SpectrumSummary  # the stack [C_h]_h (H d x r): latent directions the layer reads
    note: str = ("the latent's RMSNorm scales each token by 1/rms(W_DKV x): the spectra are those of the linear "
                 "part, exact up to that one number per token")

    def to_json(self) -> dict:
        return asdict(self)


def head_ov_factors(f: MLAFactors, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``W_OV^h = A @ B``: A = W_O^h (d x v), B = W_UV^h diag(gamma) W_DKV (v x d)."""
    B = (f.W_UV[head] * f.gamma[None, :]) @ f.W_DKV  # (v, r) @ (r, d) -> (v, d)
    return f.W_O[head], B


def analyze_mla_layer(f: MLAFactors) -> MLALayer:
    """Spectra of every head's OV circuit through the latent, of the latent map, and of the latent read-outs."""
    H, d, v = f.W_O.shape
    r = f.W_DKV.shape[0]
    heads = []
    readouts = f.W_UV * f.gamma[None, None, :]  # (H, v, r): W_UV^h diag(gamma)
    for h in range(H):
        A, B = head_ov_factors(f, h)
        ov = factored_svd(A, B).S  # (v,)
        use = factored_svd(f.W_O[h], readouts[h]).S  # (min(v, r),): C_h = W_O^h (W_UV^h diag(gamma))
        heads.append(MLAHead(head=h, ov=_summary(ov, (d, d)), latent_use=_summary(use, (d, r))))
    latent_map = torch.linalg.svdvals(f.gamma[:, None] * f.W_DKV)  # (r,)
    # sum_h C_h^T C_h = sum_h R_h^T (W_O^h^T W_O^h) R_h, (r x r): the stacked read-out's Gram, no (H d x r) stack
    G = torch.einsum("hvr,hvw,hws->rs", readouts, f.W_O.transpose(1, 2) @ f.W_O, readouts)
    stacked = torch.linalg.eigvalsh(G).flip(0).clamp(min=0).sqrt()  # (r,), descending
    return MLALayer(layer=f.layer, kv_lora_rank=r, heads=heads, latent_map=_summary(latent_map, (r, d)),
                    layer_latent_use=_summary(stacked, (H * d, r)))


# ------------------------------------------------------------------------------------------ as a checkpoint


@dataclass
class MLACheckpoint:
    """A latent-attention checkpoint opened for weight reads: what ``ov`` and ``sweep`` need of a Checkpoint."""

    name: str  # short name for output files
    source: str  # where it was read from
    tensors: TensorSource
    prefix: str  # of the layer list, e.g. "model.layers."
    mla: MLAShape
    config: dict
    directory: Path | None  # the HuggingFace directory (config, tokenizer)
    revision: str | None = None

    @property
    def shape(self) -> ModelShape:
        """The head geometry as ``ov`` reports it: every query head has its own values (G = H, hd = v_head_dim)."""
        m = self.mla
        return ModelShape(model_type=str(self.config.get("model_type")), num_layers=m.num_layers,
                          num_heads=m.num_heads, num_kv_heads=m.num_heads, head_dim=m.v_head_dim,
                          hidden_size=m.hidden_size)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "family": "multi-head latent attention",
                "revision": self.revision, **asdict(self.shape), "kv_lora_rank": self.mla.kv_lora_rank,
                **_quantization_of(self.tensors)}

    def layer(self, layer: int) -> MLAFactors:
        if not 0 <= layer < self.mla.num_layers:
            raise HeadlensError(f"`layer` {layer} out of range: {self.name} has {self.mla.num_layers} layers "
                                f"(valid 0..{self.mla.num_layers - 1})")
        return read_mla_layer(self.tensors, self.prefix, layer, self.mla)

    def norm_gain(self, layer: int) -> tuple[torch.Tensor | None, str | None]:
        """The pre-attention norm's gain (d,) float64 and its tensor name, when the checkpoint has it."""
        key = f"{self.prefix}{layer}.input_layernorm.weight"
        if key not in self.tensors:
            return None, None
        return self.tensors.read(key).to(torch.float64), key


def _quantization_of(tensors) -> dict:
    """``{"quantization": ...}`` of a dequantizing source whose checkpoint is quantized, else nothing."""
    q = getattr(tensors, "quantization", None)
    return {"quantization": q.to_json()} if q is not None else {}


def open_mla(source) -> MLACheckpoint:
    """Open the latent-attention checkpoint ``source`` (a :class:`~headlens.io.source.ModelSource` naming a
    HuggingFace directory or hub repo) whose config :func:`is_mla_config`."""
    from headlens.io.quantized import DequantizingSource
    from headlens.io.tensors import open_path

    name, directory, config = source.model_dir()
    # DeepSeek-V3 ships FP8 weights with block scales: read dequantized, as every other checkpoint is
    tensors = DequantizingSource(open_path(directory), config, directory)
    anchor = "0." + MLA_KEYS["ukv"]
    prefixes = [k[: -len(anchor)] for k in tensors.keys() if k.endswith(anchor)]
    if not prefixes:
        raise HeadlensError(f"{directory}: the config describes multi-head latent attention (kv_lora_rank) but no "
                            f"tensor ends in layers.0.{MLA_KEYS['ukv']}")
    lm = [p for p in prefixes if "language_model" in p or "text_model" in p]
    where = f"hub:{source.hf_repo}" if source.hf_repo else str(directory)
    return MLACheckpoint(name=name, source=where, tensors=tensors, prefix=(lm or prefixes)[0], mla=mla_shape(config),
                         config=config, directory=directory, revision=source.revision)


def mla_head_factors(ck: MLACheckpoint, layer: int, head: int, fold_norm: bool = False) -> "HeadFactors":
    """Head ``head``'s OV circuit through the latent as ``ov``'s two thin factors: W_O = W_O^h (d x v) and
    W_V = W_UV^h diag(gamma) W_DKV (v x d), with the pre-attention norm gain folded in when asked."""
    from headlens.circuits.heads import HeadFactors

    if not 0 <= head < ck.mla.num_heads:
        raise HeadlensError(f"`head` {head} out of range: {ck.name} has {ck.mla.num_heads} query heads "
                            f"(valid 0..{ck.mla.num_heads - 1})")
    f = ck.layer(layer)
    A, B = head_ov_factors(f, head)  # (d, v), (v, d)
    gain, key = ck.norm_gain(layer)
    if fold_norm:
        if gain is None:
            raise HeadlensError(f"`fold_norm`: no norm weight feeding layer {layer}'s attention in {ck.name}")
        B = B * gain[None, :]
    base = f"{ck.prefix}{layer}."
    return HeadFactors(layer=layer, head=head, kv_head=head, W_O=A.contiguous(), W_V=B.contiguous(), gain=gain,
                       norm_key=key, norm_folded=fold_norm,
                       tensor_names=[base + MLA_KEYS[r] for r in ("dkv", "gamma", "ukv", "o")])


def latent_token_scale(ck: MLACheckpoint, layer: int, X: torch.Tensor) -> torch.Tensor:
    """The latent RMSNorm's per-token factor ``1 / rms(W_DKV x)`` for attention inputs X (d, N); returns (N,)."""
    f = ck.layer(layer)
    eps = float(ck.config.get("rms_norm_eps") or 1e-6)
    C = f.W_DKV @ X.to(torch.float64)  # (r, N)
    return torch.rsqrt((C ** 2).mean(0) + eps)


def head_latent_use(ck: MLACheckpoint, layer: int, head: int) -> dict:
    """Plain data for ``ov``: how many latent directions this head and its layer read (at 90 / 99% energy)."""
    res = analyze_mla_layer(ck.layer(layer))
    h = res.heads[head]
    return {"kv_lora_rank": res.kv_lora_rank, "head_latent_e90": h.latent_use.rank_e90,
            "head_latent_e99": h.latent_use.rank_e99, "layer_latent_e90": res.layer_latent_use.rank_e90,
            "layer_latent_e99": res.layer_latent_use.rank_e99, "latent_map_rank": res.latent_map.rank,
            "note": res.note}


# ------------------------------------------------------------------------------------------------ sweep


@dataclass
class MLASweepResult:
    """``headlens sweep`` on a latent-attention checkpoint: every selected layer's :class:`MLALayer`."""

    model: dict  # the checkpoint's description
    name: str
    mla: MLAShape
    layers: list[MLALayer]
    kv_bytes: int  # bytes per cached value
    kv_bytes_latent: int  # per token and layer: what the model caches, (kv_lora_rank + qk_rope_head_dim) * B
    kv_bytes_expanded: int  # per token and layer if keys and values were cached per head: H (qk + v) * B

    def head_rows(self) -> list[dict]:
        """One row per head: its OV circuit's rank and ranks at 90/99% energy, and the latent directions it reads."""
        return [{"layer": r.layer, "head": h.head, "ov_rank": h.ov.rank, "ov_rank_e90": h.ov.rank_e90,
                 "ov_rank_e99": h.ov.rank_e99, "ov_sigma_1": h.ov.singular_values[0] if h.ov.singular_values else 0.0,
                 "latent_e90": h.latent_use.rank_e90, "latent_e99": h.latent_use.rank_e99,
                 "kv_lora_rank": r.kv_lora_rank} for r in self.layers for h in r.heads]

    def layer_rows(self) -> list[dict]:
        """One row per layer: the latent map's rank and the latent directions all heads together read."""
        return [{"layer": r.layer, "kv_lora_rank": r.kv_lora_rank, "latent_map_rank": r.latent_map.rank,
                 "latent_map_e90": r.latent_map.rank_e90, "layer_latent_e90": r.layer_latent_use.rank_e90,
                 "layer_latent_e99": r.layer_latent_use.rank_e99,
                 "head_latent_e90_mean": sum(h.latent_use.rank_e90 for h in r.heads) / len(r.heads),
                 "head_latent_e90_max": max(h.latent_use.rank_e90 for h in r.heads)} for r in self.layers]

    def to_json(self) -> dict:
        return {"model": self.model, "mla": asdict(self.mla), "kv_bytes": self.kv_bytes,
                "kv_bytes_per_token_layer": {"latent": self.kv_bytes_latent, "expanded": self.kv_bytes_expanded},
                "layers": self.layer_rows(), "note": MLALayer.note}

    def __repr__(self) -> str:
        from headlens.results import short_repr

        lines = [f"layer {r['layer']:>3}: latent map rank {r['latent_map_rank']}, the heads read "
                 f"{r['layer_latent_e90']} of {r['kv_lora_rank']} latent directions at 90% energy"
                 for r in self.layer_rows()]
        return short_repr(self, f"{self.name}: {len(self.layers)} latent-attention layer(s), kv_lora_rank "
                                f"{self.mla.kv_lora_rank}", lines, "layers[i].heads[h], head_rows(), layer_rows(), "
                          "to_json()")


def mla_block(source, layers: list[int]) -> list:
    """What one task of the latent-attention sweep computes: ``layers`` of ``source``, reading only their tensors."""
    ck = open_mla(source)
    return [analyze_mla_layer(ck.layer(layer)) for layer in layers]


def run_mla_sweep(source, layers: str | None = None, kv_bytes: int = 2,
                  progress=None, executor=None, layers_per_task: int | None = None) -> MLASweepResult:
    """Analyse the selected layers (``"0:4"``, ``"1,3"``, None: all) of the latent-attention checkpoint ``source``;
    with an ``executor`` other than the serial one (:func:`headlens.executor.make_executor`, entered), as tasks of
    ``layers_per_task`` layers (:func:`mla_block`), gathered here in layer order."""
    from headlens.selection import parse_layers

    if source.device_map is not None:
        raise HeadlensError("`device_map` places the modules of a loaded model, but the latent-attention sweep loads "
                            "none (it reads each layer's tensors): leave it out")
    asked = source.placement.device
    if asked not in (None, "auto") and source.torch_device.type != "cpu":  # auto: the CPU, said in the output
        raise HeadlensError(f"`device` {asked}: the latent-attention sweep runs on the CPU only (its per-layer "
                            "products are small); pass `device` cpu or auto")
    ck = open_mla(source)
    m = ck.mla
    chosen = parse_layers(layers, m.num_layers)
    if executor is None or getattr(executor, "name", None) == "serial":
        loop = progress(chosen, len(chosen)) if progress is not None else chosen
        results = [analyze_mla_layer(ck.layer(layer)) for layer in loop]
    else:
        from headlens.executor import Task, block_label, blocks, default_block

        size = layers_per_task or default_block(len(chosen), executor.cpus())
        tasks = [Task(mla_block, (source, block), f"{ck.name}, {block_label(block)}")
                 for block in blocks(chosen, size)]
        done = {}

        def finished():
            for _task, value in executor.results(tasks):
                for r in value:
                    done[r.layer] = r
                    yield r

        for _ in (progress(finished(), len(chosen)) if progress is not None else finished()):
            pass
        results = [done[layer] for layer in chosen]
    return MLASweepResult(model=ck.describe(), name=ck.name, mla=m, layers=results, kv_bytes=kv_bytes,
                          kv_bytes_latent=(m.kv_lora_rank + m.qk_rope_head_dim) * kv_bytes,
                          kv_bytes_expanded=m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
                          * kv_bytes)
