"""Key latents: per kv group a k-dimensional latent of the key, fitted so that the attention logits lose least.

A query head h of kv group g scores key token j from query token i as ``q_i^T k_j`` (times ``1/sqrt(hd)``, which no
relative error sees). A key latent stores ``c_j = E_g (k_j - b)`` (k numbers) and rebuilds ``k'_j = U_g c_j + b``
with ``E_g U_g = I``, so ``k_j - k'_j = (I - U_g E_g)(k_j - b)``. Summed over every query token and query head of
the group, the squared logit error is ``||A_g (I - U_g E_g) K_g||_F^2`` with ``A_g^T A_g = C_q`` the queries' second
moment (``sum_{h in g, i} q_{h,i} q_{h,i}^T``, hd x hd) and ``K_g`` the keys less ``b`` (hd x N). With ``S S^T =
K_g K_g^T = C_k`` (Cholesky; a tiny ridge where ``C_k`` is singular) and ``A_g S = U Sigma V^T``, the best rank-k
projection keeps ``V_k``: ``U_g = S V_k`` (hd x k), ``E_g = V_k^T S^{-1}`` (k x hd), and the relative logit error
is ``sqrt(sum_{i>k} sigma_i^2 / sum_i sigma_i^2)``: the **predicted key error**, exact on the tokens the moments
came from (no ridge, no rotary). It is the value latents' data-aware construction (:mod:`headlens.compress.plan`)
with ``W_O^h`` replaced by the query side and ``W_V^g x`` by the key.

- ``plain`` (weights only, inputs isotropic): ``C_q = sum_{h in g} W~_Q^h W~_Q^h^T`` and ``C_k = W~_K^g W~_K^g^T``,
  the per-head q/k norm gains folded in (``W~ = diag(gain) W``; the per-token RMS scaling is left out). Without
  rotary and norms this is the SVD of the stacked QK operator ``[(W_Q^h)^T W_K^g]_{h in g}``, the sweep's.
- ``data-aware``: ``C_q`` and ``C_k`` from the calibration tokens' own queries and keys as attention receives them
  (after ``q_norm``/``k_norm``), un-rotated (:mod:`headlens.compress.qk_capture`).

**Rotary.** Attention sees ``q_i`` rotated by position i and ``k_j`` by j: the logit is ``q_i^T R(j - i) k_j`` with
``R`` block-diagonal, one 2x2 rotation per frequency pair. The cache stores the latent of the *pre-rotary* key
(un-rotated with the family's own ``apply_rotary_pos_emb``) and rotates the rebuilt key back on read. The error a
key latent causes then depends on the relative rotation; averaged over relative rotations (each pair's angle
uniform, pairs independent) it is ``e^T C~_q e`` with ``C~_q = E_theta[R^T C_q R]``: for a rotary pair (a, b),
``C~_aa = C~_bb = (C_aa + C_bb) / 2`` and every other entry of rows a and b zero (``E[R] = 0`` for the cross terms,
and for the pair's own 2x2 block ``E[R^T M R] = tr(M)/2 I`` for a symmetric M); dimensions the family does not rotate
(partial rotary) keep their block of ``C_q``. The plan uses ``C~_q`` in place of ``C_q``: the predicted key error is
the error expected over relative positions, which the measured logit error on real positions tests (low frequencies
barely turn over a short context, so the two differ).

**Across heads.** Where a rotary layer has G > 1 kv heads, TransMLA's per-frequency latent across heads is fitted
from the same moments (:mod:`headlens.compress.cross_keys`); :func:`kept_form` keeps, per layer, the form with the
lower predicted error at the same numbers per token (:attr:`KeyLayerPlan.form`), and everything downstream (the
compressed passes, the cache, the saved factors, the bytes) uses that form.

**Biases.** A linear key with a bias (GPT-2, OPT, BLOOM: no rotary) is stored as ``c = E (k - b)``, as values are.
Rotary keys with a bias (Qwen2, Phi) are stored as they are (``b`` = 0): the bias is part of the pre-rotary key; the
plain moments then augment the input with a constant 1 (``[W | b]``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from headlens.compress.plan import RIDGE, gram_factor
from headlens.errors import HeadlensError

if TYPE_CHECKING:
    from headlens.compress.cross_keys import FrequencyFit, FrequencyLatent

KEY_KINDS = ("none", "plain", "data-aware")


@dataclass
class KeyGroupLatent:
    """Kv group ``kv_head``'s key latent: ``c = encode @ (k - b)``, ``k' = up @ c + b``. float64."""

    layer: int
    kv_head: int
    kind: str
    k: int
    encode: torch.Tensor  # E_g (k, hd)
    up: torch.Tensor  # U_g (hd, k)
    spectrum: torch.Tensor  # (hd,) singular values of A_g S
    tail: float
    scale: float  # ||A_g S||_F
    ridge: float

    @property
    def predicted_error(self) -> float:
        return self.tail / self.scale if self.scale > 0 else 0.0


@dataclass
class KeyLayerPlan:
    """One layer's key latents (one per kv group), whether they act on pre-rotary keys, and the key bias the cache
    subtracts before encoding (linear keys only; None otherwise)."""

    layer: int
    kind: str
    rotary: bool
    bias: list[torch.Tensor] | None
    groups: list[KeyGroupLatent]
    frequency: "FrequencyFit | None" = None  # TransMLA's per-frequency projection across kv heads (G > 1, rotary)
    form: str = "per_group"  # the form the cache keeps: per_group, or across (the frequency latent; see kept_form)
    _projectors: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    _frequency_latent: "FrequencyLatent | None" = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def ks(self) -> list[int]:
        return [g.k for g in self.groups]

    def frequency_latent(self) -> "FrequencyLatent | None":
        """The per-frequency cross-head latent with the same numbers per token as these per-group latents (made once:
        the measurement asks at every call of the layer)."""
        if self.frequency is None:
            return None
        if self._frequency_latent is None:
            self._frequency_latent = self.frequency.at(sum(self.ks))
        return self._frequency_latent

    @property
    def predicted_error(self) -> float:
        """The layer's predicted relative logit error over its kv groups: ``sqrt(sum tail^2 / sum scale^2)``."""
        den = sum(g.scale ** 2 for g in self.groups)
        return math.sqrt(sum(g.tail ** 2 for g in self.groups) / den) if den > 0 else 0.0

    @property
    def kept_predicted_error(self) -> float:
        """The predicted error of the form kept (:attr:`form`)."""
        freq = self.frequency_latent() if self.form == "across" else None
        return freq.predicted_error if freq is not None else self.predicted_error

    @property
    def numbers(self) -> int:
        """Numbers per token the kept form stores (the per-group ``sum k_g``, or the cross-head latent's K)."""
        freq = self.frequency_latent() if self.form == "across" else None
        return freq.numbers if freq is not None else sum(self.ks)

    @property
    def stores_positions(self) -> bool:
        """Whether the cache keeps each token's position for this layer: per-group latents of rotary keys (the
        cross-head latent commutes with the rotation and is stored from the rotated keys)."""
        return self.rotary and self.form == "per_group"

    def projectors(self) -> torch.Tensor:
        """Per group ``U_g E_g``, stacked (G, hd, hd) float64: what the rebuilt key keeps of ``k - b`` (made once)."""
        if self._projectors is None:
            self._projectors = torch.stack([g.up @ g.encode for g in self.groups])
        return self._projectors

    def cache_latents(self):
        """The :class:`~headlens.compress.cache.KeyLatents` a LatentCache layer stores these keys with: the kept
        form's (:class:`~headlens.compress.cross_keys.CrossKeyLatents` for ``across``)."""
        from headlens.compress.cache import KeyLatents

        if self.form == "across":
            from headlens.compress.cross_keys import cross_latents

            return cross_latents(self)
        return KeyLatents(layer=self.layer, encode=[g.encode for g in self.groups], up=[g.up for g in self.groups],
                          bias=self.bias, rotary=self.rotary)


