"""TransMLA's per-frequency cross-head key latent (RoRoPE), fitted, chosen per layer and stored in a LatentCache.

**The fit** (:func:`fit_frequencies`, :class:`FrequencyFit`): per rotary frequency pair (a, b) one real map across
the kv heads, applied alike to both components; the dimensions a partial rotary leaves alone form one more block
(frequency 0). Such a map commutes with the rotation: with ``x`` a token's keys of all G kv heads side by side
(G hd numbers, kv head g's dimension d at ``g hd + d``) and ``R(p)`` the rotation at position p applied to each head,
``P R(p) = R(p) P`` for ``P = U E`` (on a pair, ``R(p)`` is ``cos I + sin J`` acting on the two components, and
``P = P_f (x) I_2`` commutes with both; on the unrotated block ``R(p)`` is the identity). So ``U E R(p) k_pre =
R(p) U E k_pre``: the latent of the *rotated* key is the latent of the pre-rotary key turned, and the cache needs no
un-rotation and no positions.

**The cache** (:class:`CrossKeyLatents`, ``form = "across"``): a layer stores ``[batch, 1, tokens, K]`` latents
``c = E x`` of the keys as it receives them (rotated, after ``k_norm``) and returns ``x' = U c``; E (K, G hd) and
U (G hd, K) with ``E U = I``, per frequency f of rank r_f ``E_f = Vh_f[:r_f] S_f^{-1}``, ``U_f = S_f Vh_f[:r_f]^T``
placed on each of its components. Its ``nbytes`` are K numbers per token, no positions.

**The choice** (:func:`headlens.compress.keys.kept_form`): per layer the form whose predicted error (from the
calibration moments or the weights; never the eval texts) is lower at the same numbers per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from headlens.compress.key_cache import KeyLatents
from headlens.compress.keys import psd_root
from headlens.compress.plan import gram_factor
from headlens.errors import HeadlensError

@dataclass
class FrequencyLatent:
    """TransMLA's (RoRoPE's) key latent at a given size: per frequency a map across the kv heads, applied alike to
    each component the rotation turns together, so it commutes with the rotation (exact on rotated keys).
    ``encode`` E (K, G hd) and ``up`` U (G hd, K), ``E U = I``, act on the layer's keys side by side (kv head g's
    dimension d at ``g hd + d``), rotated or not; ``projector`` = ``U E``; ``ranks`` r_f per frequency block
    (:meth:`FrequencyFit.blocks`); K = ``numbers``, the numbers per token it stores."""

    projector: torch.Tensor
    ranks: list[int]
    tail: float
    scale: float
    encode: torch.Tensor | None = None
    up: torch.Tensor | None = None

    @property
    def numbers(self) -> int:
        return int(self.encode.shape[0]) if self.encode is not None else 0

    @property
    def predicted_error(self) -> float:
        return self.tail / self.scale if self.scale > 0 else 0.0


@dataclass
class FrequencyFit:
    """Per frequency block (:meth:`blocks`: the rotary ``pairs`` in order, then the unrotated dimensions ``still``
    as one block where there are any): the whitening factor S_f, the right singular vectors Vh_f and singular values
    of ``A_f S_f`` (:func:`fit_frequencies`)."""

    G: int
    hd: int
    pairs: list
    S: list
    Vh: list
    sv: list
    still: list = dataclasses.field(default_factory=list)  # dimensions the rotary leaves alone (partial rotary)

    def blocks(self) -> list[list[list[int]]]:
        """Per frequency its components: ``[[a], [b]]`` for a rotary pair (one map on both), ``[still]`` for the
        unrotated dimensions (frequency 0: one map across heads and those dimensions)."""
        return [[[a], [b]] for a, b in self.pairs] + ([[list(self.still)]] if self.still else [])

    def index(self, dims: Sequence[int]) -> torch.Tensor:
        """Positions of ``dims`` of every kv head in the keys side by side, head-major: ``g hd + d``."""
        return (torch.arange(self.G)[:, None] * self.hd + torch.as_tensor(list(dims))[None, :]).reshape(-1)

    def at(self, numbers: int) -> FrequencyLatent:
        """The latent holding at most ``numbers`` numbers per token: directions taken by kept energy per number
        (a pair's direction costs 2 numbers, one per component; an unrotated one 1), each that still fits, so a
        frequency's directions are kept in order of their singular values."""
        blocks = self.blocks()
        cost = [len(b) for b in blocks]
        order = sorted(((float(v) ** 2 / cost[f], f, i) for f, sv in enumerate(self.sv) for i, v in enumerate(sv)),
                       key=lambda t: (-t[0], t[1], t[2]))
        ranks, left, kept = [0] * len(blocks), max(0, int(numbers)), 0.0
        for ratio, f, i in order:
            if cost[f] <= left and ranks[f] == i:
                ranks[f] += 1
                left -= cost[f]
                kept += ratio * cost[f]
        total = sum(float(v) ** 2 for sv in self.sv for v in sv)
        n = self.G * self.hd
        E_rows, U_cols = [], []
        for f, comps in enumerate(blocks):
            r = ranks[f]
            if not r:
                continue
            S, V = self.S[f], self.Vh[f][:r].T  # (m, m), (m, r)
            Ef = torch.linalg.solve_triangular(S.T, V, upper=True).T  # V^T S^{-1}
            Uf = S @ V
            for dims in comps:
                idx = self.index(dims)
                E = torch.zeros(r, n, dtype=torch.float64)
                U = torch.zeros(n, r, dtype=torch.float64)
                E[:, idx], U[idx, :] = Ef, Uf
                E_rows.append(E)
                U_cols.append(U)
        encode = torch.cat(E_rows) if E_rows else torch.zeros(0, n, dtype=torch.float64)
        up = torch.cat(U_cols, dim=1) if U_cols else torch.zeros(n, 0, dtype=torch.float64)
        return FrequencyLatent(projector=up @ encode, ranks=ranks, tail=math.sqrt(max(total - kept, 0.0)),
                               scale=math.sqrt(total), encode=encode.contiguous(), up=up.contiguous())


def fit_frequencies(Cq: torch.Tensor, Ck_cross: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> FrequencyFit:
    """The per-frequency cross-head fit. For frequency pair (a, b), ``x_a = [k_{g,a}]_g`` and ``x_b`` (G numbers
    each) turn together under the rotation, so a real map ``W_f`` across heads applied to both commutes with it.
    Averaged over relative rotations the queries weigh group g's error at that frequency by ``c_{g,f} =
    C~_q^g[a, a]`` (= ``[b, b]``) and see no cross terms with any other dimension, so that part of the logit error is
    ``||A_f (I - P_f) X_f||^2`` with ``A_f = diag(sqrt(c_{., f}))`` and ``X_f X_f^T = K_f = C[a, a] + C[b, b]``
    (G x G blocks of the keys' joint second moment): the per-group fit with heads in place of dimensions.

    The dimensions a partial rotary leaves alone (set U, frequency 0) are turned by no position, so any map on them
    commutes with the rotation; the rotation average leaves their block of the query moment as it is,
    ``C~_q^g[U, U] = C_q^g[U, U]``, off-diagonal entries included (and zero against the rotated dimensions), so the
    errors of two unrotated dimensions are weighed together: they form one block, ``A_0 = blockdiag_g
    root(C_q^g[U, U])`` and ``K_0`` the keys' joint moment on (g, d in U), one number per direction. (One G x G map
    per unrotated dimension would leave out the cross terms ``C_q^g[d, d']``, and the prediction would not be the
    error.) The logit error is the sum over blocks, and the spectra add up to the same total as the per-group
    latents' (the same rotation-averaged logit energy), so the two predictions compare at equal numbers."""
    G, hd = Cq.shape[0], Cq.shape[-1]
    turned = {d for p in pairs for d in p}
    fit = FrequencyFit(G=G, hd=hd, pairs=list(pairs), S=[], Vh=[], sv=[],
                       still=[d for d in range(hd) if d not in turned])
    for comps in fit.blocks():
        first = torch.as_tensor(comps[0])
        K = sum(Ck_cross[fit.index(c)[:, None], fit.index(c)[None, :]] for c in comps)
        A = torch.block_diag(*[psd_root(Cq[g][first[:, None], first[None, :]]) for g in range(G)])
        S, _ = gram_factor(K)
        _, sv, Vh = torch.linalg.svd(A @ S)
        fit.S.append(S)
        fit.Vh.append(Vh)
        fit.sv.append(sv)
    return fit


# ------------------------------------------------------------------------------------------------ the cache


@dataclass
class CrossKeyLatents(KeyLatents):
    """One layer's cross-head key latent for a LatentCache: ``encode`` = [E (K, G hd)], ``up`` = [U (G hd, K)],
    no bias, ``kv_heads`` G; ``rotary`` says whether the model rotates the layer's keys (checked against the model),
    but the cache stores them as they come: E and U commute with the rotation."""

    kv_heads: int = 1

    form = "across"

    @property
    def num_groups(self) -> int:
        return int(self.kv_heads)

    @property
    def head_dim(self) -> int:
        return int(self.up[0].shape[0]) // max(int(self.kv_heads), 1)


def cross_latents(plan) -> CrossKeyLatents:
    """The :class:`CrossKeyLatents` of a :class:`~headlens.compress.keys.KeyLayerPlan` with a frequency latent."""
    freq = plan.frequency_latent()
    if freq is None:
        raise HeadlensError(f"layer {plan.layer}: no cross-head key latent (it needs rotary keys and G > 1)")
    return CrossKeyLatents(plan.layer, [freq.encode], [freq.up], None, plan.rotary, kv_heads=len(plan.groups))


def check_cross(lat: CrossKeyLatents, layer: int) -> None:
    """Refuse cross-head factors that cannot be stored (one line naming the layer)."""
    if len(lat.encode) != 1 or len(lat.up) != 1 or lat.bias is not None:
        raise HeadlensError(f"layer {layer}: cross-head key latents are one encoder and one up-projection over "
                            "every kv head, without a bias")
    G, E, U = int(lat.kv_heads), lat.encode[0], lat.up[0]
    K, n = int(E.shape[0]), int(U.shape[0]) if U.dim() == 2 else -1
    if G < 1 or E.dim() != 2 or U.dim() != 2 or n % G or tuple(E.shape) != (K, n) or tuple(U.shape) != (n, K):
        raise HeadlensError(f"layer {layer}: cross-head key encoder {tuple(E.shape)} and up-projection "
                            f"{tuple(U.shape)} are not (K, G hd) and (G hd, K) for `kv_heads` {G}")
    if K == 0:
        raise HeadlensError(f"layer {layer}: a cross-head key latent of 0 numbers stores no key: leave the layer's "
                            "keys out instead")
    err = float(torch.linalg.norm(E.double() @ U.double() - torch.eye(K, dtype=torch.float64)))
    if err > 1e-3 * math.sqrt(K):
        raise HeadlensError(f"layer {layer}: the cross-head key encoder does not invert its up-projection "
                            f"(|E U - I| = {err:.2e})")


class CrossCodec:
    """Encode ``[batch, G, tokens, hd]`` keys (every kv head side by side) to ``[batch, 1, tokens, K]`` latents
    ``c = E x`` and decode them back, ``x' = U c``; in float32 (float64 where a float64 tensor is involved)."""

    def __init__(self, latents: CrossKeyLatents):
        self.latents = latents
        self._ready: dict = {}
        self.repeat = 1

    def _factors(self, device, dtype):
        if (device, dtype) not in self._ready:
            self._ready[(device, dtype)] = (self.latents.encode[0].to(device, dtype),
                                            self.latents.up[0].to(device, dtype))
        return self._ready[(device, dtype)]

    def encode(self, key_states: torch.Tensor) -> torch.Tensor:
        self.repeat = self.latents.repeats(key_states)
        k = key_states[:, ::self.repeat] if self.repeat > 1 else key_states
        work = torch.float64 if k.dtype == torch.float64 else torch.float32
        E, _ = self._factors(k.device, work)
        B, G, T, hd = k.shape
        x = k.to(work).transpose(1, 2).reshape(B, T, G * hd)
        return (x @ E.T).unsqueeze(1).to(key_states.dtype)

    def decode(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        work = torch.float64 if torch.float64 in (latents.dtype, dtype) else torch.float32
        _, U = self._factors(latents.device, work)
        B, _, T, _ = latents.shape
        G = self.latents.num_groups
        x = (latents[:, 0].to(work) @ U.T).reshape(B, T, G, -1).transpose(1, 2)
        if self.repeat > 1:
            x = x.repeat_interleave(self.repeat, dim=1)
        return x.to(dtype)


def across_keys(key: torch.Tensor, freq: FrequencyLatent) -> torch.Tensor:
    """Keys [B, G, T, hd] as a cross-head cache layer rebuilds them: ``U E`` applied to the keys as attention
    receives them (rotated), float64; what the compress passes measure for a layer that keeps this form."""
    k = key.detach().to(torch.float64)
    B, heads, T, hd = k.shape
    G = freq.projector.shape[0] // hd
    r = heads // G if G and heads % G == 0 else 0
    if r < 1 or freq.projector.shape[0] != G * hd:
        raise HeadlensError(f"keys of {heads} heads of {hd} do not fit a cross-head key latent over "
                            f"{freq.projector.shape[0]} numbers")
    k = k[:, ::r] if r > 1 else k  # every query head's copy of a kv head (Falcon): one each
    P = freq.projector.to(k.device)
    out = (k.transpose(1, 2).reshape(B, T, G * hd) @ P.T).reshape(B, T, G, hd).transpose(1, 2)
    return out.repeat_interleave(r, dim=1) if r > 1 else out


# ------------------------------------------------------------------------------------------- saved factors


def across_name(layer: int, which: str) -> str:
    """The factors file's name of a cross-head key factor: ``layer{L}.across.key_{which}`` (encode, up)."""
    return f"layer{layer}.across.key_{which}"


def cross_tensors(lat: CrossKeyLatents) -> dict[str, torch.Tensor]:
    return {across_name(lat.layer, "encode"): lat.encode[0].to(torch.float32).contiguous(),
            across_name(lat.layer, "up"): lat.up[0].to(torch.float32).contiguous()}


def read_cross(entry: dict, layer: int, rotary: bool, tensors: dict, where) -> CrossKeyLatents:
    """A plan entry with ``key_form`` ``across``: its factors from ``tensors`` (checked against ``key_k`` and
    ``key_kv_heads``)."""
    try:
        ks, G = [int(k) for k in entry["key_k"]], int(entry["key_kv_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HeadlensError(f"{where}: layer {layer}'s cross-head key entry needs key_k [K] and key_kv_heads "
                            f"({exc})") from None
    try:
        E, U = tensors[across_name(layer, "encode")], tensors[across_name(layer, "up")]
    except KeyError as exc:
        raise HeadlensError(f"{where} lacks {exc.args[0]}: the key factors do not match the plan") from None
    if len(ks) != 1 or E.dim() != 2 or U.dim() != 2 or E.shape[0] != ks[0] or U.shape[1] != ks[0]:
        raise HeadlensError(f"{where}: layer {layer} has cross-head key_encode {tuple(E.shape)} and key_up "
                            f"{tuple(U.shape)}, but the plan gives key k = {ks}")
    return CrossKeyLatents(layer, [E], [U], None, rotary, kv_heads=G)
