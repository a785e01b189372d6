"""The KV-cache budget of an MLA-style latent: the smallest latent per layer and kv group for a target.

Keys are kept in full (their RoPE dimensions cannot be folded into a latent); each kv group's values are
replaced by a latent of ``k_g`` numbers. Before: ``2 * G * hd`` values per token per layer; after:
``G * hd + sum_g k_g``. The uniform allocation spreads the same total of latent dims evenly over all
(layer, kv group) pairs. With calibration data the same is done for the data-aware latents (whitened spectra),
with the errors measured on held-out tokens next to the predicted ones.

Key budget (sweeps with QK): next to each value latent, ``key_k_plain`` (``key_k_data``) is the smallest latent of
the group's keys meeting the same target (:meth:`BudgetTarget.k_for`) on the stacked key operator
``M^K_g = [(W_Q^h)^T W_K^g]_{h in g}`` (whitened on the key side, ``M^K_g S``, for the data-aware one): its relative
error is the relative logit error at relative position 0 (no rotary) for isotropic query inputs. The bytes with
key latents too, ``sum_g (key_k_g + k_g)`` per token per layer, are ``kv_bytes_after_*_with_keys``; under rotary a
key latent is not directly a cache (DOMAIN.md, keys under rotary), so the value-only figures stay the headline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from headlens.circuits.spectrum import cumulative_energy, rank_at_energy, tail_ratio
from headlens.circuits.sweep_results import LayerResult


@dataclass
class BudgetTarget:
    """What each kv group's latent must reach."""

    kind: str  # "error" (relative error <= value) or "energy" (kept energy >= value)
    value: float

    def k_for(self, S: torch.Tensor) -> int:
        """Smallest latent size meeting the target for one spectrum S (r,)."""
        r = S.shape[-1]
        if self.kind == "energy":
            return int(rank_at_energy(cumulative_energy(S), self.value, S))
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


@dataclass
class BudgetRow:
    """One (layer, kv group): latent sizes and their relative errors under each allocation."""

    layer: int
    kv_head: int
    k_plain: int  # smallest plain latent meeting the target
    err_plain: float
    k_data: int | None = None  # smallest data-aware latent meeting the target (data-aware mode)
    err_data: float | None = None  # predicted on the fit tokens
    err_data_heldout: float | None = None  # measured on held-out tokens
    k_uniform: int = 0  # the uniform allocation's latent size
    err_uniform_plain: float = 0.0
    err_uniform_data: float | None = None
    err_uniform_data_heldout: float | None = None
    key_k_plain: int | None = None  # smallest plain key latent meeting the target (sweeps with QK)
    key_err_plain: float | None = None
    key_k_data: int | None = None  # smallest data-aware key latent meeting the target (data-aware, with QK)
    key_err_data: float | None = None  # predicted on the fit tokens
    key_err_data_heldout: float | None = None  # measured on held-out tokens


@dataclass
class BudgetLayer:
    """KV cache bytes per token of one layer, before and after each allocation."""

    layer: int
    kv_bytes_before: int
    kv_bytes_after_plain: int
    kv_bytes_after_data: int | None
    kv_bytes_after_uniform: int
    kv_bytes_after_plain_with_keys: int | None = None  # key latents too: sum_g (key_k_plain + k_plain)
    kv_bytes_after_data_with_keys: int | None = None  # sum_g (key_k_data + k_data)