@dataclass
class KeyMoments:
    """What a layer's key latents are fitted from: per kv group the query and key second moments (G, hd, hd), the
    query moment already averaged over rotations where the layer is rotary."""

    layer: int
    Cq: torch.Tensor  # (G, hd, hd)
    Ck: torch.Tensor  # (G, hd, hd)
    rotary: bool
    bias: list[torch.Tensor] | None  # per group the key bias subtracted before encoding (linear keys), else None
    tokens: int = 0  # how many key tokens Ck sums (0: weights)
    Ck_cross: torch.Tensor | None = None  # (G hd, G hd): every kv head's keys together (for the frequency latent)
    pairs: list = dataclasses.field(default_factory=list)  # the rotary dimension pairs (rotary layers)


def psd_root(C: torch.Tensor) -> torch.Tensor:
    """``A`` (n, n) with ``A^T A = C`` for a symmetric positive semi-definite ``C`` (negative round-off clipped)."""
    C = 0.5 * (C + C.T).to(torch.float64)
    vals, vecs = torch.linalg.eigh(C)
    return vals.clamp_min(0).sqrt()[:, None] * vecs.T


def fit_group(layer: int, g: int, kind: str, Cq: torch.Tensor, Ck: torch.Tensor, k: int,
              ridge: float = RIDGE) -> KeyGroupLatent:
    """Group g's key latent of size k from its moments (module docstring)."""
    hd = Cq.shape[0]
    if not 0 <= k <= hd:
        raise HeadlensError(f"`key_k` {k} out of range for layer {layer}: a kv group's key latent holds 0..{hd} "
                            "(head_dim) numbers")
    A = psd_root(Cq)
    S, lam = gram_factor(Ck, ridge)
    _, sv, Vh = torch.linalg.svd(A @ S)
    V_k = Vh[:k].T  # (hd, k)
    up = S @ V_k
    encode = torch.linalg.solve_triangular(S.T, V_k, upper=True).T.contiguous()  # V_k^T S^{-1}
    return KeyGroupLatent(layer=layer, kv_head=g, kind=kind, k=k, encode=encode, up=up.contiguous(), spectrum=sv,
                          tail=float(torch.linalg.norm(sv[k:])), scale=float(torch.linalg.norm(sv)), ridge=lam)


