"""Every head of a model at once: OV/QK spectra, kv-group operators, data-aware latents and an MLA budget.

All spectra come from ``hd x hd`` Gram matrices of the thin factors, batched over the heads of a layer
(DOMAIN.md): for ``W = A B`` with ``A`` (d x hd) and ``B`` (hd x d),

    GA = A^T A = R^T R (Cholesky; a PSD square root when A is rank-deficient),   GB = B B^T,
    sigma(W)^2 = eig(R GB R^T).

The Gram route squares the condition number, so it runs in float64 (tests check it against the QR route).
Errors of latents are measured in the ``R`` coordinates: ``||A z|| = ||R z||`` for any z, so
``W X = Q (R B X)`` with orthonormal Q and every error is a ratio of traces of ``hd x hd`` matrices.

- Per query head h (kv head g = h // (H/G)): OV spectrum of ``W_O^h W_V^g``; QK spectrum of
  ``W_Q^h^T W_K^g`` (approximate as a description of attention scores: RoPE and q/k norms act between).
- Per kv group g: the stacked OV operator ``[W_O^h W_V^g]_{h in g}`` (what one shared latent serves): its
  ``GA`` is the sum of the heads' ``GA``; and the spectrum of ``W_V^g`` itself.
- Data-aware (token inputs X of the layer's attention, split into fit / held-out tokens): the whitened
  spectrum ``sigma(W X_fit)`` (= ``sigma(W S)`` with ``S S^T = X_fit X_fit^T``), the error it predicts, and the
  errors measured on held-out tokens for the data-aware latent and for the plain one (``P = V_k^T``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

ENERGY_LEVELS = (0.5, 0.9, 0.95, 0.99)


@dataclass
class SweepConfig:
    ks: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    fold_norm: bool = False
    with_qk: bool = True
    rank_eps: float = float(torch.finfo(torch.float32).eps)  # precision that sets the numerical rank


# --------------------------------------------------------------------------------------- Gram spectra


def _psd_sqrt(G: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(G)
    return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.mT


def gram_factor(GA: torch.Tensor) -> torch.Tensor:
    """R with ``R^T R = GA`` (..., r, r): Cholesky where GA is positive definite, a PSD square root elsewhere."""
    L, info = torch.linalg.cholesky_ex(GA)
    R = L.mT.clone()
    bad = info != 0
    if bool(bad.any()):
        R[bad] = _psd_sqrt(GA[bad])
    return R


def gram_spectrum(GA: torch.Tensor, GB: torch.Tensor, vectors: bool = False):
    """Singular values (descending, (..., r)) of ``A B`` from ``GA = A^T A`` and ``GB = B B^T``.

    Returns ``(S, R)`` or, with ``vectors``, ``(S, R, U)`` where U (..., r, r) holds the left singular
    vectors of ``A B`` in R coordinates (columns, descending).
    """
    R = gram_factor(GA)
    C = R @ GB @ R.mT
    C = 0.5 * (C + C.mT)
    if vectors:
        vals, U = torch.linalg.eigh(C)
        return vals.flip(-1).clamp_min(0).sqrt(), R, U.flip(-1)
    return torch.linalg.eigvalsh(C).flip(-1).clamp_min(0).sqrt(), R


def energy(S: torch.Tensor) -> torch.Tensor:
    """Cumulative energy ``E_k`` (..., r)."""
    sq = S**2
    tot = sq.sum(-1, keepdim=True)
    return torch.cumsum(sq, -1) / torch.where(tot > 0, tot, torch.ones_like(tot))


def rank_at_energy(E: torch.Tensor, level: float) -> torch.Tensor:
    """Smallest k with ``E_k >= level`` (..,)."""
    r = E.shape[-1]
    return ((E < level - 1e-12).sum(-1) + 1).clamp(max=r)


def tail_error(S: torch.Tensor, k: int) -> torch.Tensor:
    """``sqrt(sum_{i>k} s_i^2 / sum s_i^2)`` (0 when k >= r)."""
    sq = S**2
    tot = sq.sum(-1)
    return torch.sqrt(sq[..., k:].sum(-1) / torch.where(tot > 0, tot, torch.ones_like(tot)))


def numerical_rank(S: torch.Tensor, d: int, eps: float) -> torch.Tensor:
    return (S > d * eps * S[..., :1]).sum(-1)


def _subspace_errors(U: torch.Tensor, T: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """``sqrt(1 - tr(U_k^T T U_k) / tr T)`` for each k: error of projecting data with second moment T."""
    p = torch.einsum("...ik,...ij,...jk->...k", U, T, U)  # (..., r) captured energy per direction
    tot = torch.diagonal(T, dim1=-2, dim2=-1).sum(-1)
    cum = torch.cumsum(p, -1)
    r = U.shape[-1]
    out = []
    for k in ks:
        kept = cum[..., min(k, r) - 1] if k > 0 else torch.zeros_like(tot)
        out.append(torch.sqrt((1 - kept / torch.where(tot > 0, tot, torch.ones_like(tot))).clamp_min(0)))
    return torch.stack(out, -1)


# ------------------------------------------------------------------------------------------ one layer


class NonFiniteWeights(ValueError):
    """A Gram matrix of the layer's weights holds NaN/inf: some weight is non-finite (or huge)."""


