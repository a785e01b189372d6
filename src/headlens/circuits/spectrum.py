"""Spectra of low-rank products without forming them, and the latent-cache error measures.

Everything here follows ``DOMAIN.md``:

- ``W = A @ B`` with thin ``A`` (d x r) and ``B`` (r x n) is decomposed by QR of both factors and an SVD of
  the r x r core, never by a dense d x n SVD. Leading batch dimensions are supported (one call per layer).
- ``E_k = sum_{i<=k} s_i^2 / sum_i s_i^2``; ``rel_error(k) = ||W - W_k||_F / ||W||_F = sqrt(1 - E_k)``.
- plain latent: ``P = V_k^T``; ``cache_error(k) = ||(W - W_k) X||_F / ||W X||_F`` for token inputs X (d x N).
- data-aware latent: the best rank-k map for X comes from the SVD of ``W S`` with ``S S^T = X X^T``. The
  nonzero singular values of ``W S`` are those of ``W X``, which are those of ``R_a (B X)`` (r x N) when
  ``A = Q_a R_a``, so the whitened spectrum needs no d x d matrix either.
- the Gram route (whole-model sweeps): ``GA = A^T A = R^T R`` and ``GB = B B^T`` give
  ``sigma(A B)^2 = eig(R GB R^T)`` from r x r matrices only, batched over heads. It squares the condition
  number, so it runs in float64 (tests check it against the QR route).

Every function on singular values takes ``S`` sorted descending along the last axis, with any leading batch
dimensions, and returns one value per batch element.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from headlens.errors import HeadlensError


@dataclass
class FactoredSVD:
    """``W = U diag(S) Vh`` for ``W = A @ B``; U (..., d, r), S (..., r), Vh (..., r, n); float64."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    R_a: torch.Tensor  # (..., r, r): A = Q_a R_a, reused by the data-aware latent
    Q_a: torch.Tensor  # (..., d, r)


def factored_svd(A: torch.Tensor, B: torch.Tensor) -> FactoredSVD:
    """Thin SVD of ``A @ B`` from its factors. A: (..., d, r), B: (..., r, n). Computed in float64."""
    A = A.to(torch.float64)
    B = B.to(torch.float64)
    Q_a, R_a = torch.linalg.qr(A)  # (..., d, r), (..., r, r)
    Q_b, R_b = torch.linalg.qr(B.transpose(-1, -2))  # B^T = Q_b R_b: (..., n, r), (..., r, r)
    core = R_a @ R_b.transpose(-1, -2)  # (..., r, r) = Q_a^T W Q_b
    Uc, S, Vch = torch.linalg.svd(core)
    U = Q_a @ Uc  # (..., d, r)
    Vh = Vch @ Q_b.transpose(-1, -2)  # (..., r, n)
    return FactoredSVD(U=U, S=S, Vh=Vh, R_a=R_a, Q_a=Q_a)


def rank_tolerance(S: torch.Tensor, shape: tuple[int, int], eps: float) -> torch.Tensor:
    """DOMAIN.md numerical-rank threshold ``max(m, n) * eps * sigma_1`` (per batch element)."""
    return max(shape) * eps * S[..., 0]


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], eps: float) -> torch.Tensor:
    """Number of singular values above :func:`rank_tolerance`. S sorted descending, (..., r)."""
    tol = rank_tolerance(S, shape, eps)
    return (S > tol[..., None]).sum(-1)


def condition_number(S: torch.Tensor, rank: int) -> float:
    """``sigma_1 / sigma_r`` over the numerical rank r (inf when r == 0)."""
    if rank <= 0:
        return float("inf")
    return float(S[0] / S[rank - 1])


def eps_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision that sets the numerical-rank tolerance: the weights' precision, at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def spectrum_block(S: torch.Tensor, d: int, dtype: torch.dtype, latent_dim: int | None, default_latent: int,
                   what: str, where: str) -> dict:
    """The numbers a head circuit reports about its singular values S (r,) of a d x d map ``what`` (``"W_OV"``,
    ``"W_QK"``), by the field names of :class:`~headlens.circuits.ov.OVResult`: rank, rank_tolerance,
    rank_eps_dtype, condition_number(_definition), singular_values, cumulative_energy, frobenius_norm, latent_dim
    (``latent_dim``, or ``min(default_latent, rank)``) and rel_error. ``where`` (``"of layer 3 head 5"``) names
    the head in the refusals: a zero map, a latent above the rank."""
    eps = torch.finfo(eps_dtype(dtype)).eps
    rank = int(numerical_rank(S, (d, d), eps))
    k = latent_dim if latent_dim is not None else min(default_latent, rank)
    if rank == 0:
        raise HeadlensError(f"{what} {where} is numerically zero (rank 0)")
    if k > rank:
        raise HeadlensError(f"`latent_dim` {k} is above the rank of {what} ({rank}): choose 1..{rank}")
    return dict(rank=rank, rank_tolerance=float(rank_tolerance(S, (d, d), eps)),
                rank_eps_dtype=str(eps_dtype(dtype)).replace("torch.", ""), condition_number=condition_number(S, rank),
                condition_number_definition="sigma_1 / sigma_r over the numerical rank r",
                singular_values=S.tolist(), cumulative_energy=cumulative_energy(S).tolist(),
                frobenius_norm=float(torch.linalg.norm(S)), latent_dim=k, rel_error=float(rel_error(S, k)))