def plan_keys(m: KeyMoments, kind: str, ks: int | Sequence[int] | None = None) -> KeyLayerPlan:
    """The key latents of one layer from its moments: ``ks`` one size for every group or one per group (default
    head_dim: nothing dropped, the plan budgets are cut from)."""
    G, hd = m.Cq.shape[0], m.Cq.shape[-1]
    sizes = [hd] * G if ks is None else [int(ks)] * G if isinstance(ks, int) else [int(k) for k in ks]
    if len(sizes) != G:
        raise HeadlensError(f"`key_k` gives {len(sizes)} key latent sizes for layer {m.layer}, which has {G} kv groups")
    groups = [fit_group(m.layer, g, kind, m.Cq[g], m.Ck[g], sizes[g]) for g in range(G)]
    freq = None
    if m.rotary and G > 1 and m.Ck_cross is not None and m.bias is None:
        from headlens.compress.cross_keys import fit_frequencies

        freq = fit_frequencies(m.Cq, m.Ck_cross, m.pairs)
    return kept_form(KeyLayerPlan(layer=m.layer, kind=kind, rotary=m.rotary, bias=m.bias, groups=groups,
                                  frequency=freq))


def cut_keys(plan: KeyLayerPlan, ks: Sequence[int]) -> KeyLayerPlan:
    """The same layer's key latents at sizes ``ks`` from a full-size plan: the leading k directions (the top-k
    right singular vectors are a prefix of the full set)."""
    if len(ks) != len(plan.groups):
        raise HeadlensError(f"layer {plan.layer}: {len(ks)} key latent sizes for {len(plan.groups)} kv groups")
    groups = []
    for g, k in zip(plan.groups, ks):
        if not 0 <= k <= g.encode.shape[0]:
            raise HeadlensError(f"layer {plan.layer}, kv group {g.kv_head}: key latent size {k} is outside "
                                f"0..{g.encode.shape[0]}")
        groups.append(KeyGroupLatent(layer=g.layer, kv_head=g.kv_head, kind=g.kind, k=int(k),
                                     encode=g.encode[:k].contiguous(), up=g.up[:, :k].contiguous(),
                                     spectrum=g.spectrum, tail=float(torch.linalg.norm(g.spectrum[k:])),
                                     scale=g.scale, ridge=g.ridge))
    return kept_form(KeyLayerPlan(layer=plan.layer, kind=plan.kind, rotary=plan.rotary, bias=plan.bias,
                                  groups=groups, frequency=plan.frequency))


