"""A toy attention stack in plain PyTorch, with planted heads; saved and loaded as an ordinary checkpoint.

The toy uses HuggingFace's Llama naming (``layers.{l}.self_attn.{q,k,v,o}_proj.weight``,
``layers.{l}.input_layernorm.weight``), so its state dict saved as ``.pt`` or ``.safetensors`` is read by
``headlens ov --weights toy.safetensors --num-heads H`` like any checkpoint.

One layer (shapes in comments, N tokens, d model width, H query heads, G kv heads, hd head dim)::

    a   = norm(x)                    if pre_norm else x          # (N, d)
    q_h = a W_Q^h^T, k_g = a W_K^g^T, v_g = a W_V^g^T            # (N, hd); RoPE on q, k when rope
    P_h = softmax(q_h k_g^T / sqrt(hd) + causal mask)            # (N, N), g = h // (H / G)
    o_h = P_h v_g W_O^h^T                                         # (N, d): head h's write to the stream
    y   = x + sum_h o_h               if residual else sum_h o_h

Inputs and activation traces live in :mod:`headlens.toy.traces`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from headlens.errors import HeadlensError


# Upper limits of the toy's sizes: a toy is small (each limit alone is far above the defaults).
TOY_LIMITS = {"d_model": 4096, "n_heads": 256, "n_kv_heads": 256, "head_dim": 1024, "n_layers": 256}
MAX_TOY_PARAMS = 50_000_000  # attention weights of the whole stack (200 MB in float32)


@dataclass
class ToyConfig:
    d_model: int = 64  # d, width of the residual stream
    n_heads: int = 4  # H, query heads
    n_kv_heads: int = 4  # G, kv heads: == n_heads: MHA; 1: MQA; in between: GQA
    head_dim: int = 16  # hd
    n_layers: int = 2  # attention layers (no MLPs)
    causal: bool = True  # mask future tokens
    rope: bool = False  # rotary embedding on q and k (Llama's pairing)
    pre_norm: bool = True  # RMSNorm before attention (gain stored as input_layernorm.weight)
    residual: bool = True  # add the attention output to the stream (else replace it)
    rope_theta: float = 10000.0  # RoPE base

    def validate(self) -> None:
        """Raise a HeadlensError naming the first size that is not a positive integer within the toy's limits."""
        for name, limit in TOY_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise HeadlensError(f"`{name}` must be an integer in 1..{limit}, got {value}")
        params = self.n_layers * self.d_model * self.head_dim * 2 * (self.n_heads + self.n_kv_heads)
        if params > MAX_TOY_PARAMS:
            raise HeadlensError(f"the toy would have {params:,} attention weights (limit {MAX_TOY_PARAMS:,}): lower "
                                "`d_model`, `head_dim`, `n_heads` or `n_layers`")
        if self.n_heads % self.n_kv_heads:
            raise HeadlensError(f"`n_heads` {self.n_heads} query heads cannot be grouped over `n_kv_heads` "
                                f"{self.n_kv_heads} kv heads")
        if self.rope and self.head_dim % 2:
            raise HeadlensError(f"RoPE needs an even `head_dim`, got {self.head_dim}")
        if not math.isfinite(self.rope_theta) or self.rope_theta <= 1:
            raise HeadlensError(f"`rope_theta` must be a finite number above 1, got {self.rope_theta:g}")


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding on (..., N, hd), rotating pairs (i, i + hd/2) as Llama does."""
    n, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]  # (N, hd/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class ToyAttention(nn.Module):
    """One multi-head attention layer (MHA/MQA/GQA), Llama parameter names."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        d, H, G, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, H * hd, bias=False)
        self.k_proj = nn.Linear(d, G * hd, bias=False)
        self.v_proj = nn.Linear(d, G * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, d, bias=False)

    def forward(self, a: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """a: (N, d) attention input -> (N, d) sum of the heads' writes (per-head parts in ``trace``)."""
        cfg = self.cfg
        N = a.shape[0]
        H, G, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = self.q_proj(a).view(N, H, hd).transpose(0, 1)  # (H, N, hd)
        k = self.k_proj(a).view(N, G, hd).transpose(0, 1)  # (G, N, hd)
        v = self.v_proj(a).view(N, G, hd).transpose(0, 1)  # (G, N, hd)
        if cfg.rope:
            q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
        group = torch.arange(H) // (H // G)
        scores = q @ k[group].transpose(-1, -2) / math.sqrt(hd)  # (H, N, N)
        if cfg.causal:
            scores = scores.masked_fill(torch.triu(torch.ones(N, N, dtype=torch.bool), 1), float("-inf"))
        probs = scores.softmax(-1)
        ctx = probs @ v[group]  # (H, N, hd)
        W_O = self.o_proj.weight.view(cfg.d_model, H, hd)  # (d, H, hd)
        head_out = torch.einsum("hnk,dhk->hnd", ctx, W_O)  # (H, N, d)
        if trace is not None:
            trace.update(q=q, k=k, v=v, probs=probs, head_out=head_out)
        return head_out.sum(0)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ToyLayer(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.self_attn = ToyAttention(cfg)

    def forward(self, x: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        a = self.input_layernorm(x)
        out = self.self_attn(a, trace)
        if trace is not None:
            trace.update(input=x, attn_in=a)
        y = x + out if self.cfg.residual else out
        if trace is not None:
            trace["output"] = y
        return y


class ToyStack(nn.Module):
    """A stack of toy attention layers; ``forward(x)`` on one sequence (N, d)."""

    def __init__(self, cfg: ToyConfig, seed: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(ToyLayer(cfg) for _ in range(cfg.n_layers))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))

    def forward(self, x: torch.Tensor, traces: list[dict] | None = None) -> torch.Tensor:
        for layer in self.layers:
            t: dict | None = {} if traces is not None else None
            x = layer(x, t)
            if traces is not None:
                traces.append(t)
        return x

    # ------------------------------------------------------------------------------ planted spectra

    def plant_ov(self, layer: int, kv_head: int, singular_values: torch.Tensor, seed: int = 0) -> None:
        """Set W_V^g and every W_O^h of group g so that ``W_O^h W_V^g`` has exactly ``singular_values``.

        ``W_V^g = diag(s) V^T`` and ``W_O^h = U_h`` with random orthonormal U_h (d x hd), V (d x hd): then
        ``W_O^h W_V^g = U_h diag(s) V^T`` is an SVD. s has length head_dim (zeros give a lower rank).
        """
        cfg = self.cfg
        hd, d = cfg.head_dim, cfg.d_model
        s = torch.as_tensor(singular_values, dtype=torch.float64)
        if s.shape != (hd,):
            raise HeadlensError(f"planted spectrum has {s.shape[0]} values, head_dim is {hd}")
        if hd > d:
            raise HeadlensError("a planted head needs head_dim <= d_model")
        gen = torch.Generator().manual_seed(seed)
        V, _ = torch.linalg.qr(torch.randn(d, hd, generator=gen, dtype=torch.float64))
        attn = self.layers[layer].self_attn
        g = kv_head
        with torch.no_grad():
            attn.v_proj.weight[g * hd:(g + 1) * hd] = (s[:, None] * V.T).to(attn.v_proj.weight.dtype)
            per = cfg.n_heads // cfg.n_kv_heads
            for h in range(g * per, (g + 1) * per):
                U, _ = torch.linalg.qr(torch.randn(d, hd, generator=gen, dtype=torch.float64))
                attn.o_proj.weight[:, h * hd:(h + 1) * hd] = U.to(attn.o_proj.weight.dtype)


PROFILES = ("geometric", "power", "flat")


def spectrum_profile(kind: str, head_dim: int, rank: int | None = None, decay: float = 0.7,
                     scale: float = 1.0) -> torch.Tensor:
    """Planted singular values (head_dim,): ``geometric`` (s_i = decay^i), ``power`` (s_i = (i+1)^-decay) or
    ``flat``; entries past ``rank`` are zero."""
    i = torch.arange(head_dim, dtype=torch.float64)
    if kind == "geometric":
        s = decay**i
    elif kind == "power":
        s = (i + 1) ** (-decay)
    elif kind == "flat":
        s = torch.ones(head_dim, dtype=torch.float64)
    else:
        raise HeadlensError(f"unknown spectrum profile {kind!r}: choose geometric, power or flat")
    if rank is not None:
        if not 0 < rank <= head_dim:
            raise HeadlensError(f"`rank` {rank} (the planted rank) must be in 1..{head_dim}")
        s[rank:] = 0
    return scale * s


# ---------------------------------------------------------------------------------------------- I/O


def save_toy(model: ToyStack, path: Path) -> Path:
    """State dict (``.pt`` or ``.safetensors``) plus ``<path>.toy.json`` with the config."""
    from headlens.io.files import atomic_path, write_json

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        elif path.suffix in (".pt", ".bin"):
            torch.save(sd, tmp)
        else:
            raise HeadlensError(f"{path}: save the toy as .safetensors or .pt")
    write_json(Path(str(path) + ".toy.json"), asdict(model.cfg))
    return path


def load_toy(path: Path) -> ToyStack:
    """The toy saved by :func:`save_toy` at ``path`` (its config read from ``<path>.toy.json``)."""
    meta = Path(str(path) + ".toy.json")
    if not meta.exists():
        raise HeadlensError(f"{meta} is missing: a toy checkpoint keeps its config next to the weights")
    cfg = ToyConfig(**json.loads(meta.read_text()))
    model = ToyStack(cfg)
    from headlens.io.tensors import open_path

    src = open_path(path)
    sd = {k: src.read(k) for k in src.keys()}
    model.load_state_dict(sd)
    return model


@dataclass
class Planting:
    """A spectrum planted in every kv group's ``W_OV`` (see :func:`spectrum_profile`)."""

    kind: str  # "geometric" (s_i = decay^i), "power" (s_i = (i+1)^-decay) or "flat"
    rank: int | None = None  # planted rank: zeros after it (None: head_dim)
    decay: float = 0.7  # geometric ratio or power-law exponent

    def validate(self) -> None:
        """Raise a HeadlensError naming ``kind``, ``rank`` or ``decay`` when the profile is not a descending
        spectrum of finite values (``rank`` is checked against head_dim by :func:`spectrum_profile`)."""
        if self.kind not in PROFILES:
            raise HeadlensError(f"`kind` {self.kind!r}: choose {', '.join(PROFILES)}")
        d = self.decay
        if not isinstance(d, (int, float)) or not math.isfinite(d):
            raise HeadlensError(f"`decay` must be a finite number, got {d}")
        if self.kind == "geometric" and not 0 < d <= 1:
            raise HeadlensError(f"`decay` of a geometric spectrum (s_i = decay^i) must be in (0, 1], got {d:g}")
        if self.kind == "power" and not 0 <= d <= 100:
            raise HeadlensError(f"`decay` of a power-law spectrum (s_i = (i+1)^-decay) must be in [0, 100], got {d:g}")


def build_toy(cfg: ToyConfig, seed: int = 0, planting: Planting | None = None) -> tuple[ToyStack, torch.Tensor | None]:
    """A seeded toy; with ``planting`` every kv group's ``W_OV`` gets that spectrum. Returns (model, the planted
    singular values (head_dim,) or None)."""
    cfg.validate()
    if planting is not None:
        planting.validate()
    model = ToyStack(cfg, seed=seed)
    planted = None
    if planting is not None:
        planted = spectrum_profile(planting.kind, cfg.head_dim, planting.rank, planting.decay)
        for layer in range(cfg.n_layers):
            for g in range(cfg.n_kv_heads):
                model.plant_ov(layer, g, planted, seed=seed * 1000 + layer * 100 + g)
    return model, planted
