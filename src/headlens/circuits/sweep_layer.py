"""One layer of the sweep: every head's OV/QK spectrum, the kv-group operators and the data-aware latents.

All spectra come from ``hd x hd`` Gram matrices of the thin factors, batched over the heads of a layer
(:func:`headlens.circuits.spectrum.gram_spectrum`): for ``W = A B`` with ``A`` (d x hd) and ``B`` (hd x d),
``GA = A^T A = R^T R`` and ``sigma(W)^2 = eig(R (B B^T) R^T)``, in float64. Errors of latents are measured in
the ``R`` coordinates: ``||A z|| = ||R z||`` for any z, so ``W X = Q (R B X)`` with orthonormal Q and every
error is a ratio of traces of ``hd x hd`` matrices.

- Per query head h (kv head g = h // (H/G)): OV spectrum of ``W_O^h W_V^g``; QK spectrum of the QK form
  ``W_QK^h = (W_Q^h)^T W_K^g`` (d x d, rank <= hd; ``A = (W_Q^h)^T``, ``B = W_K^g``), with the same columns as
  OV's where they apply: numerical rank, sigma_max, Frobenius norm, condition number, rank at 90% energy
  (``qk_rank_e90``: smallest k with ``sum_{i<=k} s_i^2 / sum s_i^2 >= 0.9``), ``E_k`` and ``rel_error(k)``.
- Per kv group g: the stacked OV operator ``[W_O^h W_V^g]_{h in g}`` (what one shared latent serves): its
  ``GA`` is the sum of the heads' ``GA``; the spectrum of ``W_V^g`` itself; and the stacked key operator
  ``M^K_g = [(W_Q^h)^T W_K^g]_{h in g}`` ((H/G) d x d) = ``A^K_g W_K^g`` with ``A^K_g`` the stacked ``(W_Q^h)^T``.
  Its ``rel_error(k)`` is the relative logit error a rank-k latent of group g's keys causes at relative position
  0 (no rotary) for queries' inputs spread isotropically: the spectrum a key budget is cut from.
- The QK form is the one at relative position 0: rotary acts between W_Q and W_K and is left out. The q/k
  norms' gains (Qwen3, OLMo 2, Gemma 3, ...) are folded into W_Q / W_K by the reader
  (:func:`headlens.circuits.heads.qk_norm_gains`); their per-token RMS scale is left out.
- Data-aware (token inputs X of the layer's attention, split into fit / held-out tokens): the whitened
  spectrum ``sigma(W X_fit)`` (= ``sigma(W S)`` with ``S S^T = X_fit X_fit^T``), the error it predicts, and the
  errors measured on held-out tokens for the data-aware latent and for the plain one (``P = V_k^T``); for the
  stacked key operator the same, whitened on the key side (``M^K_g S``), per kv group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from headlens.circuits.spectrum import (batched, condition_numbers, cumulative_energy, gram_spectrum, numerical_rank,
                                        rank_at_energy, subspace_errors, tail_ratio)
from headlens.circuits.sweep_results import (OV_LEVELS, QK_LEVELS, V_LEVELS, GroupSpectrum, HeadSpectrum,
                                             LatentErrors, LayerResult, Spectrum)
from headlens.io.checkpoint import Checkpoint

ENERGY_LEVELS = tuple(p / 100 for p in OV_LEVELS)  # (0.5, 0.9, 0.95, 0.99)


@dataclass
class AnalysisConfig:
    """What :func:`analyze_layer` computes (written to ``run.json`` and the summary as ``config``)."""

    ks: list[int] = field(default_factory=lambda: [8, 16, 32, 64])  # latent sizes for E_k and rel_error
    fold_norm: bool = False  # analyse W diag(gamma) with the pre-attention norm's gain folded in
    with_qk: bool = True  # also the QK circuit W_Q^h^T W_K^g of each head
    rank_eps: float = float(torch.finfo(torch.float32).eps)  # precision that sets the numerical rank


class NonFiniteWeights(ValueError):
    """A Gram matrix of the layer's weights holds NaN/inf: some weight is non-finite (or huge)."""


def _finite(layer: int, *grams: torch.Tensor) -> None:
    # Every weight enters a diagonal entry of some Gram as a square: NaN/inf anywhere shows up here.
    if not all(bool(torch.isfinite(G).all()) for G in grams):
        raise NonFiniteWeights(layer)