TIE = 1e-9  # predicted errors closer than this are a tie, which keeps the per-group latent


def kept_form(plan: KeyLayerPlan) -> KeyLayerPlan:
    """``plan`` with :attr:`KeyLayerPlan.form` set by the predictions (calibration moments or weights, never the
    eval texts): ``across`` where the layer has a cross-head frequency latent whose predicted error, at no more
    numbers per token than the per-group latents, is lower by more than :data:`TIE`; else ``per_group``. Both
    predictions are the rotation-averaged logit error relative to the same total energy, so they compare directly."""
    freq = plan.frequency_latent()
    plan.form = "across" if freq is not None and freq.predicted_error < plan.predicted_error - TIE else "per_group"
    return plan


# ------------------------------------------------------------------------------------------------ rotary


def pairs_of(turned: torch.Tensor) -> list[tuple[int, int]]:
    """The (a, b) dimension pairs a rotary turns together, from ``turned`` (hd, hd): row i is basis vector e_i turned
    by 90 degrees with the family's own function. A rotated dimension goes to its partner, a dimension the family
    leaves alone (partial rotary) to itself. HeadlensError where the result is not a pairing."""
    hd = turned.shape[0]
    pairs, seen = [], set()
    for a in range(hd):
        row = turned[a].abs()
        b = int(row.argmax())
        if abs(float(row[b]) - 1.0) > 1e-6 or abs(float(row.sum()) - 1.0) > 1e-6:
            raise HeadlensError("the family's rotary does not turn dimensions in pairs: key latents cannot average "
                                "the queries over its rotations")
        if b == a or a in seen:
            continue  # not rotated, or the pair is listed already
        if int(turned[b].abs().argmax()) != a:
            raise HeadlensError("the family's rotary does not turn dimensions in pairs")
        pairs.append((a, b))
        seen.update((a, b))
    return pairs


