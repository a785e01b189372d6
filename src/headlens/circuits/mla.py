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

import torch

from headlens.circuits.spectrum import cumulative_energy, factored_svd, numerical_rank, rank_at_energy
from headlens.errors import HeadlensError
from headlens.io.tensors import TensorSource

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
