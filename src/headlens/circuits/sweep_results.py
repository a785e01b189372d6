"""What the sweep finds, as dataclasses: per query head, per kv group, per layer, and per-layer aggregates.

The tables (``sweep_heads``, ``sweep_groups``) and the per-layer resume files are flat rows made from these by
:func:`head_row` / :func:`group_row` (:func:`to_rows` for a whole sweep); :func:`head_from_row` /
:func:`group_from_row` read such a row back, given the latent sizes and energy levels it was written with.
Column names: ``<prefix>_rank``, ``<prefix>_sigma_max``, ``<prefix>_frobenius``, ``<prefix>_condition``,
``<prefix>_rank_e<percent>``, ``<prefix>_energy_k<k>``, ``<prefix>_rel_error_k<k>`` for each operator
(``ov``, ``qk``, ``stack``, ``v``, ``qk_stack``), and
``[stack_|qk_stack_]{plain_pred,plain_heldout,white_pred,white_heldout}_k<k>`` for the data-aware latents.

Column order: the columns of the OV side come first, as before the QK columns were extended; every QK column
after ``qk_sigma_max, qk_rank_e90, qk_rank`` is appended at the end of its row (``qk_frobenius``,
``qk_condition``, ``qk_energy_k<k>``, ``qk_rel_error_k<k>`` per head; the ``qk_stack_*`` spectrum and latent
cells per kv group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class Spectrum:
    """What the sweep keeps of one operator's singular values; a field it does not report is None or empty."""

    rank: int | None = None  # numerical rank: singular values above max(m, n) * eps * sigma_1
    sigma_max: float | None = None  # largest singular value
    frobenius: float | None = None  # sqrt(sum sigma_i^2)
    condition: float | None = None  # sigma_1 / sigma_rank over the numerical rank (inf when the rank is 0)
    rank_at: dict[int, int] = field(default_factory=dict)  # energy level in percent -> smallest k with E_k >= it
    energy: dict[int, float] = field(default_factory=dict)  # latent size k -> E_k
    rel_error: dict[int, float] = field(default_factory=dict)  # latent size k -> sqrt(1 - E_k)

    def cells(self, prefix: str) -> dict[str, Any]:
        """The table cells of this spectrum, in column order, without the fields that are None."""
        out: dict[str, Any] = {}
        for name in ("rank", "sigma_max", "frobenius", "condition"):
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}_{name}"] = value
        for pct, r in self.rank_at.items():
            out[f"{prefix}_rank_e{pct}"] = r
        for k in self.energy:
            out[f"{prefix}_energy_k{k}"] = self.energy[k]
            out[f"{prefix}_rel_error_k{k}"] = self.rel_error[k]
        return out

    @classmethod
    def from_cells(cls, row: dict[str, Any], prefix: str, ks: Sequence[int], levels: Sequence[int]) -> "Spectrum":
        """Inverse of :meth:`cells` for a row written with latent sizes ``ks`` and energy ``levels`` (percent)."""
        def get(name: str) -> Any:
            return row.get(f"{prefix}_{name}")

        return cls(rank=get("rank"), sigma_max=get("sigma_max"), frobenius=get("frobenius"),
                   condition=get("condition"),
                   rank_at={p: row[f"{prefix}_rank_e{p}"] for p in levels if f"{prefix}_rank_e{p}" in row},
                   energy={k: row[f"{prefix}_energy_k{k}"] for k in ks if f"{prefix}_energy_k{k}" in row},
                   rel_error={k: row[f"{prefix}_rel_error_k{k}"] for k in ks if f"{prefix}_rel_error_k{k}" in row})


@dataclass
class LatentErrors:
    """Errors of k-dim latents on the calibration tokens (fit = even positions, held out = odd ones), per k."""

    plain_heldout: dict[int, float]  # plain latent (P = V_k^T) measured on held-out tokens
    white_pred: dict[int, float]  # data-aware latent, predicted from the whitened spectrum of the fit tokens
    white_heldout: dict[int, float]  # data-aware latent measured on held-out tokens
    plain_pred: dict[int, float] | None = None  # plain latent on the fit tokens (per head only)

    def cells(self, prefix: str) -> dict[str, Any]:
        """Table cells, per k: ``[plain_pred], plain_heldout, white_pred, white_heldout`` (``prefix`` first)."""
        out: dict[str, Any] = {}
        for k in self.white_pred:
            if self.plain_pred is not None:
                out[f"{prefix}plain_pred_k{k}"] = self.plain_pred[k]
            out[f"{prefix}plain_heldout_k{k}"] = self.plain_heldout[k]
            out[f"{prefix}white_pred_k{k}"] = self.white_pred[k]
            out[f"{prefix}white_heldout_k{k}"] = self.white_heldout[k]
        return out

    @classmethod
    def from_cells(cls, row: dict[str, Any], prefix: str, ks: Sequence[int]) -> "LatentErrors | None":
        if f"{prefix}white_pred_k{ks[0]}" not in row:
            return None
        pick = lambda name: {k: row[f"{prefix}{name}_k{k}"] for k in ks}  # noqa: E731
        return cls(plain_heldout=pick("plain_heldout"), white_pred=pick("white_pred"),
                   white_heldout=pick("white_heldout"),
                   plain_pred=pick("plain_pred") if f"{prefix}plain_pred_k{ks[0]}" in row else None)