def rotation_average(C: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``E_theta[R^T C R]`` (module docstring) for ``C`` (..., hd, hd) and the rotary dimension ``pairs``."""
    out = C.clone()
    for a, b in pairs:
        mean = 0.5 * (C[..., a, a] + C[..., b, b])
        for i in (a, b):
            out[..., i, :] = 0
            out[..., :, i] = 0
        out[..., a, a] = mean
        out[..., b, b] = mean
    return out


# ------------------------------------------------------------------------------------------------ plain moments


def norm_gain(norm, width: int, where: str) -> torch.Tensor:
    """The per-dimension gain of a q/k norm module over ``width`` numbers, read by running it on two random vectors
    (``y = gain * x / rms(x)``); HeadlensError where the two disagree (a norm that is not an RMS scaling with a
    gain, such as a LayerNorm, which subtracts the mean)."""
    w = next((p for p in norm.parameters()), None)
    dtype = w.dtype if w is not None else torch.float32
    device = w.device if w is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, width, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = norm(x.to(device, dtype)).to("cpu", torch.float64)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    gain = y * rms / x
    if not torch.allclose(gain[0], gain[1], rtol=1e-2, atol=1e-6 * float(gain.abs().max())):
        raise HeadlensError(f"{where}: its {type(norm).__name__} is not a per-token RMS scaling with a gain (it "
                            "subtracts a mean or mixes dimensions): plain key latents would rest on an unchecked "
                            "form; use data-aware key latents")
    return gain.mean(0)


def _gains(attn, which: str, heads: int, hd: int, where: str) -> torch.Tensor | None:
    """(heads, hd) gains of the module's q_norm / k_norm (or shared qk_norm), None where it has none."""
    norm = getattr(attn, f"{which}_norm", None) or getattr(attn, "qk_norm", None)
    if norm is None:
        return None
    w = getattr(norm, "weight", None)
    width = int(w.numel()) if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == heads * hd else hd
    gain = norm_gain(norm, width, where)
    return gain.reshape(heads, hd) if width == heads * hd else gain.expand(heads, hd)


def attention_module(model, layer: int):
    """The attention module of decoder/encoder layer ``layer`` (the module whose ``layer_idx`` it is)."""
    def index(m):  # ``layer_idx``; GPT-Neo's is ``layer_id``
        idx = getattr(m, "layer_idx", None)
        return idx if isinstance(idx, int) else getattr(m, "layer_id", None)

    for m in model.modules():
        if index(m) == layer and "Attention" in type(m).__name__ and \
                not any(index(c) == layer and "Attention" in type(c).__name__ for c in m.children()):
            return m
    raise HeadlensError(f"layer {layer}: no attention module with that layer index in the model")


def plain_moments(model, ck, layer: int, rotary: bool, pairs: Sequence[tuple[int, int]],
                  bias_subtracted: bool) -> KeyMoments:
    """The weight-only moments of ``layer`` (module docstring): queries and keys of isotropic inputs, the q/k norm
    gains folded in, a bias kept in the key as a constant input (``[W | b]``) unless the cache subtracts it."""
    from headlens.compress.projections import head_projection

    s = ck.shape
    H, G, hd = s.num_heads, s.num_kv_heads, s.head_dim
    q, k = head_projection(model, ck, layer, "q"), head_projection(model, ck, layer, "k")
    Wq, Wk = q.weights(), k.weights()
    bq, bk = q.biases(), k.biases()
    attn = attention_module(model, layer)
    where = f"layer {layer}"
    gq, gk = _gains(attn, "q", H, hd, where), _gains(attn, "k", G, hd, where)

    def side(W, b, gains, i, keep_bias):
        M = W[i]
        if keep_bias and b is not None:
            M = torch.cat([M, b[i][:, None]], dim=1)
        return M * gains[i][:, None] if gains is not None else M

    Wq_ = [side(Wq, bq, gq, h, True) for h in range(H)]
    Wk_ = [side(Wk, bk, gk, g, not bias_subtracted) for g in range(G)]
    width = max(m.shape[1] for m in Wq_ + Wk_)
    pad = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in Wq_ + Wk_]
    Wq_, Wk_ = pad[:H], pad[H:]
    n = H // G
    Cq = torch.stack([sum(Wq_[g * n + j] @ Wq_[g * n + j].T for j in range(n)) for g in range(G)])
    Ck = torch.stack([W @ W.T for W in Wk_])
    if rotary:
        Cq = rotation_average(Cq, pairs)
    stacked = torch.cat(Wk_)  # (G hd, width): every kv head's keys of the same isotropic input, for the cross-head fit
    return KeyMoments(layer=layer, Cq=Cq, Ck=Ck, rotary=rotary, bias=bk if bias_subtracted else None,
                      Ck_cross=stacked @ stacked.T, pairs=list(pairs))
