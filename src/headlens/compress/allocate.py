"""How big each kv group's latent is: from a target (as ``headlens sweep`` budgets it), one size for every group,
or a ``sweep_budget.csv``; and the uniform allocation of the same total KV bytes every budget is compared with.

Latent sizes are ``{layer: [k_g per kv group]}``. The spectra come from the full-size plans (:func:`full_plans`,
k = head_dim): a target picks, per group, the smallest k whose predicted error meets it
(:meth:`headlens.circuits.budget.BudgetTarget.k_for`, the sweep's own rule, on ``sigma(M_g)`` for plain latents and
``sigma(M_g S)`` for data-aware ones), and :func:`cut` keeps the first k directions of the full plan (the top-k
right singular vectors are a prefix of the full set, for both kinds), so no SVD is repeated per budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from headlens.circuits.budget import BudgetTarget, uniform_split
from headlens.compress.plan import GroupLatent, LayerPlan, plan_layers
from headlens.errors import HeadlensError

Ks = dict[int, list[int]]
BUDGET_COLUMNS = {"plain": "k_plain", "data-aware": "k_data"}


def full_plans(ck, layers: list[int], kind: str, calibration: Mapping[int, torch.Tensor] | None = None,
               load_dtype: torch.dtype = torch.float32) -> dict[int, LayerPlan]:
    """Every layer's plan at k = head_dim (nothing dropped): the spectra the budgets are cut from."""
    hd = ck.shape.head_dim
    plans = plan_layers(ck, {layer: hd for layer in layers}, kind, dict(calibration) if calibration else None,
                        load_dtype=load_dtype)
    return {p.layer: p for p in plans}


def cut(plan: LayerPlan, ks: list[int]) -> LayerPlan:
    """The plan of the same layer and kind with latent sizes ``ks`` (one per kv group), taken from the full-size
    ``plan``: the first k rows of ``P_g`` and columns of ``B_g`` and ``U_g``, and the tail of the same spectrum
    (equal to :func:`~headlens.compress.plan.plan_layer` at those sizes, without its ``calib_error``)."""
    if len(ks) != len(plan.groups):
        raise HeadlensError(f"layer {plan.layer}: {len(ks)} latent sizes for {len(plan.groups)} kv groups")
    groups = []
    for g, k in zip(plan.groups, ks):
        if not 0 <= k <= g.down.shape[0]:
            raise HeadlensError(f"layer {plan.layer}, kv group {g.kv_head}: latent size {k} is outside "
                                f"0..{g.down.shape[0]}")
        groups.append(GroupLatent(layer=g.layer, kv_head=g.kv_head, kind=g.kind, k=k, down=g.down[:k].contiguous(),
                                  up=g.up[:, :k].contiguous(), basis=g.basis[:, :k].contiguous(), R=g.R,
                                  spectrum=g.spectrum, tail=float(torch.linalg.norm(g.spectrum[k:])),
                                  scale=g.scale, calib_error=None, ridge=g.ridge))
    return LayerPlan(layer=plan.layer, kind=plan.kind, num_heads=plan.num_heads, groups=groups)


def cut_all(full: Mapping[int, LayerPlan], ks: Ks) -> dict[int, LayerPlan]:
    """:func:`cut` for every layer of ``ks``."""
    return {layer: cut(full[layer], ks[layer]) for layer in sorted(ks)}


def target_ks(full: Mapping[int, LayerPlan], target: BudgetTarget) -> Ks:
    """Per layer and kv group the smallest latent meeting ``target`` (relative error <= E, or energy >= F) on the
    spectrum the plan was cut from: the sweep's budget for the same target and kind."""
    return {layer: [target.k_for(g.spectrum) for g in full[layer].groups] for layer in sorted(full)}


def uniform_ks(ks: Ks, head_dim: int) -> Ks:
    """The uniform allocation with the same total latent dims (hence the same KV bytes) as ``ks``: the total
    spread over every (layer, kv group) in layer order as evenly as integers allow (the sweep's uniform split)."""
    layers = sorted(ks)
    sizes = [len(ks[layer]) for layer in layers]
    flat = uniform_split(sum(sum(ks[layer]) for layer in layers), sum(sizes), head_dim)
    out, i = {}, 0
    for layer, n in zip(layers, sizes):
        out[layer], i = flat[i:i + n], i + n
    return out


