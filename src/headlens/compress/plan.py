"""The latent of each kv group of one layer: down- and up-projection, and the error its spectrum predicts.

For one layer with ``W_O`` (H, d, hd) and ``W_V`` (G, hd, d) (Linear layout, float64, as
:func:`headlens.circuits.heads.read_layer` returns them) the kv group g serves the query heads
``h = g * (H/G) .. (g + 1) * (H/G) - 1``; one shared latent must serve all of them, so the operator to compress is
the stack ``M_g = [W_O^h W_V^g]_h`` ((H/G) d x d). It is factored as ``M_g = A_g W_V^g`` with ``A_g`` the stacked
``W_O^h`` ((H/G) d x hd) and decomposed by :func:`headlens.circuits.spectrum.factored_svd`, never densely.

- plain: ``V_k`` = top-k right singular vectors of ``M_g``; ``Q_g = V_k V_k^T``, ``P_g = V_k^T`` (k x d),
  ``B_g = V_k``.
- data-aware, on calibration tokens X (d x N, the inputs of the layer's value projection, i.e. after the
  pre-attention norm): ``S S^T = X X^T`` (float64 Cholesky; a ridge ``lambda I`` is added when ``X X^T`` is not
  numerically positive definite, e.g. fewer tokens than ``d``), ``V_k`` = top-k right singular vectors of
  ``M_g S``; ``Q_g = S V_k V_k^T S^{-1}``, ``P_g = V_k^T S^{-1}``, ``B_g = S V_k``.

In both cases the up-projection is ``U_g = W_V^g B_g`` (hd x k) and the values become
``v' = W_V^g Q_g x = U_g (P_g x)``: the cache stores ``c = P_g x``, k numbers per token. With ``k = hd``,
``W_V^g Q_g = W_V^g`` up to round-off (``Q_g`` projects onto a complement of the null space of ``W_V^g``).

Errors (names as in the sweep and the budget, :mod:`headlens.circuits.sweep_layer`, :mod:`headlens.circuits.budget`):

- ``predicted_error``: plain, the spectrum's ``sqrt(1 - E_k)`` of ``M_g`` (the sweep's ``stack_rel_error_k<k>``,
  the budget's ``err_plain``); data-aware, ``sqrt(sum_{i>k} sigma_i(M_g S)^2) / ||M_g X||_F`` (the sweep's
  ``stack_white_pred_k<k>``, the budget's ``err_data``), exact on the calibration tokens when no ridge was needed.
- Since ``P_g = Sigma_k^{-1} U_k^T M_g`` (``U_k, Sigma_k`` of ``M_g S``), the data-aware latent rebuilds
  ``M_g Q_g = U_k U_k^T M_g``: the sweep's data-aware latent, so its held-out errors are the sweep's too.
- ``calib_error``: ``||M_g (I - Q_g) X||_F / ||M_g X||_F`` measured on the calibration tokens (for plain, the
  per-head sweep's ``plain_pred``); :meth:`LayerPlan.cache_errors` measures it on any other tokens
  (``plain_heldout`` / ``white_heldout``).

Norms of ``M_g Y`` come from the group's triangular factor: ``A_g = Q R`` with orthonormal Q, so
``||M_g Y||_F = ||R W_V^g Y||_F`` (hd x N) and no (H/G) d-row matrix is ever multiplied with tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from headlens.circuits.spectrum import factored_svd, plain_cache_error
from headlens.errors import HeadlensError

LATENT_KINDS = ("plain", "data-aware")
# Default ridge, relative to the mean eigenvalue tr(X X^T) / d, when X X^T is not positive definite (fewer tokens than
# d, or LayerNorm without bias, whose outputs all lie in a hyperplane). It may be tiny: P_g = V_k^T S^{-1} equals
# Sigma_k^{-1} U_k^T M_g for any invertible S (U_k, Sigma_k from M_g S), so no direction is amplified by S^{-1}; the
# ridge only has to make the Cholesky factor exist, and it moves the prediction by about ridge * d relative.
RIDGE = 1e-10


@dataclass
class GroupLatent:
    """The latent of kv group ``kv_head`` of ``layer``: ``W_V^g`` becomes ``up @ down`` = ``W_V^g Q_g``. float64."""

    layer: int
    kv_head: int  # g
    kind: str  # "plain" or "data-aware"
    k: int  # latent size k_g: numbers cached per token for this group
    down: torch.Tensor  # P_g (k, d): c = P_g x is what the cache stores
    up: torch.Tensor  # U_g = W_V^g B_g (hd, k): values v' = U_g c (+ the value bias, unchanged)
    basis: torch.Tensor  # B_g (d, k): Q_g = B_g P_g (plain: V_k; data-aware: S V_k)
    R: torch.Tensor  # (hd, hd) with A_g = Q R, A_g the stacked W_O^h of the group: ||M_g Y|| = ||R W_V^g Y||
    spectrum: torch.Tensor  # (hd,) singular values the latent was cut from: sigma(M_g) or sigma(M_g S)
    tail: float  # sqrt(sum_{i>k} spectrum_i^2)
    scale: float  # the denominator of predicted_error: ||M_g||_F (plain) or ||M_g X||_F (data-aware)
    calib_error: float | None  # ||M_g (I - Q_g) X|| / ||M_g X|| on the calibration tokens (None without them)
    ridge: float  # lambda added to X X^T before its Cholesky factor (0.0: none was needed; always 0 for plain)

    @property
    def predicted_error(self) -> float:
        """The error the spectrum predicts (``tail / scale``; 0.0 for a zero operator)."""
        return self.tail / self.scale if self.scale > 0 else 0.0

    @property
    def Q(self) -> torch.Tensor:
        """``Q_g = B_g P_g`` (d, d), rank k: formed on demand (the construction itself never needs it)."""
        return self.basis @ self.down

    @property
    def head_dim(self) -> int:
        return int(self.up.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.down.shape[1])


@dataclass
class LayerPlan:
    """One layer's latents, one :class:`GroupLatent` per kv group (in kv-head order)."""

    layer: int
    kind: str
    num_heads: int  # H
    groups: list[GroupLatent]

    @property
    def ks(self) -> list[int]:
        """k_g per kv group."""
        return [g.k for g in self.groups]

    @property
    def predicted_error(self) -> float:
        """The layer's predicted value-path error over all kv groups: ``sqrt(sum_g tail_g^2 / sum_g scale_g^2)``."""
        den = sum(g.scale ** 2 for g in self.groups)
        return math.sqrt(sum(g.tail ** 2 for g in self.groups) / den) if den > 0 else 0.0

    def value_weights(self, W_V: torch.Tensor) -> torch.Tensor:
        """``W_V^g Q_g`` for every group, (G, hd, d) float64, from the original ``W_V`` (G, hd, d):
        computed as ``(W_V^g B_g) P_g`` without the d x d ``Q_g``."""
        _check_groups(self, W_V)
        return torch.stack([(W_V[g.kv_head].to(torch.float64) @ g.basis) @ g.down for g in self.groups])

    def cache_errors(self, W_V: torch.Tensor, X: torch.Tensor) -> tuple[list[float], float]:
        """The value-path error on tokens X (d, N), per group ``||M_g (I - Q_g) X|| / ||M_g X||`` and for the
        whole layer (squares summed over groups and tokens, then relative). ``W_V`` (G, hd, d) is the original."""
        _check_groups(self, W_V)
        X = _tokens(X, W_V.shape[-1])
        num = den = 0.0
        per = []
        for g in self.groups:
            lost, total = _lost_and_total(g, W_V[g.kv_head].to(torch.float64), X)
            per.append(lost / total if total > 0 else 0.0)
            num, den = num + lost ** 2, den + total ** 2
        return per, (math.sqrt(num / den) if den > 0 else 0.0)