def spectra(S: torch.Tensor, d: int, eps: float, ks: list[int] | None, levels=OV_LEVELS,
            fields=("rank", "sigma_max", "frobenius", "condition")) -> list[Spectrum]:
    """One :class:`Spectrum` per row of S (n, r), an operator with ``d`` rows; only ``fields`` (and the ranks
    at ``levels`` percent, E_k / rel_error at ``ks``) are filled in."""
    assert S.dim() == 2, tuple(S.shape)
    E = cumulative_energy(S)  # (n, r)
    rank = numerical_rank(S, (d, d), eps)  # (n,)
    cols = {"rank": rank.tolist(), "sigma_max": S[..., 0].tolist(),
            "frobenius": torch.linalg.norm(S, dim=-1).tolist() if "frobenius" in fields else None,
            "condition": condition_numbers(S, rank).tolist() if "condition" in fields else None}
    at = {p: rank_at_energy(E, p / 100, S).tolist() for p in levels}
    energy = {k: E[..., min(k, E.shape[-1]) - 1].tolist() for k in ks or []}
    rel = {k: tail_ratio(S, k).tolist() for k in ks or []}
    return [Spectrum(**{f: cols[f][i] for f in fields}, rank_at={p: v[i] for p, v in at.items()},
                     energy={k: v[i] for k, v in energy.items()}, rel_error={k: v[i] for k, v in rel.items()})
            for i in range(S.shape[0])]


def _eig(G: torch.Tensor) -> torch.Tensor:
    """A Gram matrix where its eigenproblem runs: float64 on the device it was computed on, or on the CPU for a
    device without float64 (MPS, whose products run in float32)."""
    if G.device.type == "mps":
        return G.to("cpu", torch.float64)
    return G.to(torch.float64)


@dataclass
class _Fits:
    """The spectra of one batch of operators (heads or kv groups) in the coordinates of its Gram factor."""

    R: torch.Tensor  # (n, hd, hd) with R^T R = GA
    U: torch.Tensor  # (n, hd, hd) left singular vectors in R coordinates
    index: torch.Tensor  # (n,) kv head of each operator


def _latents(fits: _Fits, Mf: torch.Tensor, Mt: torch.Tensor, ks: list[int], heads: bool):
    """Per operator, the errors of the plain and data-aware latents; the whitened spectrum (n, r) and the
    held-out error of the data-aware latent at every k = 1..r (n, r)."""
    Tf = fits.R @ Mf[fits.index] @ fits.R.mT  # (n, hd, hd): W X_fit X_fit^T W^T in R coordinates
    Tt = fits.R @ Mt[fits.index] @ fits.R.mT
    wv, WU = batched(torch.linalg.eigh, 0.5 * (Tf + Tf.mT))
    white = wv.flip(-1).clamp_min(0).sqrt()  # whitened singular values
    WU = WU.flip(-1)
    plain_fit = subspace_errors(fits.U, Tf, ks).T.tolist() if heads else None  # (len(ks), n)
    plain_test = subspace_errors(fits.U, Tt, ks).T.tolist()
    white_test = subspace_errors(WU, Tt, ks).T.tolist()
    white_pred = [tail_ratio(white, k).tolist() for k in ks]
    errors = [LatentErrors(plain_heldout={k: plain_test[j][i] for j, k in enumerate(ks)},
                           white_pred={k: white_pred[j][i] for j, k in enumerate(ks)},
                           white_heldout={k: white_test[j][i] for j, k in enumerate(ks)},
                           plain_pred=None if plain_fit is None else {k: plain_fit[j][i] for j, k in enumerate(ks)})
              for i in range(fits.R.shape[0])]
    heldout_all = None if heads else subspace_errors(WU, Tt, list(range(1, WU.shape[-1] + 1)))
    return errors, white, heldout_all


@dataclass
class _Keys:
    """The QK side of one layer: per query head and per kv group (stacked key operator)."""

    heads: list[Spectrum]  # (W_Q^h)^T W_K^g per query head
    stack: list[Spectrum]  # M^K_g = [(W_Q^h)^T W_K^g]_{h in g} per kv group
    latents: list  # per kv group: LatentErrors of its key latents (data-aware mode), else None
    plain: torch.Tensor  # (G, r) singular values of M^K_g
    white: torch.Tensor | None  # (G, r) singular values of M^K_g S, S S^T = X_fit X_fit^T (data-aware mode)
    white_heldout: torch.Tensor | None  # (G, r) held-out error of the data-aware key latent, k = 1..r


