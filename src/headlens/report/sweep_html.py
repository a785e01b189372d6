"""The sweep's self-contained page: run summary, budget, figures (inlined), per-layer table, full tables.

No external resource and no script: the page works offline and from an e-mail attachment. All text is escaped
with ``html.escape``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from headlens.circuits.budget import Budget, LayerLatents
from headlens.circuits.sweep_results import LayerAggregate, LayerResult, Stat, layer_aggregates, to_rows
from headlens.errors import HeadlensError
from headlens.io.files import atomic_path
from headlens.io.tables import columns
from headlens.report.page import CSS, image_tag, model_name
from headlens.report.page import escape as _e
from headlens.report.sweep_common import (BUDGET_PNG, ERROR_PNG, HELDOUT_PNG, QK_RANK_PNG, RANK_PNG, fmt, fmt_bytes,
                                          fmt_err, fmt_pct, uniform_label)


_CAPTIONS = {
    RANK_PNG: "Rank of W_OV at 90% energy for every layer and query head.",
    QK_RANK_PNG: "Rank of the QK form W_Q^T W_K at 90% energy for every layer and query head (relative position 0: "
                 "no rotary; q/k norm gains folded in).",
    ERROR_PNG: "Relative error sqrt(1 - E_k) of the rank-k W_OV for each latent size k.",
    HELDOUT_PNG: "Data-aware (whitened) latent: error measured on held-out tokens for each k.",
    BUDGET_PNG: "Latent size per layer and KV cache bytes per token under each allocation.",
}

def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


def _summary_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return _e(", ".join(fmt(v) if not isinstance(v, str) else v for v in value))
        if value and all(isinstance(v, dict) for v in value):  # e.g. a per-layer list: a collapsed table
            return (f"<details><summary>{len(value)} rows</summary>"
                    + _table(columns(value), list(value)) + "</details>")
        return _e(repr(value))
    return _e(value if isinstance(value, str) else fmt(value))


def _header(summary: dict) -> str:
    """Title, the run summary as a key/value table, and the notes.

    Entries at most one dict deep (``model.name``, ``config.ks``) are shown; deeper ones and lists of dicts
    (per-layer tables the page shows elsewhere) go into a collapsed "full run summary".
    """
    name = model_name(summary)
    parts = [f"<h1>headlens sweep: {_e(name)}</h1>"]
    notes = summary.get("notes")
    items = _flatten({k: v for k, v in summary.items() if k != "notes"})

    def bulky(key: str, value: Any) -> bool:
        return key.count(".") > 1 or (isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value))

    shown = [(k, v) for k, v in items if not bulky(k, v)]
    more = [(k, v) for k, v in items if bulky(k, v)]

    def kv_table(pairs: list[tuple[str, Any]]) -> str:
        rows = "".join(f'<tr><th class="l">{_e(k)}</th><td>{_summary_value(v)}</td></tr>' for k, v in pairs)
        return f'<table class="kv"><tbody>{rows}</tbody></table>'

    if shown:
        parts.append(kv_table(shown))
    if notes:
        notes = [notes] if isinstance(notes, str) else list(notes)
        parts.append('<ul class="note">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    if more:
        parts.append(f"<details><summary>full run summary ({len(more)} more entries)</summary>"
                     + kv_table(more) + "</details>")
    return "\n".join(parts)


def _strategies(budget: Budget) -> list[tuple[str, Any, Any, Any, Any, Any]]:
    """(label, latent dims, KV bytes after, saving %, mean error, max error) of each allocation."""
    t = budget.totals
    out = [("plain latent (SVD of the stacked W_OV)", t.latent_dims_plain, t.kv_bytes_after_plain,
            t.saving_plain_pct, t.mean_err_plain, t.max_err_plain)]
    if budget.data_aware or any(r.k_data is not None for r in budget.rows):
        out.append(("data-aware latent (whitened)", t.latent_dims_data, t.kv_bytes_after_data, t.saving_data_pct,
                    t.mean_err_data, t.max_err_data))
    after_u = sum(p.kv_bytes_after_uniform for p in budget.per_layer) if budget.per_layer else None
    saving_u = None if after_u is None or not t.kv_bytes_before else 100.0 * (1.0 - float(after_u) /
                                                                               float(t.kv_bytes_before))
    out.append((f"uniform, {uniform_label(t.uniform_k)} per kv group", sum(r.k_uniform for r in budget.rows)
                if budget.rows else None, after_u, saving_u, t.mean_err_uniform, t.max_err_uniform))
    if t.key_latent_dims_plain is not None:  # dims and errors are the keys'; bytes with both latents
        out.append(("key latent, plain (SVD of the stacked W_Q^T W_K); bytes with plain value latents too",
                    t.key_latent_dims_plain, t.kv_bytes_after_plain_with_keys, t.saving_plain_with_keys_pct,
                    t.mean_err_key_plain, t.max_err_key_plain))
    if t.key_latent_dims_data is not None:
        out.append(("key latent, data-aware (whitened on the key side); bytes with data-aware value latents too",
                    t.key_latent_dims_data, t.kv_bytes_after_data_with_keys, t.saving_data_with_keys_pct,
                    t.mean_err_key_data, t.max_err_key_data))
    return out


def _budget_notes(budget: Budget) -> list[str]:
    t = budget.totals
    out = []
    if t.mean_err_uniform_data is not None or any(r.err_uniform_data is not None for r in budget.rows):
        out.append(f"<p class=\"note\">uniform k with the data-aware latent: mean error "
                   f"{_e(fmt_err(t.mean_err_uniform_data))}, max {_e(fmt_err(t.max_err_uniform_data))} "
                   "(predicted on the fit tokens).</p>")
    if t.mean_err_data_heldout is not None:
        out.append(f"<p class=\"note\">data-aware errors above are predicted from the whitened spectrum of the fit "
                   f"tokens; measured on held-out tokens: budgeted mean {_e(fmt_err(t.mean_err_data_heldout))}, max "
                   f"{_e(fmt_err(t.max_err_data_heldout))}; uniform k mean "
                   f"{_e(fmt_err(t.mean_err_uniform_data_heldout))}, max "
                   f"{_e(fmt_err(t.max_err_uniform_data_heldout))}.</p>")
    if t.key_latent_dims_plain is not None:
        out.append("<p class=\"note\">Key latents: the error is the relative logit error of the stacked key operator "
                   "[(W_Q^h)^T W_K^g]_h at relative position 0 (no rotary) for isotropic query inputs; under rotary a key "
                   "latent is not directly a cache, so the value-only rows are the budget; the key rows show what "
                   "the keys would add.</p>")
    if t.mean_err_key_data_heldout is not None:
        out.append(f"<p class=\"note\">data-aware key latents measured on held-out tokens: mean "
                   f"{_e(fmt_err(t.mean_err_key_data_heldout))}, max {_e(fmt_err(t.max_err_key_data_heldout))}.</p>")
    return out


def _budget_section(budget: Budget | None) -> str:
    if budget is None:
        return "<h2>Latent budget</h2><p class=\"note\">No budget was computed.</p>"
    t = budget.totals
    meta = [f"target: <b>{_e(budget.target.label())}</b> per kv group",
            f"{_e(fmt(budget.bytes_per_value))} bytes per cached value",
            f"KV cache before: <b>{_e(fmt_bytes(t.kv_bytes_before))}</b> bytes per token (all layers)"]
    out = ["<h2>Latent budget</h2>", "<p>" + " \u00b7 ".join(meta) + "</p>",
           "<table><thead><tr><th class=\"l\">allocation</th><th>latent dims (sum)</th>"
           "<th>KV bytes/token after</th><th>saving</th><th>mean error</th><th>max error</th>"
           "</tr></thead><tbody>"]
    for label, dims, after, saving, mean, mx in _strategies(budget):
        out.append(f"<tr><td class=\"l\">{_e(label)}</td><td>{_e(fmt(dims))}</td>"
                   f"<td>{_e(fmt_bytes(after))}</td><td>{_e(fmt_pct(saving))}</td>"
                   f"<td>{_e(fmt_err(mean))}</td><td>{_e(fmt_err(mx))}</td></tr>")
    out.append("</tbody></table>")
    out.extend(_budget_notes(budget))
    out.append("<details><summary>all totals</summary><table class=\"kv\"><tbody>")
    for k, v in budget.to_json()["totals"].items():
        out.append(f"<tr><th class=\"l\">{_e(k)}</th><td>{_e(fmt(v))}</td></tr>")
    out.append("</tbody></table></details>")
    return "\n".join(out)


def _table(columns: list[str], rows: list[dict], left: Sequence[str] = ()) -> str:
    """An HTML table of ``rows`` over ``columns``, every cell escaped."""
    cls = {c: ' class="l"' if c in set(left) else "" for c in columns}
    head = "".join(f"<th{cls[c]}>{_e(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = "".join(f"<td{cls[c]}>{_e(fmt(r.get(c)))}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return (f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table></div>")



def _trio(s: Stat, f, bound_f=None) -> str:
    if s.mean is None:
        return "\u2013"
    bound_f = bound_f or f
    return f"{f(s.mean)} ({bound_f(s.min)}\u2013{bound_f(s.max)})"


def _layer_columns(ks: list[int], held: list[int], with_budget: bool, qk: bool) -> list[str]:
    cols = ["layer", "heads", "rank e90 mean (min\u2013max)"]
    cols += [f"rel error k={k} mean (min\u2013max)" for k in ks]
    cols += [f"data-aware held-out error k={k} mean" for k in held]
    cols += ["stacked rank e90 per kv group"]
    if with_budget:
        cols += ["latent k plain (sum)", "latent k data-aware (sum)", "KV bytes/token before",
                 "after plain", "after data-aware", "after uniform"]
    if qk:
        cols += ["QK rank e90 mean (min\u2013max)", "stacked key rank e90 per kv group"]
        cols += ["key latent k plain (sum)"] if with_budget else []
    return cols


def _layer_cells(a: LayerAggregate, ks: list[int], held: list[int], stacked: list[str],
                 b: LayerLatents | None, with_budget: bool, keys: list[str] | None = None) -> list[str]:
    cells = [str(a.layer), str(a.heads), _trio(a.rank_e90, lambda v: f"{v:.1f}", lambda v: f"{v:g}")]
    cells += [_trio(a.rel_error[k], fmt_err) for k in ks]
    cells += [fmt_err(a.white_heldout.get(k)) for k in held]
    cells.append(", ".join(stacked) or "\u2013")
    if with_budget:
        def get(name: str) -> Any:
            return getattr(b, name) if b is not None else None

        cells += [fmt(get("k_plain")), fmt(get("k_data")), fmt_bytes(get("kv_bytes_before")),
                  fmt_bytes(get("kv_bytes_after_plain")), fmt_bytes(get("kv_bytes_after_data")),
                  fmt_bytes(get("kv_bytes_after_uniform"))]
    if keys is not None:
        cells += [_trio(a.qk_rank_e90, lambda v: f"{v:.1f}", lambda v: f"{v:g}"), ", ".join(keys) or "\u2013"]
        cells += [fmt(b.key_k_plain if b is not None else None)] if with_budget else []
    return cells


def _layer_section(layers: Sequence[LayerResult], budget: Budget | None) -> str:
    ks = sorted({k for r in layers for h in r.heads for k in h.ov.rel_error})
    agg = layer_aggregates(layers, ks)
    stacked = {r.layer: [fmt(g.stack.rank_at.get(90)) for g in sorted(r.groups, key=lambda g: g.kv_head)]
               for r in layers}
    by_layer = {d.layer: d for d in budget.layer_latents()} if budget is not None else {}
    held = [k for k in ks if any(k in a.white_heldout for a in agg)]
    qk = any(g.qk_stack is not None for r in layers for g in r.groups)
    keys = {r.layer: [fmt(g.qk_stack.rank_at.get(90)) for g in sorted(r.groups, key=lambda g: g.kv_head)
                      if g.qk_stack is not None] for r in layers}
    head = "".join(f"<th>{_e(c)}</th>" for c in _layer_columns(ks, held, bool(by_layer), qk))
    body = []
    for a in agg:
        cells = _layer_cells(a, ks, held, stacked.get(a.layer, []), by_layer.get(a.layer), bool(by_layer),
                             keys.get(a.layer, []) if qk else None)
        body.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return ("<h2>Per layer</h2><p class=\"note\">Over the layer's query heads: mean (min\u2013max). Stacked rank: "
            "rank at 90% energy of the stack of W_OV over each kv group's query heads, in kv-head order; stacked "
            "key rank: the same for the stack of (W_Q^h)^T W_K^g.</p>"
            f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table></div>")


def write_html(path: Path, summary: dict, layers: Sequence[LayerResult], budget: Budget | None,
               images: Sequence[Path]) -> Path:
    """Write the sweep's self-contained report page to ``path`` (atomically) and return ``path``.

    Sections: a header from ``summary`` (every key shown, nested dicts flattened to ``a.b``, ``notes`` as a
    list); the budget totals (bytes per token before/after, saving %, plain vs data-aware vs uniform with mean
    and max error); ``images`` in the given order, embedded as base64 data URIs; a per-layer table (mean, min,
    max of the OV rank at 90% energy and of rel_error at each k over the layer's heads, stacked kv-group ranks,
    the layer's budget); collapsible full per-head, per-kv-group and budget tables.
    """
    if not isinstance(summary, dict):
        raise HeadlensError(f"`summary` must be a dict, got {type(summary).__name__}")
    if not layers or not all(isinstance(r, LayerResult) and r.heads for r in layers):
        raise HeadlensError("`layers` must be a non-empty list of LayerResult, each with its heads")
    head_rows, group_rows = to_rows(layers)
    name = model_name(summary)
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>headlens sweep: {_e(name)}</title>",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             f"<style>{CSS}</style></head><body>", _header(summary), _budget_section(budget)]
    if images:
        parts.append("<h2>Figures</h2>")
        parts.extend(image_tag(p, _CAPTIONS) for p in images)
    parts.append(_layer_section(layers, budget))
    parts.append(f"<details><summary>every query head ({len(head_rows)} rows)</summary>"
                 + _table(columns(head_rows), head_rows) + "</details>")
    if group_rows:
        parts.append(f"<details><summary>every kv group ({len(group_rows)} rows)</summary>"
                     + _table(columns(group_rows), group_rows) + "</details>")
    if budget is not None and budget.rows:
        rows = budget.to_json()["rows"]
        parts.append(f"<details><summary>budget per kv group ({len(rows)} rows)</summary>"
                     + _table(columns(rows), rows) + "</details>")
    parts.append("</body></html>\n")
    final = Path(path)
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(parts))
    return final