@dataclass
class BudgetTotals:
    """All layers together: bytes per token, savings in percent, latent dims, mean/max errors."""

    kv_bytes_before: int
    kv_bytes_after_plain: int
    saving_plain_pct: float
    kv_bytes_after_data: int | None
    saving_data_pct: float | None
    latent_dims_plain: int
    latent_dims_data: int | None
    uniform_k: float  # the uniform allocation's mean latent size per kv group
    mean_err_plain: float | None
    max_err_plain: float | None
    mean_err_uniform: float | None
    max_err_uniform: float | None
    mean_err_data: float | None
    max_err_data: float | None
    mean_err_uniform_data: float | None
    max_err_uniform_data: float | None
    mean_err_data_heldout: float | None
    max_err_data_heldout: float | None
    mean_err_uniform_data_heldout: float | None
    max_err_uniform_data_heldout: float | None
    key_latent_dims_plain: int | None = None  # the key budget (sweeps with QK)
    key_latent_dims_data: int | None = None
    kv_bytes_after_plain_with_keys: int | None = None
    saving_plain_with_keys_pct: float | None = None
    kv_bytes_after_data_with_keys: int | None = None
    saving_data_with_keys_pct: float | None = None
    mean_err_key_plain: float | None = None
    max_err_key_plain: float | None = None
    mean_err_key_data: float | None = None
    max_err_key_data: float | None = None
    mean_err_key_data_heldout: float | None = None
    max_err_key_data_heldout: float | None = None


@dataclass
class LayerLatents:
    """One layer's latent dims summed over its kv groups (None when a group lacks one) and its KV bytes."""

    layer: int
    kv_groups: int
    k_plain: int | None
    k_data: int | None
    k_uniform: int | None
    kv_bytes_before: int | None = None
    kv_bytes_after_plain: int | None = None
    kv_bytes_after_data: int | None = None
    kv_bytes_after_uniform: int | None = None
    key_k_plain: int | None = None  # key latent dims summed over the kv groups (sweeps with QK)
    key_k_data: int | None = None


@dataclass
class Budget:
    """The latent budget for ``target``: per (layer, kv group), per layer, and in total."""

    target: BudgetTarget
    bytes_per_value: int  # bytes per cached number
    rows: list[BudgetRow]
    per_layer: list[BudgetLayer]
    totals: BudgetTotals

    @property
    def data_aware(self) -> bool:
        return self.totals.kv_bytes_after_data is not None

    def to_json(self, with_rows: bool = True) -> dict[str, Any]:
        """``{"target": label, "bytes_per_value", ["rows"], "per_layer", "totals"}`` of plain values."""
        out: dict[str, Any] = {"target": self.target.label(), "bytes_per_value": self.bytes_per_value}
        if with_rows:
            out["rows"] = [asdict(r) for r in self.rows]
        out["per_layer"] = [asdict(p) for p in self.per_layer]
        out["totals"] = asdict(self.totals)
        return out

    def layer_latents(self) -> list[LayerLatents]:
        """Per layer (sorted): latent dims summed over kv groups for each allocation, and the KV bytes."""
        by_layer: dict[int, LayerLatents] = {}
        for r in self.rows:
            d = by_layer.setdefault(r.layer, LayerLatents(r.layer, 0, 0, 0, 0))
            d.kv_groups += 1
            d.k_plain = d.k_plain + r.k_plain
            d.k_data = None if (r.k_data is None or d.k_data is None) else d.k_data + r.k_data
            d.k_uniform = d.k_uniform + r.k_uniform  # type: ignore[operator]
            d.key_k_plain = _add(d.key_k_plain, r.key_k_plain, d.kv_groups == 1)
            d.key_k_data = _add(d.key_k_data, r.key_k_data, d.kv_groups == 1)
        for p in self.per_layer:
            d = by_layer.setdefault(p.layer, LayerLatents(p.layer, 0, None, None, None))
            d.kv_bytes_before, d.kv_bytes_after_plain = p.kv_bytes_before, p.kv_bytes_after_plain
            d.kv_bytes_after_data, d.kv_bytes_after_uniform = p.kv_bytes_after_data, p.kv_bytes_after_uniform
        return [by_layer[k] for k in sorted(by_layer)]


def _add(total: int | None, k: int | None, first: bool) -> int | None:
    """A layer's sum of per-group sizes, None once a group has none."""
    if k is None or (total is None and not first):
        return None
    return k if first else total + k  # type: ignore[operator]