def _keys(layer: int, W_Q: torch.Tensor, W_K: torch.Tensor, group: torch.Tensor, cfg: AnalysisConfig,
          X_fit: torch.Tensor | None, X_test: torch.Tensor | None, bound: int | None = None) -> _Keys:
    """The QK spectra of a layer, as the OV ones with ``A = (W_Q^h)^T`` (d x hd) and ``B = W_K^g`` (hd x d): per head
    ``GA = W_Q^h W_Q^h^T``, per kv group the sum over its heads (the stacked key operator). W_Q (H, hd, d),
    W_K (G, hd, d), q/k norm gains already folded in; with token inputs, the key side is whitened. ``bound``: a rank
    every QK form has at most by construction (centring q/k norms), past which singular values are set to 0 (the
    Gram route leaves ~sqrt(eps) sigma_1 there)."""
    H, hd, d = W_Q.shape
    G = W_K.shape[0]
    assert W_K.shape == (G, hd, d) and group.shape == (H,), (tuple(W_Q.shape), tuple(W_K.shape))
    GQ = _eig(W_Q @ W_Q.mT)  # (H, hd, hd)
    GK = _eig(W_K @ W_K.mT)  # (G, hd, hd)
    _finite(layer, GQ, GK)
    Sq, _ = gram_spectrum(GQ, GK[group])
    heads = spectra(_cap(Sq, bound), d, cfg.rank_eps, cfg.ks, QK_LEVELS)
    GQ_g = GQ.view(G, H // G, hd, hd).sum(1)  # (G, hd, hd): a group's query heads are consecutive (h // (H/G))
    data = X_fit is not None
    Sg, Rg, *Ug = gram_spectrum(GQ_g, GK, vectors=data)
    Sg = _cap(Sg, bound)
    stack = spectra(Sg, d * (H // G), cfg.rank_eps, cfg.ks, fields=("rank",))  # stacked: (H/G * d) x d
    latents: list = [None] * G
    white = heldout = None
    if data:
        assert X_test is not None
        Yf, Yt = W_K @ X_fit, W_K @ X_test  # (G, hd, N): the keys of the fit and held-out tokens
        Mf, Mt = _eig(Yf @ Yf.mT), _eig(Yt @ Yt.mT)  # (G, hd, hd) their second moments
        latents, white, heldout = _latents(_Fits(Rg, Ug[0], torch.arange(G, device=GQ.device)), Mf, Mt, cfg.ks,
                                           heads=False)
        white = _cap(white, bound)
    return _Keys(heads, stack, latents, _cpu(Sg), _cpu(white), _cpu(heldout))  # type: ignore[arg-type]


def _cap(S: torch.Tensor, bound: int | None) -> torch.Tensor:
    """Singular values S (n, r) with those past ``bound`` set to 0 (None: S)."""
    if bound is None or bound >= S.shape[-1]:
        return S
    S = S.clone()
    S[..., bound:] = 0
    return S


def analyze_layer(
    layer: int,
    W_O: torch.Tensor,  # (H, d, hd)
    W_V: torch.Tensor,  # (G, hd, d)
    cfg: AnalysisConfig,
    W_Q: torch.Tensor | None = None,  # (H, hd, d)
    W_K: torch.Tensor | None = None,  # (G, hd, d)
    X_fit: torch.Tensor | None = None,  # (d, N_fit) attention inputs
    X_test: torch.Tensor | None = None,  # (d, N_test) held-out attention inputs
    qk_rank_bound: int | None = None,  # the QK forms' rank bound (hd - 1 under centring q/k norms), else None
) -> LayerResult:
    """Every number the sweep reports for one layer, batched over its heads: a :class:`LayerResult` with H
    :class:`HeadSpectrum` and G :class:`GroupSpectrum`."""
    H, d, hd = W_O.shape
    G = W_V.shape[0]
    assert W_V.shape == (G, hd, d) and H % G == 0, (tuple(W_O.shape), tuple(W_V.shape))
    GA = _eig(W_O.mT @ W_O)  # (H, hd, hd) on the weights' device (CUDA/MPS with `device`), float64 eigensolves
    GB = _eig(W_V @ W_V.mT)  # (G, hd, hd)
    group = torch.arange(H, device=GA.device) // (H // G)  # kv head of each query head
    _finite(layer, GA, GB)
    data = X_fit is not None
    S, R, *U = gram_spectrum(GA, GB[group], vectors=data)
    eps = cfg.rank_eps
    ov = spectra(S, d, eps, cfg.ks)
    keys = (_keys(layer, W_Q, W_K, group, cfg, X_fit, X_test, qk_rank_bound) if W_Q is not None and W_K is not None
            else None)
    qk = keys.heads if keys is not None else [None] * H
    GA_g = torch.zeros(G, hd, hd, dtype=GA.dtype, device=GA.device).index_add_(0, group, GA)  # stacked operator per kv group
    Sg, Rg, *Ug = gram_spectrum(GA_g, GB, vectors=data)
    Sv = batched(torch.linalg.eigvalsh, GB).flip(-1).clamp_min(0).sqrt()  # (G, hd) singular values of W_V^g
    stack = spectra(Sg, d * (H // G), eps, cfg.ks, fields=("rank",))  # stacked: (H/G * d) x d
    v = spectra(Sv, d, eps, None, V_LEVELS, fields=("rank", "sigma_max"))
    head_lat: list = [None] * H
    group_lat: list = [None] * G
    white_g = white_g_heldout = None
    if data:
        assert X_test is not None and X_fit.shape[0] == d and X_test.shape[0] == d, (X_fit.shape, X_test.shape)
        Yf = W_V @ X_fit  # (G, hd, N_fit)
        Yt = W_V @ X_test  # (G, hd, N_test)
        Mf, Mt = _eig(Yf @ Yf.mT), _eig(Yt @ Yt.mT)  # (G, hd, hd) second moments of the values
        head_lat, _, _ = _latents(_Fits(R, U[0], group), Mf, Mt, cfg.ks, heads=True)
        group_lat, white_g, white_g_heldout = _latents(_Fits(Rg, Ug[0], torch.arange(G, device=GA.device)), Mf, Mt, cfg.ks,
                                                       heads=False)
    group = group.cpu()
    heads = [HeadSpectrum(layer, h, int(group[h]), ov[h], qk[h], head_lat[h]) for h in range(H)]
    groups = [GroupSpectrum(layer, g, H // G, stack[g], v[g], group_lat[g],
                            keys.stack[g] if keys is not None else None, keys.latents[g] if keys is not None else None)
              for g in range(G)]
    return LayerResult(layer=layer, heads=heads, groups=groups, group_plain=_cpu(Sg), group_white=_cpu(white_g),
                       group_white_heldout=_cpu(white_g_heldout),  # the spectra the budget keeps: on the CPU
                       key_plain=keys.plain if keys is not None else None,
                       key_white=keys.white if keys is not None else None,
                       key_white_heldout=keys.white_heldout if keys is not None else None)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def iter_layers(ck: Checkpoint, layers: list[int], cfg: AnalysisConfig, load_dtype: torch.dtype) -> Iterator:
    """Yield ``(layer, LayerFactors)`` one layer at a time, reading the next layer in a background thread.

    At most two layers' weights are alive at once (the one being analysed and the one being read), so the
    peak memory does not grow with the model.
    """
    from concurrent.futures import ThreadPoolExecutor

    from headlens.circuits.heads import Buffers, read_layer, read_layer_raw

    def load(layer: int):  # I/O only: no torch compute competing with the analysis for the cores
        return read_layer_raw(ck, layer, with_qk=cfg.with_qk)

    if not layers:
        return
    buffers = Buffers()  # layer i's factors are dead (``del f``) before layer i + 1 is converted into them
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, layers[0])
        for i, layer in enumerate(layers):
            raw = nxt.result()
            nxt = pool.submit(load, layers[i + 1]) if i + 1 < len(layers) else None
            f = read_layer(ck, layer, with_qk=cfg.with_qk, fold_norm=cfg.fold_norm, load_dtype=load_dtype,
                           raw=raw, check_finite=False,  # analyze_layer checks its Grams
                           buffers=buffers, fold_qk_norm=True)
            del raw
            yield layer, f
            del f
