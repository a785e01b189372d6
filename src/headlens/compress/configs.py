"""The configurations ``headlens compress`` measures: per budget value and latent kind the budgeted allocation and
its uniform twin of equal bytes (:func:`configurations`), with key latents the keys alone and keys with values
(:func:`key_configurations`), and the notes a run makes about them (``k = 0`` groups, which key latent form each
layer keeps).
``cfg`` is the run's :class:`~headlens.compress.run.CompressConfig` (read here, never built).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from headlens.compress.allocate import Ks, same_ks, target_ks, uniform_ks
from headlens.compress.plan import LayerPlan
from headlens.errors import HeadlensError

DEFAULT_TARGET_ERRORS = (0.1, 0.2, 0.4)


@dataclass
class Configuration:
    """One measured configuration: a latent kind and an allocation of latent sizes."""

    name: str  # e.g. "data-aware error<=0.1", "uniform (same bytes as plain error<=0.1)"
    budget: str  # target-error, target-energy, k, file
    target: Any  # the target value, the uniform k, or the budget file's name
    latent: str | None  # plain or data-aware (None: keys alone, no value latent)
    allocation: str  # "budget" (the target's sizes) or "uniform"
    ks: Ks
    matches: str | None = None  # for a uniform allocation: the name of the budget it has the bytes of
    key_ks: Ks | None = None  # key latent sizes (None: keys kept whole)
    key_latent: str | None = None  # plain or data-aware key latents
    part: str = "values"  # what is compressed: values, keys or both

    @property
    def latent_dims(self) -> int:
        """Value latent numbers per token over every compressed layer."""
        return sum(sum(v) for v in self.ks.values())

    @property
    def key_dims(self) -> int:
        """Key latent numbers per token over every layer with key latents."""
        return sum(sum(v) for v in (self.key_ks or {}).values())


def _label(budget: str, value: Any) -> str:
    return {"target-error": f"error<={value:g}" if isinstance(value, float) else "",
            "target-energy": f"energy>={value:g}" if isinstance(value, float) else "",
            "k": f"k={value}", "file": f"budget {value}",
            "saving": f"saving {100 * value:g}%" if isinstance(value, float) else "",
            "kv-budget": f"{value:g} B/token" if isinstance(value, float) else ""}[budget]


def byte_totals(cfg, full: dict[str, dict[int, LayerPlan]], key_full: dict, ck, layers: list[int],
                position_bytes: float) -> dict[str, list[tuple[float, int]]]:
    """Per latent kind, each budget value and the latent numbers per token it leaves (:func:`byte_configurations`):
    checked before anything is measured (one HeadlensError naming the parameter)."""
    from headlens.compress.allocation import LEAST, numbers_for, slots_of

    s = ck.shape
    kind = cfg.budget_kind()
    keys = bool(key_full)
    rotary = sum(1 for p in key_full.values() if p.rotary)
    before = 2.0 * s.num_layers * s.num_kv_heads * s.head_dim * cfg.kv_bytes
    values = (list(cfg.savings) if kind == "saving" else [float(cfg.kv_budget)] if kind == "kv-budget" else
              list(cfg.target_energies if kind == "target-energy" else cfg.target_errors or DEFAULT_TARGET_ERRORS))
    out: dict[str, list[tuple[float, int]]] = {}
    for latent in cfg.latents:
        least = sum(LEAST.get(x.part, 0) for x in slots_of(full[latent], key_full if keys else None))
        for v in values:
            if kind in ("target-error", "target-energy"):  # the bytes of the target's own sizes
                total = _target_numbers(kind, v, full[latent], key_full if keys else {})
            else:
                budget = (1.0 - v) * before if kind == "saving" else v
                name = f"`savings` {v:g}" if kind == "saving" else f"`kv_budget` {v:g}"
                try:
                    total = numbers_for(budget, ck, layers, cfg.kv_bytes, keys, rotary, position_bytes)
                except HeadlensError as exc:
                    hint = "" if keys else " (values alone save at most 50%: add `keys`)"
                    raise HeadlensError(f"{name}: {exc}{hint}") from None
                if total < least:
                    raise HeadlensError(f"{name} leaves {total} latent numbers per token, fewer than one for each of "
                                        f"the {least} key latents: a smaller saving")
            out.setdefault(latent, []).append((v, total))
    return out


def allocated_configurations(cfg, model, ck, tok, full: dict, key_full: dict, layers: list[int], calib_texts,
                             position_bytes: float, seconds: dict, disable: bool | None) -> list[Configuration]:
    """A budget of bytes spent by ``cfg.allocation()`` (:func:`byte_configurations`): every budget checked first
    (:func:`byte_totals`), then what the greedy allocation needs (each layer's sensitivity, measured on the
    calibration texts, at half size and again where the first allocation cut) or the Fisher allocation (the Fisher
    scores); ``seconds["allocation"]`` their time."""
    import time

    from headlens.compress.allocation import fisher_scores, probe_sensitivities

    totals = byte_totals(cfg, full, key_full, ck, layers, position_bytes)
    method = cfg.allocation()
    sens, fisher = None, None
    t = time.perf_counter()

    def probe(latent: str, at=None) -> dict:
        return probe_sensitivities(model, ck, tok, calib_texts, full[latent], key_full or None, cfg.kv_bytes,
                                   cfg.truncate, disable, at=at)

    if method == "greedy":
        sens = {latent: probe(latent) for latent in cfg.latents}
    elif method == "fisher":
        fisher = fisher_scores(model, ck, tok, calib_texts, layers, ("values", "keys") if key_full else ("values",),
                               cfg.max_calib_tokens)
    confs = byte_configurations(cfg, full, key_full, ck, totals, sens, fisher,
                                refine=probe if method == "greedy" else None)
    if method in ("greedy", "fisher"):
        seconds["allocation"] = time.perf_counter() - t  # the probes, both rounds, or the Fisher scores
    return confs


def byte_configurations(cfg, full: dict[str, dict[int, LayerPlan]], key_full: dict, ck,
                        totals: dict[str, list[tuple[float, int]]], sensitivity: dict | None = None,
                        fisher: dict | None = None, refine=None) -> list[Configuration]:
    """A budget of bytes (``savings`` of the whole KV cache, ``kv_budget`` bytes per token, or with ``allocate`` the
    bytes of each target's own sizes, keys included) spent by
    ``cfg.allocation()`` (:func:`~headlens.compress.allocation.allocate`) over every value latent and, with key
    latents, every key latent (keys and values compete for the same bytes); and the uniform allocation of the same
    bytes beside each other allocation. ``totals``: :func:`byte_totals`'s. ``sensitivity``: per latent kind the
    greedy allocation's lambdas;
    ``refine(latent, sizes)``: its lambdas measured at an allocation's sizes (:func:`refined_greedy`)."""
    from headlens.compress.allocation import allocate, refined_greedy, slots_of, split

    s = ck.shape
    kind = cfg.budget_kind()
    method = cfg.allocation()
    keys = bool(key_full)
    out: list[Configuration] = []
    for latent, budgets in totals.items():
        slots = slots_of(full[latent], key_full if keys else None)
        for v, total in budgets:
            label = _label(kind, v)
            todo = [method] + (["uniform"] if method != "uniform" else [])
            name = f"{latent} {method} {label}"
            for how in todo:
                if how == "greedy":
                    sizes = refined_greedy(slots, total, s.head_dim, (sensitivity or {})[latent],
                                           (lambda at, latent=latent: refine(latent, at)) if refine else None)
                else:
                    sizes = allocate(how, slots, total, s.head_dim, None, fisher)
                vk, kk = split(sizes)
                out.append(Configuration(name if how == method else f"uniform {latent} (bytes of {label})", kind, v,
                                         latent, how, vk, matches=None if how == method else name,
                                         key_ks=kk or None, key_latent=cfg.keys if keys else None,
                                         part="both" if keys else "values"))
    return out


def _target_numbers(kind: str, value: float, values_full: dict, key_full: dict) -> int:
    """The latent numbers per token of a target's own sizes: value latents, and key latents where there are some."""
    from headlens.circuits.budget import BudgetTarget

    t = BudgetTarget("energy" if kind == "target-energy" else "error", float(value))
    vals = sum(sum(v) for v in target_ks(values_full, t).values())
    return vals + sum(max(t.k_for(g.spectrum), 1) for p in key_full.values() for g in p.groups)


def configurations(cfg, full: dict[str, dict[int, LayerPlan]], ck, budget_ks: dict[str, Ks] | None,
                   budget_name: str | None = None) -> list[Configuration]:
    """Every configuration ``cfg`` asks for, from the full-size plans of each kind (``full[kind]``); budget files
    come in as ``budget_ks`` (kind -> sizes)."""
    from headlens.circuits.budget import BudgetTarget

    s = ck.shape
    layers = sorted(next(iter(full.values())))
    kind = cfg.budget_kind()
    out: list[Configuration] = []
    for latent in cfg.latents:
        if kind == "k":
            for k in cfg.ks:  # type: ignore[union-attr]
                if k > s.head_dim:
                    raise HeadlensError(f"`ks` {k} is above head_dim {s.head_dim}: a kv group's latent holds "
                                        f"0..{s.head_dim} numbers")
                out.append(Configuration(f"{latent} {_label('k', k)}", "k", k, latent, "uniform",
                                         same_ks(layers, s.num_kv_heads, k)))
            continue
        if kind == "file":
            values: list[Any] = [budget_name]
        else:
            values = list(cfg.target_energies if kind == "target-energy" else cfg.target_errors
                          or DEFAULT_TARGET_ERRORS)
        for v in values:
            if kind == "file":
                ks = budget_ks[latent]  # type: ignore[index]
                missing = [layer for layer in layers if layer not in ks]
                if missing or set(ks) - set(layers):
                    raise HeadlensError(f"`budget` covers layers {sorted(ks)}, but this run compresses {layers}: "
                                        f"pass `layers` {','.join(map(str, sorted(ks)))} to match the sweep")
            else:
                ks = target_ks(full[latent], BudgetTarget("energy" if kind == "target-energy" else "error", float(v)))
            name = f"{latent} {_label(kind, v)}"
            out.append(Configuration(name, kind, v, latent, "budget", ks))
            out.append(Configuration(f"uniform {latent} (bytes of {_label(kind, v)})", kind, v, latent, "uniform",
                                     uniform_ks(ks, s.head_dim), matches=name))
    return out


def key_configurations(cfg, confs: list[Configuration], key_full: dict, ck,
                       budget_key_ks: Ks | None = None, notes: list[str] | None = None) -> list[Configuration]:
    """With key latents (``cfg.keys``): per budget configuration of ``confs`` the keys alone (``keys <kind>
    <label>``, once per budget value) and keys with values (``<name> + keys``), and per uniform one the same bytes
    spread uniformly over keys and values. Key sizes: ``cfg.key_ks`` (one for every budget value, or one each), else
    the same budget as the values (``k`` the same size; a target cut from the key spectra; a budget file's key
    columns). A size of 0 for some key latent gives no keys configuration (a note in ``notes`` says so)."""
    from headlens.circuits.budget import BudgetTarget

    notes = notes if notes is not None else []
    s = ck.shape
    layers = sorted(key_full)
    kind = cfg.budget_kind()
    values = ([cfg.budget] if kind == "file" else list(cfg.ks or cfg.target_energies or cfg.target_errors
                                                        or DEFAULT_TARGET_ERRORS))  # type: ignore[arg-type]
    given = list(cfg.key_ks or [])  # type: ignore[arg-type]
    if given and len(given) not in (1, len(values)):
        raise HeadlensError(f"`key_ks` gives {len(given)} sizes for {len(values)} budget values: give one, or one "
                            "per budget value")
    for k in given:
        if k > s.head_dim:
            raise HeadlensError(f"`key_ks` {k} is above head_dim {s.head_dim}")

    def sizes(target) -> Ks:
        if given:
            return same_ks(layers, s.num_kv_heads, given[0] if len(given) == 1 else given[values.index(target)])
        if kind == "k":
            return same_ks(layers, s.num_kv_heads, int(target))
        if kind == "file":
            if budget_key_ks is None:
                raise HeadlensError("`budget` has no key sizes (key_k_plain / key_k_data columns): pass `key_ks`, or "
                                    "sweep again with a headlens that writes them")
            return budget_key_ks
        t = BudgetTarget("energy" if kind == "target-energy" else "error", float(target))
        return {layer: [t.k_for(g.spectrum) for g in key_full[layer].groups] for layer in layers}

    out: list[Configuration] = []
    names: set[str] = set()
    by_name = {c.name: c for c in confs}
    for c in confs:
        label = _label(kind, c.target)
        kk = sizes(c.target)
        if any(k == 0 for v in kk.values() for k in v):
            note = (f"{label}: a key latent of 0 numbers stores no key (every logit the same): no keys "
                    "configuration at this size")
            if note not in notes:
                notes.append(note)
            continue
        if c.allocation == "budget" or c.budget == "k":
            alone = f"keys {cfg.keys} {label}"
            if alone not in names:
                names.add(alone)
                out.append(Configuration(alone, c.budget, c.target, None, c.allocation, {}, key_ks=kk,
                                         key_latent=cfg.keys, part="keys"))  # no value latent
            out.append(dataclasses.replace(c, name=f"{c.name} + keys {cfg.keys}", key_ks=kk, key_latent=cfg.keys,
                                           part="both"))
        else:
            budget = by_name.get(c.matches or "")
            kb = sizes(budget.target) if budget is not None else kk
            out.append(dataclasses.replace(c, name=f"{c.name} + uniform keys", key_ks=uniform_ks(kb, s.head_dim),
                                           key_latent=cfg.keys, part="both",
                                           matches=f"{c.matches} + keys {cfg.keys}" if c.matches else None))
    return out


def frequency_notes(confs: list[Configuration], measured: list) -> list[str]:
    """Per configuration with key latents (keys alone), which key latent form each layer keeps, chosen by the
    predicted error at equal numbers per token (the per-group latent, or TransMLA's per-frequency projection across
    kv heads), and how the measured isolated logit errors compare, layer by layer."""
    out = []
    for c, m in zip(confs, measured):
        rows = [e for e in m.key_layers if e.key_logit_error is not None and e.key_frequency_logit_error is not None]
        if not rows or c.part == "both":
            continue
        across = [e.layer for e in rows if e.key_form == "across"]
        wins = [e.layer for e in rows if e.key_frequency_logit_error < e.key_logit_error]
        kept = (f"the cache keeps the cross-head key latent (TransMLA, predicted to lose less at equal numbers per "
                f"token) in layers {_layers(across)} and the per-group latent in the other {len(rows) - len(across)}"
                if across else f"the cache keeps the per-group key latent in all {len(rows)} layers with a "
                "cross-head alternative (TransMLA's predicted error was not lower in any)")
        agree = sum((e.layer in wins) == (e.key_form == "across") for e in rows)
        seen = (f"measured, the cross-head latent lost less in layers {_layers(wins)}" if wins else
                "measured, the cross-head latent lost more in every layer")
        out.append(f"{c.name}: {kept}; {seen} (the choice matches the measurement in {agree} of {len(rows)})")
    return out


def _layers(layers: list[int]) -> str:
    return ", ".join(map(str, layers))


def zero_notes(confs: list[Configuration]) -> list[str]:
    """One note per configuration that gives some kv groups a latent of 0: their values are removed."""
    out = []
    for c in confs:
        sizes = [k for v in c.ks.values() for k in v]
        zeros = sum(k == 0 for k in sizes)
        if zeros:
            which = "every kv group" if zeros == len(sizes) else f"{zeros} of {len(sizes)} kv groups"
            out.append(f"{c.name}: k = 0 for {which}: their values are removed (the attention of those groups "
                       "writes only the value bias)")
    return out


def budget_keys(cfg, ck, digest: str) -> Ks | None:
    """The key sizes of a budget file (its key_k_plain / key_k_data column for ``cfg.keys``), None without one."""
    if not cfg.budget or cfg.keys == "none":
        return None
    from headlens.io.tables import read_table

    col = {"plain": "key_k_plain", "data-aware": "key_k_data"}[cfg.keys]
    rows = read_table(cfg.budget)
    if not rows or col not in rows[0] or any(r.get(col) is None for r in rows):
        return None
    out: dict[int, dict[int, int]] = {}
    for r in rows:
        out.setdefault(int(r["layer"]), {})[int(r["kv_head"])] = int(r[col])
    return {layer: [per[g] for g in sorted(per)] for layer, per in sorted(out.items())}