def _heldout(r: LayerResult, g: int, k: int, keys: bool = False) -> float | None:
    """Held-out error of group g's data-aware value (``keys``: key) latent of size k (1.0 at k = 0, 0.0 for a
    zero group)."""
    plain, held = (r.key_plain, r.key_white_heldout) if keys else (r.group_plain, r.group_white_heldout)
    if held is None or plain is None:
        return None
    if k <= 0:  # no latent: the whole output is lost, which is nothing for a zero (pruned) group
        return 0.0 if float(plain[g, 0]) == 0 else 1.0
    return float(held[g, min(k, held.shape[1]) - 1])


def _key_sizes(row: BudgetRow, r: LayerResult, target: BudgetTarget, data: bool) -> None:
    """The key budget of ``row``'s kv group, where the layer has its stacked key operators' spectra."""
    g = row.kv_head
    if r.key_plain is None:
        return
    Sk = r.key_plain[g]
    row.key_k_plain = target.k_for(Sk)
    row.key_err_plain = float(tail_ratio(Sk, row.key_k_plain))
    if data and r.key_white is not None:
        Sw = r.key_white[g]
        row.key_k_data = target.k_for(Sw)
        row.key_err_data = float(tail_ratio(Sw, row.key_k_data))
        row.key_err_data_heldout = _heldout(r, g, row.key_k_data, keys=True)


def uniform_split(total: int, n: int, cap: int) -> list[int]:
    """``total`` latent dims spread over ``n`` kv groups as evenly as integers allow (the first ``total % n`` get
    one more), each at most ``cap``: the uniform allocation of the same total."""
    base, extra = divmod(total, n)
    return [min(base + (1 if i < extra else 0), cap) for i in range(n)]


def _rows(results: Sequence[LayerResult], target: BudgetTarget, head_dim: int, data: bool) -> list[BudgetRow]:
    """Per (layer, kv group): the target's latent sizes, then the uniform allocation of the same total."""
    rows: list[tuple[BudgetRow, LayerResult]] = []
    for r in results:
        for g in range(r.group_plain.shape[0]):
            Sp = r.group_plain[g]
            kp = target.k_for(Sp)
            row = BudgetRow(layer=r.layer, kv_head=g, k_plain=kp, err_plain=float(tail_ratio(Sp, kp)))
            if data:
                Sw = r.group_white[g]  # type: ignore[index]
                kd = target.k_for(Sw)
                row.k_data, row.err_data, row.err_data_heldout = kd, float(tail_ratio(Sw, kd)), _heldout(r, g, kd)
            _key_sizes(row, r, target, data)
            rows.append((row, r))
    uni = uniform_split(sum(row.k_plain for row, _ in rows), len(rows), head_dim)
    for (row, res), ku in zip(rows, uni):
        row.k_uniform = ku
        row.err_uniform_plain = float(tail_ratio(res.group_plain[row.kv_head], ku))
        row.err_uniform_data = float(tail_ratio(res.group_white[row.kv_head], ku)) if data else None  # type: ignore[index]
        row.err_uniform_data_heldout = _heldout(res, row.kv_head, ku) if data else None
    return [row for row, _ in rows]


def _per_layer(results: Sequence[LayerResult], rows: list[BudgetRow], num_kv_heads: int, head_dim: int,
               bytes_per_value: int, data: bool) -> list[BudgetLayer]:
    before_layer = 2 * num_kv_heads * head_dim * bytes_per_value
    keys_bytes = num_kv_heads * head_dim * bytes_per_value
    out = []
    for r in results:
        mine = [x for x in rows if x.layer == r.layer]
        out.append(BudgetLayer(
            layer=r.layer, kv_bytes_before=before_layer,
            kv_bytes_after_plain=keys_bytes + sum(x.k_plain for x in mine) * bytes_per_value,
            kv_bytes_after_data=(keys_bytes + sum(x.k_data for x in mine) * bytes_per_value) if data else None,  # type: ignore[misc]
            kv_bytes_after_uniform=keys_bytes + sum(x.k_uniform for x in mine) * bytes_per_value,
            kv_bytes_after_plain_with_keys=_with_keys(mine, "key_k_plain", "k_plain", bytes_per_value),
            kv_bytes_after_data_with_keys=_with_keys(mine, "key_k_data", "k_data", bytes_per_value)))
    return out