@dataclass
class HeadSpectrum:
    """One query head ``head`` of ``layer``, reading kv head ``kv_head``."""

    layer: int
    head: int
    kv_head: int
    ov: Spectrum  # W_O^h W_V^g: every field
    qk: Spectrum | None = None  # (W_Q^h)^T W_K^g, q/k norm gains folded, at relative position 0 (no rotary):
    #                             every field but the ranks at 50/95/99% energy
    latents: LatentErrors | None = None  # data-aware mode only


@dataclass
class GroupSpectrum:
    """Kv head ``kv_head`` of ``layer`` and the ``group_size`` query heads that share its cache."""

    layer: int
    kv_head: int
    group_size: int
    stack: Spectrum  # the stacked operator [W_O^h W_V^g]_h: rank, ranks at every level, E_k and rel_error
    v: Spectrum  # W_V^g itself: rank, sigma_max, rank at 90%
    latents: LatentErrors | None = None  # data-aware mode only (no plain_pred)
    qk_stack: Spectrum | None = None  # the stacked key operator [(W_Q^h)^T W_K^g]_h: as ``stack`` (with QK)
    qk_latents: LatentErrors | None = None  # its key latents, data-aware mode with QK only (no plain_pred)


@dataclass
class LayerResult:
    """Everything the sweep finds in one layer."""

    layer: int
    heads: list[HeadSpectrum]
    groups: list[GroupSpectrum]
    group_plain: torch.Tensor  # (G, r) singular values of the stacked kv-group operators
    group_white: torch.Tensor | None  # (G, r) whitened singular values on the fit tokens
    group_white_heldout: torch.Tensor | None = None  # (G, r) held-out error of the data-aware latent, k = 1..r
    key_plain: torch.Tensor | None = None  # (G, r) singular values of the stacked key operators (with QK)
    key_white: torch.Tensor | None = None  # (G, r) their whitened singular values on the fit tokens
    key_white_heldout: torch.Tensor | None = None  # (G, r) held-out error of the data-aware key latent, k = 1..r


OV_LEVELS = (50, 90, 95, 99)  # the energy levels (percent) of the ov and stack ranks
QK_LEVELS = V_LEVELS = (90,)


def head_row(h: HeadSpectrum) -> dict[str, Any]:
    """One ``sweep_heads`` row: layer, head, kv_head, the ov cells, qk_sigma_max, qk_rank_e90, qk_rank, the latent
    cells, then the other qk cells (qk_frobenius, qk_condition, qk_energy_k<k>, qk_rel_error_k<k>)."""
    row: dict[str, Any] = {"layer": h.layer, "head": h.head, "kv_head": h.kv_head, **h.ov.cells("ov")}
    q = h.qk
    if q is not None:
        row["qk_sigma_max"] = q.sigma_max
        row["qk_rank_e90"] = q.rank_at[90]
        if q.rank is not None:
            row["qk_rank"] = q.rank
    if h.latents is not None:
        row.update(h.latents.cells(""))
    if q is not None:  # appended: the columns before them keep their places
        row.update(Spectrum(frobenius=q.frobenius, condition=q.condition, energy=q.energy,
                            rel_error=q.rel_error).cells("qk"))
    return row


def group_row(g: GroupSpectrum) -> dict[str, Any]:
    """One ``sweep_groups`` row: layer, kv_head, group_size, the stack cells, the v cells, the latent cells, then
    the stacked key operator's cells (``qk_stack_*``) and its latent cells."""
    row: dict[str, Any] = {"layer": g.layer, "kv_head": g.kv_head, "group_size": g.group_size,
                           **g.stack.cells("stack"), **g.v.cells("v")}
    if g.latents is not None:
        row.update(g.latents.cells("stack_"))
    if g.qk_stack is not None:
        row.update(g.qk_stack.cells("qk_stack"))
    if g.qk_latents is not None:
        row.update(g.qk_latents.cells("qk_stack_"))
    return row