def _check_groups(plan: LayerPlan, W_V: torch.Tensor) -> None:
    G = len(plan.groups)
    if W_V.dim() != 3 or W_V.shape[0] != G or (G and tuple(W_V.shape[1:]) != (plan.groups[0].head_dim,
                                                                             plan.groups[0].hidden_size)):
        raise HeadlensError(f"`W_V` has shape {tuple(W_V.shape)}, but layer {plan.layer}'s plan has {G} kv groups "
                            f"of shape {(plan.groups[0].head_dim, plan.groups[0].hidden_size) if G else None}")


def _tokens(X: torch.Tensor, d: int) -> torch.Tensor:
    """X as float64 (d, N), refused (naming ``calibration``) when its shape or values are unusable."""
    if X.dim() != 2 or X.shape[0] != d:
        raise HeadlensError(f"`calibration` tokens have shape {tuple(X.shape)}, expected (d={d}, N)")
    if X.shape[1] == 0:
        raise HeadlensError("`calibration` holds no tokens")
    X = X.to(torch.float64)
    if not bool(torch.isfinite(X).all()):
        raise HeadlensError("`calibration` tokens contain NaN or inf")
    return X


def _lost_and_total(g: GroupLatent, W_V: torch.Tensor, X: torch.Tensor) -> tuple[float, float]:
    """(``||M_g (I - Q_g) X||_F``, ``||M_g X||_F``) in the group's R coordinates."""
    Y = W_V @ X  # (hd, N) the group's values
    Y_hat = g.up @ (g.down @ X)  # (hd, N) rebuilt from the cached latent
    return float(torch.linalg.norm(g.R @ (Y - Y_hat))), float(torch.linalg.norm(g.R @ Y))