def condition_numbers(S: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Batched :func:`condition_number`: S (..., r) and ranks (...,) -> ``sigma_1 / sigma_rank`` (...,)."""
    assert rank.shape == S.shape[:-1], (tuple(rank.shape), tuple(S.shape))
    idx = (rank - 1).clamp_min(0)
    smin = torch.gather(S, -1, idx.unsqueeze(-1)).squeeze(-1)  # (...,) sigma_rank
    return torch.where(rank > 0, S[..., 0] / smin, torch.full_like(smin, float("inf")))


def cumulative_energy(S: torch.Tensor) -> torch.Tensor:
    """``E_k`` for k = 1..r along the last axis (squares of the singular values). A zero operator (a pruned
    head) has ``E_k = 1`` for every k: any latent, even an empty one, keeps it exactly (``rel_error`` 0)."""
    sq = S.to(torch.float64) ** 2
    total = sq.sum(-1, keepdim=True)
    E = torch.cumsum(sq, -1) / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, E, torch.ones_like(E))


def rank_at_energy(E: torch.Tensor, level: float, S: torch.Tensor | None = None) -> torch.Tensor:
    """Smallest k with ``E_k >= level`` from cumulative energies E (..., r); at most r. Returns (...,).
    Given the singular values S (..., r), a zero operator gets 0 (it needs no latent at all)."""
    r = E.shape[-1]
    k = ((E < level - 1e-12).sum(-1) + 1).clamp(max=r)
    return k if S is None else torch.where(S[..., 0] > 0, k, torch.zeros_like(k))


def tail_ratio(S: torch.Tensor, k: int) -> torch.Tensor:
    """``sqrt(sum_{i>k} s_i^2 / sum_i s_i^2)``: the relative Frobenius error of the best rank-k part.

    Computed from the tail directly (not as ``sqrt(1 - E_k)``) so small errors keep their precision.
    """
    sq = S.to(torch.float64) ** 2
    total = sq.sum(-1)
    return torch.sqrt(sq[..., k:].sum(-1) / torch.where(total > 0, total, torch.ones_like(total)))


def rel_error(S: torch.Tensor, k: int) -> torch.Tensor:
    """``||W - W_k||_F / ||W||_F = sqrt(1 - E_k)``."""
    return tail_ratio(S, k)


def subspace_errors(U: torch.Tensor, T: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """``sqrt(1 - tr(U_k^T T U_k) / tr T)`` for each k: the error of projecting data with second moment T
    (..., r, r) onto the first k columns of U (..., r, r). Returns (..., len(ks))."""
    assert U.shape == T.shape, (tuple(U.shape), tuple(T.shape))
    p = torch.einsum("...ik,...ij,...jk->...k", U, T, U)  # (..., r) captured energy per direction
    tot = torch.diagonal(T, dim1=-2, dim2=-1).sum(-1)
    cum = torch.cumsum(p, -1)
    r = U.shape[-1]
    out = []
    for k in ks:
        kept = cum[..., min(k, r) - 1] if k > 0 else torch.zeros_like(tot)
        err = torch.sqrt((1 - kept / torch.where(tot > 0, tot, torch.ones_like(tot))).clamp_min(0))
        out.append(torch.where(tot > 0, err, torch.zeros_like(err)))  # nothing to project: no error
    return torch.stack(out, -1)


def plain_cache_error(svd: FactoredSVD, X: torch.Tensor, k: int) -> float:
    """``||(W - W_k) X||_F / ||W X||_F`` for the plain latent ``c = V_k^T x``. X: (d_in, N) token inputs.

    ``W X = U (diag(S) Vh X)`` with orthonormal U, so the norms are those of ``Z = diag(S) Vh X`` (r x N).
    """
    Z = svd.S[:, None] * (svd.Vh @ X.to(torch.float64))  # (r, N)
    total = torch.linalg.norm(Z)
    if total == 0:
        return 0.0
    return float(torch.linalg.norm(Z[k:]) / total)


@dataclass
class DataAwareLatent:
    """Best rank-k latent for the token set X it was fitted on: ``c = (U_k^T W) x``, ``y_hat = U_k c``."""

    S: torch.Tensor  # (r,) singular values of W X (= those of W S, S S^T = X X^T)
    U: torch.Tensor  # (d_out, r) left singular vectors of W X
    n_tokens: int

    def predicted_error(self, k: int) -> float:
        """In-sample error ``sqrt(sum_{i>k} s_i^2) / ||W X||_F``, from the spectrum alone."""
        return float(tail_ratio(self.S, k))

    def measured_error(self, W_O: torch.Tensor, W_V: torch.Tensor, X: torch.Tensor, k: int) -> float:
        """``||W X - U_k U_k^T W X||_F / ||W X||_F`` measured on tokens X (d_in, N), e.g. held-out ones."""
        Y = W_O.to(torch.float64) @ (W_V.to(torch.float64) @ X.to(torch.float64))  # (d_out, N)
        Uk = self.U[:, :k]
        resid = Y - Uk @ (Uk.T @ Y)
        total = torch.linalg.norm(Y)
        return 0.0 if total == 0 else float(torch.linalg.norm(resid) / total)


def data_aware_latent(svd: FactoredSVD, W_V: torch.Tensor, X: torch.Tensor) -> DataAwareLatent:
    """Fit the data-aware latent of ``W = W_O W_V`` on token inputs X (d_in, N), factored.

    ``W X = Q_a (R_a W_V X)``; the SVD of the (r x N) matrix ``R_a W_V X`` gives the spectrum of ``W S``.
    """
    M = svd.R_a @ (W_V.to(torch.float64) @ X.to(torch.float64))  # (r, N)
    Um, S, _ = torch.linalg.svd(M, full_matrices=False)
    r = svd.R_a.shape[-1]
    S_full = torch.zeros(r, dtype=S.dtype, device=S.device)
    S_full[: S.shape[0]] = S[:r]
    U = svd.Q_a @ Um[:, : min(r, Um.shape[1])]
    return DataAwareLatent(S=S_full, U=U, n_tokens=int(X.shape[1]))


# ------------------------------------------------------------------------------------------ Gram route


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)
_POOL_LOCK = threading.Lock()
_SPLIT_MIN = 4  # batches smaller than this run in one call


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] < workers:
            _POOL = (workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="headlens-linalg"))
        return _POOL[1]


def batched(fn: Callable, *tensors: torch.Tensor):
    """``fn(*tensors)`` for a function that treats the leading (batch) dimension elementwise, e.g. a batch of
    small eigenproblems; the result is the same, computed faster on a multi-core CPU.

    On the CPU the batch is split over the intra-op threads, each chunk computed with one thread: MKL's own
    threading slows LAPACK down on matrices this small (32 symmetric 128 x 128 eigenvalue problems: 29 ms with
    two threads, 22 ms with one, 15 ms as two single-threaded halves on two cores). Each matrix's result does not
    depend on the split. ``fn`` returns a tensor or a tuple of tensors, batched along dim 0 like its inputs.
    Elsewhere (CUDA, one thread, a small batch) it is ``fn(*tensors)``.
    """
    n = tensors[0].shape[0] if tensors[0].dim() else 0
    threads = torch.get_num_threads()
    if tensors[0].device.type != "cpu" or threads < 2 or n < _SPLIT_MIN:
        return fn(*tensors)
    parts = min(threads, n)
    chunks = [t.tensor_split(parts) for t in tensors]
    torch.set_num_threads(1)
    try:
        outs = list(_pool(parts).map(lambda i: fn(*(c[i] for c in chunks)), range(parts)))
    finally:
        torch.set_num_threads(threads)
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return tuple(torch.cat(col) for col in zip(*outs))


def _psd_sqrt(G: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(G)
    return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.mT


def gram_factor(GA: torch.Tensor) -> torch.Tensor:
    """R (..., r, r) with ``R^T R = GA``: Cholesky where GA is positive definite, a PSD square root elsewhere."""
    L, info = torch.linalg.cholesky_ex(GA)
    R = L.mT.clone()
    bad = info != 0
    if bool(bad.any()):
        R[bad] = _psd_sqrt(GA[bad])
    return R


def gram_spectrum(GA: torch.Tensor, GB: torch.Tensor, vectors: bool = False):
    """Singular values (descending, (..., r)) of ``A B`` from ``GA = A^T A`` and ``GB = B B^T`` (..., r, r).

    Returns ``(S, R)`` or, with ``vectors``, ``(S, R, U)`` where R (..., r, r) is :func:`gram_factor` of GA
    and U (..., r, r) holds the left singular vectors of ``A B`` in R coordinates (columns, descending).
    """
    assert GA.shape == GB.shape and GA.shape[-1] == GA.shape[-2], (tuple(GA.shape), tuple(GB.shape))
    if GA.dim() > 2:
        return batched(lambda a, b: _gram_spectrum(a, b, vectors), GA, GB)
    return _gram_spectrum(GA, GB, vectors)


def _gram_spectrum(GA: torch.Tensor, GB: torch.Tensor, vectors: bool):
    R = gram_factor(GA)
    C = R @ GB @ R.mT
    C = 0.5 * (C + C.mT)
    if vectors:
        vals, U = torch.linalg.eigh(C)
        return vals.flip(-1).clamp_min(0).sqrt(), R, U.flip(-1)
    return torch.linalg.eigvalsh(C).flip(-1).clamp_min(0).sqrt(), R


def gaussian_probes(d: int, n: int, seed: int) -> torch.Tensor:
    """Seeded isotropic Gaussian token inputs, shape (d, n), float64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, n, generator=gen, dtype=torch.float64)