@dataclass
class LayerResult:
    layer: int
    head_rows: list[dict]
    group_rows: list[dict]
    group_plain: torch.Tensor  # (G, r) singular values of the stacked kv-group operators
    group_white: torch.Tensor | None  # (G, r) whitened singular values on the fit tokens
    group_white_heldout: torch.Tensor | None = None  # (G, r) held-out error of the data-aware latent, k = 1..r


def _spectrum_columns(prefix: str, S: torch.Tensor, d: int, eps: float, ks: list[int] | None,
                      levels=ENERGY_LEVELS) -> dict[str, list]:
    E = energy(S)
    rank = numerical_rank(S, d, eps)
    idx = (rank - 1).clamp_min(0)
    smin = torch.gather(S, -1, idx.unsqueeze(-1)).squeeze(-1)
    cols: dict[str, list] = {
        f"{prefix}_rank": rank.tolist(),
        f"{prefix}_sigma_max": S[..., 0].tolist(),
        f"{prefix}_frobenius": torch.linalg.norm(S, dim=-1).tolist(),
        f"{prefix}_condition": torch.where(rank > 0, S[..., 0] / smin, torch.full_like(smin, float("inf"))).tolist(),
    }
    for lv in levels:
        cols[f"{prefix}_rank_e{int(round(lv * 100))}"] = rank_at_energy(E, lv).tolist()
    for k in ks or []:
        cols[f"{prefix}_energy_k{k}"] = E[..., min(k, E.shape[-1]) - 1].tolist()
        cols[f"{prefix}_rel_error_k{k}"] = tail_error(S, k).tolist()
    return cols


def _rows(n: int, base: dict[str, list], cols: dict[str, list]) -> list[dict]:
    allc = {**base, **cols}
    return [{k: v[i] for k, v in allc.items()} for i in range(n)]