def _ks(ks: int | Sequence[int], G: int, hd: int, layer: int) -> list[int]:
    out = [int(ks)] * G if isinstance(ks, int) else [int(k) for k in ks]
    if len(out) != G:
        raise HeadlensError(f"`k` gives {len(out)} latent sizes for layer {layer}, which has {G} kv groups")
    bad = [k for k in out if not 0 <= k <= hd]
    if bad:
        raise HeadlensError(f"`k` {bad[0]} out of range for layer {layer}: a kv group's latent holds 0..{hd} "
                            f"(head_dim) numbers")
    return out


def whitening_factor(X: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, float]:
    """(S, lambda): the lower-triangular ``S`` (d, d) with ``S S^T = X X^T + lambda I``, float64.

    ``lambda`` is 0.0 when ``X X^T`` is numerically positive definite (smallest eigenvalue above
    ``d * eps * largest``), else ``ridge * tr(X X^T) / d`` (multiplied by 10 until the Cholesky succeeds):
    :func:`gram_factor` of ``X X^T``."""
    X = X.to(torch.float64)
    return gram_factor(X @ X.T, ridge)


def gram_factor(C: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, float]:
    """(S, lambda): lower-triangular ``S`` with ``S S^T = C + lambda I`` (float64) for a Gram matrix ``C``, lambda
    as :func:`whitening_factor` says."""
    C = C.to(torch.float64)
    C = 0.5 * (C + C.T)
    d = C.shape[0]
    vals = torch.linalg.eigvalsh(C)
    base = ridge * max(float(torch.trace(C)) / d, torch.finfo(torch.float64).tiny)
    lam = 0.0 if float(vals[0]) > d * torch.finfo(torch.float64).eps * float(vals[-1]) else base
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(20):
        L, info = torch.linalg.cholesky_ex(C + lam * eye)
        if int(info) == 0:
            return L, lam
        lam = lam * 10 if lam > 0 else base
    raise HeadlensError("`calibration` tokens: X X^T has no Cholesky factor even with a ridge (NaN/inf inputs?)")