def same_ks(layers: list[int], num_kv_heads: int, k: int) -> Ks:
    """One latent size ``k`` for every kv group of ``layers``."""
    return {layer: [k] * num_kv_heads for layer in layers}


def read_budget(path: str | Path, ck, weights: str, kinds: tuple[str, ...]) -> dict[str, Ks]:
    """The latent sizes of a ``sweep_budget.csv`` (``headlens sweep``), per latent kind among ``kinds``
    (``k_plain`` for plain, ``k_data`` for data-aware).

    Refused, one line each naming the parameter ``budget``: a file that is not a sweep budget (another suffix,
    binary or not UTF-8, other columns), one made for other weights (its ``model_weights`` column, the
    :func:`~headlens.circuits.sweep_parts.weights_digest` of the model it was swept on, differs from ``weights``)
    or without that column, a (layer, kv group) listed twice, a layer outside the model, a layer whose kv groups
    are not exactly 0..G-1, a latent size outside 0..head_dim, and a data-aware request on a weight-only budget.
    A latent size of 0 is allowed: that group's values are removed (the run notes it)."""
    from headlens.io.tables import read_table

    path = Path(path)
    where = f"`budget` {path}"
    if path.suffix.lower() != ".csv":
        raise HeadlensError(f"{where}: expected the sweep_budget.csv that `headlens sweep` writes")
    if not path.is_file():
        raise HeadlensError(f"{where} does not exist")
    try:
        rows = read_table(path)
    except HeadlensError as exc:
        detail = str(exc).replace(f"{path} is not a CSV table: ", "").replace(str(path), "it")
        raise HeadlensError(f"{where} is not a sweep budget: {detail}") from None
    need = {"layer", "kv_head", "k_plain"}
    if not rows or not need <= set(rows[0]):
        raise HeadlensError(f"{where} is not a sweep budget: it needs the columns layer, kv_head, k_plain "
                            "(the sweep_budget.csv of `headlens sweep`)")
    digests = {r.get("model_weights") for r in rows}
    if digests == {None}:
        raise HeadlensError(f"{where} does not say which model it belongs to (no model_weights column): "
                            "re-run `headlens sweep` on this model to make it")
    if digests != {weights}:
        other = ", ".join(sorted(str(d) for d in digests))
        raise HeadlensError(f"{where} belongs to another model (weights {other}, this model's are "
                            f"{weights}): run `headlens sweep` on this model")
    s = ck.shape
    seen: dict[tuple, int] = {}
    for n, r in enumerate(rows, start=2):  # line numbers: the header is line 1
        key = (r["layer"], r["kv_head"])
        if key in seen:
            raise HeadlensError(f"{where} lists layer {key[0]} kv group {key[1]} twice (lines {seen[key]} and {n}): "
                                "one row per (layer, kv group)")
        seen[key] = n
    out: dict[str, Ks] = {}
    for kind in kinds:
        col = BUDGET_COLUMNS[kind]
        if any(r.get(col) is None for r in rows):
            raise HeadlensError(f"{where} has no {col} for every kv group (a weight-only sweep has no "
                                f"data-aware budget): pass `latents` plain, or sweep with calibration texts")
        ks: dict[int, dict[int, int]] = {}
        for r in rows:
            layer, g, k = r["layer"], r["kv_head"], r[col]
            if not all(type(v) is int for v in (layer, g, k)):
                raise HeadlensError(f"{where}: layer, kv_head and {col} must be integers")
            if not 0 <= layer < s.num_layers:
                raise HeadlensError(f"{where} has layer {layer}, but the model has {s.num_layers} layers "
                                    f"(0..{s.num_layers - 1}): it belongs to another model")
            if not 0 <= k <= s.head_dim:
                raise HeadlensError(f"{where}: layer {layer} kv group {g} has {col} {k}, outside "
                                    f"0..{s.head_dim} (head_dim)")
            ks.setdefault(layer, {})[g] = k
        for layer, per in ks.items():
            if sorted(per) != list(range(s.num_kv_heads)):
                raise HeadlensError(f"{where}: layer {layer} lists kv groups {sorted(per)}, the model has "
                                    f"{s.num_kv_heads} (0..{s.num_kv_heads - 1}): it belongs to another model")
        out[kind] = {layer: [per[g] for g in range(s.num_kv_heads)] for layer, per in sorted(ks.items())}
    return out