def analyze_layer(
    layer: int,
    W_O: torch.Tensor,  # (H, d, hd)
    W_V: torch.Tensor,  # (G, hd, d)
    cfg: SweepConfig,
    W_Q: torch.Tensor | None = None,  # (H, hd, d)
    W_K: torch.Tensor | None = None,  # (G, hd, d)
    X_fit: torch.Tensor | None = None,  # (d, N_fit) attention inputs
    X_test: torch.Tensor | None = None,  # (d, N_test) held-out attention inputs
) -> LayerResult:
    """Every number the sweep reports for one layer, batched over its heads."""
    H, d, hd = W_O.shape
    G = W_V.shape[0]
    group = torch.arange(H) // (H // G)  # kv head of each query head
    GA = W_O.mT @ W_O  # (H, hd, hd)
    GB = W_V @ W_V.mT  # (G, hd, hd)
    # Every weight enters a diagonal entry of some Gram as a square: NaN/inf anywhere shows up here.
    if not (bool(torch.isfinite(GA).all()) and bool(torch.isfinite(GB).all())):
        raise NonFiniteWeights(layer)
    data = X_fit is not None
    if data:
        S, R, U = gram_spectrum(GA, GB[group], vectors=True)
    else:
        (S, R), U = gram_spectrum(GA, GB[group]), None
    eps = cfg.rank_eps
    head_cols = _spectrum_columns("ov", S, d, eps, cfg.ks)
    if W_Q is not None and W_K is not None:
        # The QK circuit is approximate anyway (RoPE and q/k norms act between W_Q and W_K): its Gram products
        # may run in the precision W_Q/W_K were given in (float32 in a sweep); the eigenproblems run in float64.
        GQ = (W_Q @ W_Q.mT).to(torch.float64)
        GK = (W_K @ W_K.mT).to(torch.float64)
        if not (bool(torch.isfinite(GQ).all()) and bool(torch.isfinite(GK).all())):
            raise NonFiniteWeights(layer)
        Sq, _ = gram_spectrum(GQ, GK[group])
        qcols = _spectrum_columns("qk", Sq, d, eps, None, levels=(0.9,))
        head_cols.update({k: qcols[k] for k in ("qk_sigma_max", "qk_rank_e90")})
        if W_Q.dtype == torch.float64:  # a numerical rank needs float64 Gram products
            head_cols["qk_rank"] = qcols["qk_rank"]
    GA_g = torch.zeros(G, hd, hd, dtype=GA.dtype).index_add_(0, group, GA)  # stacked operator per kv group
    if data:
        Sg, Rg, Ug = gram_spectrum(GA_g, GB, vectors=True)
    else:
        (Sg, Rg), Ug = gram_spectrum(GA_g, GB), None
    Sv = torch.linalg.eigvalsh(GB).flip(-1).clamp_min(0).sqrt()
    group_cols = _spectrum_columns("stack", Sg, d * (H // G), eps, cfg.ks)  # stacked: (H/G * d) x d
    for key in ("stack_sigma_max", "stack_frobenius", "stack_condition"):
        group_cols.pop(key)
    vcols = _spectrum_columns("v", Sv, d, eps, None, levels=(0.9,))
    group_cols.update({k: vcols[k] for k in ("v_rank", "v_sigma_max", "v_rank_e90")})

    white_g = white_g_heldout = None
    if data:
        assert X_test is not None
        Yf = W_V @ X_fit  # (G, hd, N_fit)
        Yt = W_V @ X_test
        Mf, Mt = Yf @ Yf.mT, Yt @ Yt.mT  # (G, hd, hd) second moments of the values
        for prefix, RR, UU, idx, n in (("", R, U, group, H), ("stack_", Rg, Ug, torch.arange(G), G)):
            Tf = RR @ Mf[idx] @ RR.mT  # (n, hd, hd): W X_fit X_fit^T W^T in R coordinates
            Tt = RR @ Mt[idx] @ RR.mT
            wv, WU = torch.linalg.eigh(0.5 * (Tf + Tf.mT))
            white = wv.flip(-1).clamp_min(0).sqrt()  # whitened singular values
            WU = WU.flip(-1)
            cols = group_cols if prefix else head_cols
            plain_fit = _subspace_errors(UU, Tf, cfg.ks)
            plain_test = _subspace_errors(UU, Tt, cfg.ks)
            white_test = _subspace_errors(WU, Tt, cfg.ks)
            for j, k in enumerate(cfg.ks):
                if not prefix:
                    cols[f"plain_pred_k{k}"] = plain_fit[:, j].tolist()
                cols[f"{prefix}plain_heldout_k{k}"] = plain_test[:, j].tolist()
                cols[f"{prefix}white_pred_k{k}"] = tail_error(white, k).tolist()
                cols[f"{prefix}white_heldout_k{k}"] = white_test[:, j].tolist()
            if prefix:
                white_g = white
                white_g_heldout = _subspace_errors(WU, Tt, list(range(1, WU.shape[-1] + 1)))
    heads = _rows(H, {"layer": [layer] * H, "head": list(range(H)), "kv_head": group.tolist()}, head_cols)
    groups = _rows(G, {"layer": [layer] * G, "kv_head": list(range(G)), "group_size": [H // G] * G}, group_cols)
    return LayerResult(layer=layer, head_rows=heads, group_rows=groups, group_plain=Sg, group_white=white_g,
                       group_white_heldout=white_g_heldout)


# --------------------------------------------------------------------------------------------- budget


@dataclass
class BudgetTarget:
    kind: str  # "error" or "energy"
    value: float

    def k_for(self, S: torch.Tensor) -> int:
        """Smallest latent size meeting the target for one spectrum S (r,)."""
        r = S.shape[-1]
        if self.kind == "energy":
            return int(rank_at_energy(energy(S), self.value))
        sq = S.to(torch.float64) ** 2
        tot = float(sq.sum())
        if tot <= 0:
            return 0
        tails = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # tails[k] = sum_{i>=k} s_i^2
        errs = torch.cat([torch.sqrt(tails / tot), torch.zeros(1, dtype=torch.float64)])  # error at k = 0..r
        ok = torch.nonzero(errs <= self.value + 1e-12)
        return int(ok[0]) if len(ok) else r

    def label(self) -> str:
        return f"{self.kind} {self.value:g}"


def _heldout(r: LayerResult, g: int, k: int) -> float | None:
    """Held-out error of group g's data-aware latent of size k (1.0 at k = 0)."""
    if r.group_white_heldout is None:
        return None
    return 1.0 if k <= 0 else float(r.group_white_heldout[g, min(k, r.group_white_heldout.shape[1]) - 1])


def _uniform_split(total: int, n: int, cap: int) -> list[int]:
    base, extra = divmod(total, n)
    return [min(base + (1 if i < extra else 0), cap) for i in range(n)]


def budget(results: list[LayerResult], target: BudgetTarget, num_kv_heads: int, head_dim: int,
           bytes_per_value: int) -> dict:
    """Latent size per layer and kv group for ``target``; KV bytes per token before/after; uniform baseline.

    Keys are kept in full (their RoPE dimensions cannot be folded into a latent); each kv group's values are
    replaced by a latent of ``k_g`` numbers. Before: ``2 * G * hd`` values per token per layer; after:
    ``G * hd + sum_g k_g``. The uniform allocation spreads the same total of latent dims evenly over all
    (layer, kv group) pairs.
    """
    rows = []
    data = all(r.group_white is not None for r in results)
    for r in results:
        for g in range(r.group_plain.shape[0]):
            Sp = r.group_plain[g]
            kp = target.k_for(Sp)
            row = {"layer": r.layer, "kv_head": g, "k_plain": kp, "err_plain": float(tail_error(Sp, kp)),
                   "k_data": None, "err_data": None, "err_data_heldout": None}
            if data:
                Sw = r.group_white[g]
                kd = target.k_for(Sw)
                row.update(k_data=kd, err_data=float(tail_error(Sw, kd)),
                           err_data_heldout=_heldout(r, g, kd))
            rows.append(row)
    total = sum(r["k_plain"] for r in rows)
    uni = _uniform_split(total, len(rows), head_dim)
    by = {(r.layer, g): r for r in results for g in range(r.group_plain.shape[0])}
    for row, ku in zip(rows, uni):
        res = by[(row["layer"], row["kv_head"])]
        row["k_uniform"] = ku
        row["err_uniform_plain"] = float(tail_error(res.group_plain[row["kv_head"]], ku))
        row["err_uniform_data"] = (float(tail_error(res.group_white[row["kv_head"]], ku)) if data else None)
        row["err_uniform_data_heldout"] = _heldout(res, row["kv_head"], ku) if data else None
    before_layer = 2 * num_kv_heads * head_dim * bytes_per_value
    per_layer = []
    for r in results:
        mine = [x for x in rows if x["layer"] == r.layer]
        keys_bytes = num_kv_heads * head_dim * bytes_per_value
        per_layer.append({
            "layer": r.layer,
            "kv_bytes_before": before_layer,
            "kv_bytes_after_plain": keys_bytes + sum(x["k_plain"] for x in mine) * bytes_per_value,
            "kv_bytes_after_data": (keys_bytes + sum(x["k_data"] for x in mine) * bytes_per_value) if data else None,
            "kv_bytes_after_uniform": keys_bytes + sum(x["k_uniform"] for x in mine) * bytes_per_value,
        })
    before = sum(p["kv_bytes_before"] for p in per_layer)
    after_p = sum(p["kv_bytes_after_plain"] for p in per_layer)
    after_d = sum(p["kv_bytes_after_data"] for p in per_layer) if data else None

    def stats(key: str):
        vals = [x[key] for x in rows if x[key] is not None]
        return (sum(vals) / len(vals), max(vals)) if vals else (None, None)

    mp, xp = stats("err_plain")
    mu, xu = stats("err_uniform_plain")
    md, xd = stats("err_data")
    mud, xud = stats("err_uniform_data")
    mdh, xdh = stats("err_data_heldout")
    muh, xuh = stats("err_uniform_data_heldout")
    totals = {
        "kv_bytes_before": before,
        "kv_bytes_after_plain": after_p,
        "saving_plain_pct": 100.0 * (1 - after_p / before) if before else 0.0,
        "kv_bytes_after_data": after_d,
        "saving_data_pct": (100.0 * (1 - after_d / before)) if data and before else None,
        "latent_dims_plain": total,
        "latent_dims_data": sum(x["k_data"] for x in rows) if data else None,
        "uniform_k": total / len(rows) if rows else 0.0,
        "mean_err_plain": mp, "max_err_plain": xp,
        "mean_err_uniform": mu, "max_err_uniform": xu,
        "mean_err_data": md, "max_err_data": xd,
        "mean_err_uniform_data": mud, "max_err_uniform_data": xud,
        "mean_err_data_heldout": mdh, "max_err_data_heldout": xdh,
        "mean_err_uniform_data_heldout": muh, "max_err_uniform_data_heldout": xuh,
    }
    return {"target": target.label(), "bytes_per_value": bytes_per_value, "rows": rows, "per_layer": per_layer,
            "totals": totals}


def config_json(cfg: SweepConfig) -> dict:
    return asdict(cfg)


# --------------------------------------------------------------------------------------------- runner


def iter_layers(ck, layers: list[int], cfg: SweepConfig, load_dtype: torch.dtype):
    """Yield ``(layer, LayerFactors)`` one layer at a time, reading the next layer in a background thread.

    At most two layers' weights are alive at once (the one being analysed and the one being read), so the
    peak memory does not grow with the model.
    """
    from concurrent.futures import ThreadPoolExecutor

    from headlens.circuits.heads import read_layer, read_layer_raw

    def load(layer: int):  # I/O only: no torch compute competing with the analysis for the cores
        return read_layer_raw(ck, layer, with_qk=cfg.with_qk)

    if not layers:
        return
    qk_dtype = torch.float64 if load_dtype == torch.float64 else torch.float32
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, layers[0])
        for i, layer in enumerate(layers):
            raw = nxt.result()
            nxt = pool.submit(load, layers[i + 1]) if i + 1 < len(layers) else None
            f = read_layer(ck, layer, with_qk=cfg.with_qk, fold_norm=cfg.fold_norm, load_dtype=load_dtype,
                           raw=raw, qk_dtype=qk_dtype, check_finite=False)  # analyze_layer checks its Grams
            del raw
            yield layer, f
            del f