def head_from_row(row: dict[str, Any], ks: Sequence[int]) -> HeadSpectrum:
    """Inverse of :func:`head_row` for a row written with latent sizes ``ks``."""
    qk = Spectrum.from_cells(row, "qk", ks, QK_LEVELS) if "qk_sigma_max" in row else None
    return HeadSpectrum(layer=row["layer"], head=row["head"], kv_head=row["kv_head"],
                        ov=Spectrum.from_cells(row, "ov", ks, OV_LEVELS), qk=qk,
                        latents=LatentErrors.from_cells(row, "", ks))


def group_from_row(row: dict[str, Any], ks: Sequence[int]) -> GroupSpectrum:
    """Inverse of :func:`group_row` for a row written with latent sizes ``ks``."""
    qk = "qk_stack_rank" in row
    return GroupSpectrum(layer=row["layer"], kv_head=row["kv_head"], group_size=row["group_size"],
                         stack=Spectrum.from_cells(row, "stack", ks, OV_LEVELS),
                         v=Spectrum.from_cells(row, "v", (), V_LEVELS),
                         latents=LatentErrors.from_cells(row, "stack_", ks),
                         qk_stack=Spectrum.from_cells(row, "qk_stack", ks, OV_LEVELS) if qk else None,
                         qk_latents=LatentErrors.from_cells(row, "qk_stack_", ks) if qk else None)


def to_rows(layers: Sequence[LayerResult]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(head rows, group rows) of every layer, in layer order: what ``sweep_heads`` / ``sweep_groups`` hold."""
    return ([head_row(h) for r in layers for h in r.heads], [group_row(g) for r in layers for g in r.groups])


# ----------------------------------------------------------------------------------------- aggregates


@dataclass
class Stat:
    """Mean, min and max of some values (None when there are none)."""

    mean: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        vals = list(values)
        if not vals:
            return cls(None, None, None)
        return cls(sum(vals) / len(vals), min(vals), max(vals))


@dataclass
class LayerAggregate:
    """One layer's heads and kv groups summarised."""

    layer: int
    heads: int  # query heads
    rank_e90: Stat  # OV rank at 90% energy over the heads
    rel_error: dict[int, Stat]  # k -> OV rel_error over the heads
    white_heldout: dict[int, float]  # k -> mean held-out error of the heads' data-aware latents (data-aware only)
    kv_groups: int
    stack_rank_e90: Stat  # stacked-operator rank at 90% energy over the kv groups
    qk_rank_e90: Stat = field(default_factory=lambda: Stat(None, None, None))  # QK rank at 90% over the heads
    qk_rel_error: dict[int, Stat] = field(default_factory=dict)  # k -> QK rel_error over the heads (with QK)
    qk_stack_rank_e90: Stat = field(default_factory=lambda: Stat(None, None, None))  # stacked key operator, groups


def layer_aggregates(layers: Sequence[LayerResult], ks: Sequence[int]) -> list[LayerAggregate]:
    """One :class:`LayerAggregate` per layer, in the given order, for latent sizes ``ks``."""
    out = []
    for r in layers:
        held = {}
        if r.heads and all(h.latents is not None for h in r.heads):
            held = {k: Stat.of([h.latents.white_heldout[k] for h in r.heads]).mean for k in ks}  # type: ignore[union-attr]
        qk = [h.qk for h in r.heads if h.qk is not None]
        qk_stack = [g.qk_stack for g in r.groups if g.qk_stack is not None]
        out.append(LayerAggregate(
            layer=r.layer, heads=len(r.heads), rank_e90=Stat.of([h.ov.rank_at[90] for h in r.heads]),
            rel_error={k: Stat.of([h.ov.rel_error[k] for h in r.heads]) for k in ks}, white_heldout=held,
            kv_groups=len(r.groups), stack_rank_e90=Stat.of([g.stack.rank_at[90] for g in r.groups]),
            qk_rank_e90=Stat.of([q.rank_at[90] for q in qk]),
            qk_rel_error={k: Stat.of([q.rel_error[k] for q in qk if k in q.rel_error]) for k in ks} if qk else {},
            qk_stack_rank_e90=Stat.of([q.rank_at[90] for q in qk_stack])))
    return out