def _with_keys(rows: list[BudgetRow], key: str, value: str, bytes_per_value: int) -> int | None:
    """Bytes per token of one layer with key and value latents: ``sum_g (key_k_g + k_g)``, None without keys."""
    sizes = [(getattr(x, key), getattr(x, value)) for x in rows]
    if not sizes or any(a is None or b is None for a, b in sizes):
        return None
    return sum(a + b for a, b in sizes) * bytes_per_value


def _stats(rows: list[BudgetRow], key: str) -> tuple[float | None, float | None]:
    vals = [getattr(x, key) for x in rows if getattr(x, key) is not None]
    return (sum(vals) / len(vals), max(vals)) if vals else (None, None)


def _totals(rows: list[BudgetRow], per_layer: list[BudgetLayer], data: bool) -> BudgetTotals:
    before = sum(p.kv_bytes_before for p in per_layer)
    after_p = sum(p.kv_bytes_after_plain for p in per_layer)
    after_d = sum(p.kv_bytes_after_data for p in per_layer) if data else None  # type: ignore[misc]
    total = sum(r.k_plain for r in rows)
    errs = {}
    for name, key in (("plain", "err_plain"), ("uniform", "err_uniform_plain"), ("data", "err_data"),
                      ("uniform_data", "err_uniform_data"), ("data_heldout", "err_data_heldout"),
                      ("uniform_data_heldout", "err_uniform_data_heldout"), ("key_plain", "key_err_plain"),
                      ("key_data", "key_err_data"), ("key_data_heldout", "key_err_data_heldout")):
        errs[f"mean_err_{name}"], errs[f"max_err_{name}"] = _stats(rows, key)
    keys: dict[str, Any] = {}
    for kind in ("plain", "data"):
        ks = [getattr(r, f"key_k_{kind}") for r in rows]
        keys[f"key_latent_dims_{kind}"] = sum(ks) if rows and None not in ks else None  # type: ignore[arg-type]
        after = [getattr(p, f"kv_bytes_after_{kind}_with_keys") for p in per_layer]
        after_k = sum(after) if per_layer and None not in after else None  # type: ignore[arg-type]
        keys[f"kv_bytes_after_{kind}_with_keys"] = after_k
        keys[f"saving_{kind}_with_keys_pct"] = 100.0 * (1 - after_k / before) if after_k is not None and before else None
    return BudgetTotals(
        kv_bytes_before=before, kv_bytes_after_plain=after_p,
        saving_plain_pct=100.0 * (1 - after_p / before) if before else 0.0,
        kv_bytes_after_data=after_d,
        saving_data_pct=(100.0 * (1 - after_d / before)) if data and before else None,  # type: ignore[operator]
        latent_dims_plain=total, latent_dims_data=sum(x.k_data for x in rows) if data else None,  # type: ignore[misc]
        uniform_k=total / len(rows) if rows else 0.0, **errs, **keys)


def budget(results: Sequence[LayerResult], target: BudgetTarget, num_kv_heads: int, head_dim: int,
           bytes_per_value: int) -> Budget:
    """Latent size per layer and kv group for ``target``; KV bytes per token before/after; uniform baseline.

    Data-aware figures are filled in when every layer carries whitened spectra (``group_white``).
    """
    data = all(r.group_white is not None for r in results)
    rows = _rows(results, target, head_dim, data)
    per_layer = _per_layer(results, rows, num_kv_heads, head_dim, bytes_per_value, data)
    return Budget(target=target, bytes_per_value=bytes_per_value, rows=rows, per_layer=per_layer,
                  totals=_totals(rows, per_layer, data))