def plan_layer(layer: int, W_O: torch.Tensor, W_V: torch.Tensor, ks: int | Sequence[int], kind: str = "plain",
               X: torch.Tensor | None = None, ridge: float = RIDGE) -> LayerPlan:
    """The latents of one layer's kv groups: a :class:`LayerPlan` with one :class:`GroupLatent` per group.

    ``W_O`` (H, d, hd) and ``W_V`` (G, hd, d) in Linear layout (converted to float64), without the norm gain folded
    in; ``ks``: one latent size for every group or one per group (0..hd); ``kind``: ``plain`` or ``data-aware``;
    ``X`` (d, N): calibration tokens, the inputs of the layer's value projection (needed for data-aware; for
    plain it only fills in ``calib_error``); ``ridge``: see :func:`whitening_factor`.
    """
    if kind not in LATENT_KINDS:
        raise HeadlensError(f"`latent` {kind!r} is not one of {', '.join(LATENT_KINDS)}")
    if W_O.dim() != 3 or W_V.dim() != 3 or W_O.shape[2] != W_V.shape[1] or W_O.shape[1] != W_V.shape[2] \
            or W_O.shape[0] % max(W_V.shape[0], 1) or W_V.shape[0] == 0:
        raise HeadlensError(f"layer {layer}: W_O {tuple(W_O.shape)} and W_V {tuple(W_V.shape)} are not "
                            "(H, d, hd) and (G, hd, d) with G dividing H")
    H, d, hd = W_O.shape
    G = W_V.shape[0]
    n = H // G
    k_of = _ks(ks, G, hd, layer)
    W_O = W_O.to(torch.float64)
    W_V = W_V.to(torch.float64)
    if kind == "data-aware" and X is None:
        raise HeadlensError("a data-aware latent needs `calibration` tokens")
    X = _tokens(X, d) if X is not None else None
    A = W_O.reshape(G, n, d, hd).reshape(G, n * d, hd)  # the stacked W_O^h of each group: M_g = A_g W_V^g
    lam = 0.0
    if kind == "plain":
        svd = factored_svd(A, W_V)  # right singular vectors of M_g: Vh (G, hd, d)
        scales = torch.linalg.norm(svd.S, dim=-1)  # ||M_g||_F
    else:
        S, lam = whitening_factor(X, ridge)  # type: ignore[arg-type]
        svd = factored_svd(A, W_V @ S)  # M_g S = A_g (W_V^g S)
        scales = torch.linalg.norm(svd.R_a @ (W_V @ X), dim=(-2, -1))  # ||M_g X||_F = ||R_g W_V^g X||_F
    groups = []
    for g, k in enumerate(k_of):
        V_k = svd.Vh[g, :k].T  # (d, k)
        if kind == "plain":
            basis, down = V_k, V_k.T.contiguous()
        else:
            basis = S @ V_k  # B_g = S V_k
            down = torch.linalg.solve_triangular(S.T, V_k, upper=True).T.contiguous()  # P_g = V_k^T S^{-1}
        sv = svd.S[g]
        tail = float(torch.linalg.norm(sv[k:]))
        lat = GroupLatent(layer=layer, kv_head=g, kind=kind, k=k, down=down, up=W_V[g] @ basis,
                          basis=basis.contiguous(), R=svd.R_a[g], spectrum=sv, tail=tail, scale=float(scales[g]),
                          calib_error=None, ridge=lam)
        if X is not None:
            if kind == "plain":  # the circuits' plain cache error of the stacked operator, reused
                lat.calib_error = plain_cache_error(_group_svd(svd, g), X, k)
            else:
                lost, total = _lost_and_total(lat, W_V[g], X)
                lat.calib_error = lost / total if total > 0 else 0.0
        groups.append(lat)
    return LayerPlan(layer=layer, kind=kind, num_heads=H, groups=groups)


def _group_svd(svd, g: int):
    """Group g's slice of a batched :class:`~headlens.circuits.spectrum.FactoredSVD`."""
    return type(svd)(U=svd.U[g], S=svd.S[g], Vh=svd.Vh[g], R_a=svd.R_a[g], Q_a=svd.Q_a[g])


def plan_from_factors(factors, ks: int | Sequence[int], kind: str = "plain", X: torch.Tensor | None = None,
                      ridge: float = RIDGE) -> LayerPlan:
    """:func:`plan_layer` on a :class:`~headlens.circuits.heads.LayerFactors` (``read_layer(ck, layer,
    with_qk=False)``). Refuses factors with the norm gain folded in: the latent acts on what the value projection
    reads, the norm's output."""
    if factors.norm_folded:
        raise HeadlensError("`fold_norm`: a latent put into the model acts on the value projection's input; read "
                            "the layer without folding the norm gain")
    return plan_layer(factors.layer, factors.W_O, factors.W_V, ks, kind, X, ridge)


def plan_layers(ck, ks: dict[int, int | Sequence[int]], kind: str = "plain",
                calibration: dict[int, torch.Tensor] | None = None, load_dtype: torch.dtype = torch.float32,
                ridge: float = RIDGE) -> list[LayerPlan]:
    """One :class:`LayerPlan` per layer of ``ks`` (layer -> latent size(s)), in layer order, reading each layer's
    W_O and W_V from the :class:`~headlens.io.checkpoint.Checkpoint` ``ck`` (cast to ``load_dtype``, the precision
    the model runs in, then float64). ``calibration``: layer -> tokens X (d, N), required for ``data-aware``."""
    from headlens.circuits.heads import read_layer

    plans = []
    for layer in sorted(ks):
        X = None
        if calibration is not None:
            X = calibration.get(layer)
        if kind == "data-aware" and X is None:
            raise HeadlensError(f"a data-aware latent needs `calibration` tokens for layer {layer}")
        f = read_layer(ck, layer, with_qk=False, load_dtype=load_dtype)
        plans.append(plan_from_factors(f, ks[layer], kind, X, ridge))
    return plans
