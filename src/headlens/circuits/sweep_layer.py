"""One layer of the sweep: every head's OV/QK spectrum, the kv-group operators and the data-aware latents.

All spectra come from ``hd x hd`` Gram matrices of the thin factors, batched over the heads of a layer
(:func:`headlens.circuits.spectrum.gram_spectrum`): for ``W = A B`` with ``A`` (d x hd) and ``B`` (hd x d),
``GA = A^T A = R^T R`` and ``sigma(W)^2 = eig(R (B B^T) R^T)``, in float64. Errors of latents are measured in
the ``R`` coordinates: ``||A z|| = ||R z||`` for any z, so ``W X = Q (R B X)`` with orthonormal Q and every
error is a ratio of traces of ``hd x hd`` matrices.

- Per query head h (kv head g = h // (H/G)): OV spectrum of ``W_O^h W_V^g``; QK spectrum of
  ``W_Q^h^T W_K^g`` (approximate as a description of attention scores: RoPE and q/k norms act between).
- Per kv group g: the stacked OV operator ``[W_O^h W_V^g]_{h in g}`` (what one shared latent serves): its
  ``GA`` is the sum of the heads' ``GA``; and the spectrum of ``W_V^g`` itself.
- Data-aware (token inputs X of the layer's attention, split into fit / held-out tokens): the whitened
  spectrum ``sigma(W X_fit)`` (= ``sigma(W S)`` with ``S S^T = X_fit X_fit^T``), the error it predicts, and the
  errors measured on held-out tokens for the data-aware latent and for the plain one (``P = V_k^T``).
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


def _qk_spectra(W_Q: torch.Tensor, W_K: torch.Tensor, group: torch.Tensor, layer: int, d: int,
                eps: float) -> list[Spectrum]:
    """sigma_max, rank at 90% (and the numerical rank for float64 weights) of each head's W_Q^h^T W_K^g.
    W_Q (H, hd, d), W_K (G, hd, d)."""
    assert W_Q.shape[0] == group.shape[0] and W_K.shape[1:] == W_Q.shape[1:], (tuple(W_Q.shape), tuple(W_K.shape))
    # The QK circuit is approximate anyway (RoPE and q/k norms act between W_Q and W_K): its Gram products
    # may run in the precision W_Q/W_K were given in (float32 in a sweep); the eigenproblems run in float64.
    GQ = _eig(W_Q @ W_Q.mT)  # (H, hd, hd)
    GK = _eig(W_K @ W_K.mT)  # (G, hd, hd)
    _finite(layer, GQ, GK)
    Sq, _ = gram_spectrum(GQ, GK[group])
    fields = ("rank", "sigma_max") if W_Q.dtype == torch.float64 else ("sigma_max",)  # a rank needs float64
    return spectra(Sq, d, eps, None, QK_LEVELS, fields)


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


def analyze_layer(
    layer: int,
    W_O: torch.Tensor,  # (H, d, hd)
    W_V: torch.Tensor,  # (G, hd, d)
    cfg: AnalysisConfig,
    W_Q: torch.Tensor | None = None,  # (H, hd, d)
    W_K: torch.Tensor | None = None,  # (G, hd, d)
    X_fit: torch.Tensor | None = None,  # (d, N_fit) attention inputs
    X_test: torch.Tensor | None = None,  # (d, N_test) held-out attention inputs
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
    qk = _qk_spectra(W_Q, W_K, group, layer, d, eps) if W_Q is not None and W_K is not None else [None] * H
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
    groups = [GroupSpectrum(layer, g, H // G, stack[g], v[g], group_lat[g]) for g in range(G)]
    return LayerResult(layer=layer, heads=heads, groups=groups, group_plain=_cpu(Sg), group_white=_cpu(white_g),
                       group_white_heldout=_cpu(white_g_heldout))  # the spectra the budget keeps: on the CPU


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
    qk_dtype = torch.float64 if load_dtype == torch.float64 else torch.float32
    buffers = Buffers()  # layer i's factors are dead (``del f``) before layer i + 1 is converted into them
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, layers[0])
        for i, layer in enumerate(layers):
            raw = nxt.result()
            nxt = pool.submit(load, layers[i + 1]) if i + 1 < len(layers) else None
            f = read_layer(ck, layer, with_qk=cfg.with_qk, fold_norm=cfg.fold_norm, load_dtype=load_dtype,
                           raw=raw, qk_dtype=qk_dtype, check_finite=False,  # analyze_layer checks its Grams
                           buffers=buffers)
            del raw
            yield layer, f
            del f
