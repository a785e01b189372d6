"""The self-contained page of ``headlens compress`` (``compress.html``), drawn from its summary dict
(:func:`headlens.report.compress.summary`): the run, the configurations, the equal-bytes comparisons, the figures
(inlined), each configuration's per-layer errors, with key latents each one's per-layer key errors, and the notes.
A run without key latents gives the page it gave before keys existed.

No external resource and no script: the page works offline and from an e-mail attachment. All text is escaped
with ``html.escape``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from headlens.errors import HeadlensError
from headlens.io.files import atomic_path
from headlens.report.compress_figures import keyed
from headlens.report.page import CSS, image_tag, model_name
from headlens.report.page import escape as _e
from headlens.report.sweep_common import fmt, fmt_bytes


_CAPTIONS = {
    "compress_scatter.png": "Measured against predicted error per layer, one point per configuration and layer: "
                            "the value-path error (before attention mixes tokens), the attention output's error "
                            "with only that layer compressed, and with every layer compressed. On the dashed "
                            "diagonal the spectrum's prediction is exact.",
    "compress_tradeoff.png": "KV cache saving against the model-level damage (mean next-token KL for causal LMs, "
                             "mean embedding cosine for encoders); budget points are labelled with their target.",
}

_KEY_CAPTIONS = {
    "compress_scatter.png": _CAPTIONS["compress_scatter.png"] + " On the right the keys: the measured relative "
                            "logit error with only that layer's keys compressed against the key spectrum's "
                            "prediction (for a rotary layer, the expectation over relative rotations); hollow "
                            "points are configurations compressing values and keys.",
    "compress_tradeoff.png": _CAPTIONS["compress_tradeoff.png"] + " One line per part: values alone (solid), keys "
                             "alone (dashed), values and keys (dash-dotted), which alone go past 50%.",
}


def _num(value: Any, spec: str) -> str:
    return "\u2013" if value is None else format(float(value), spec)


def _ppl(record: dict, side: str) -> str:
    """A perplexity cell: ``inf`` where it overflowed float64 (null in the JSON), scientific from a million."""
    if record.get(f"ppl_{side}_overflow"):
        return "inf"
    value = record.get(f"ppl_{side}")
    return _num(value, ".3e" if value is not None and value >= 1e6 else ".2f")


def _pct(fraction: Any) -> str:
    return "\u2013" if fraction is None else f"{100 * float(fraction):.1f}%"


def _layers_text(layers: Any) -> str:
    if isinstance(layers, (list, tuple)):
        return f"{len(layers)} ({', '.join(str(v) for v in layers)})"
    return fmt(layers)


def _header(summary: dict, with_keys: bool = False) -> str:
    name = model_name(summary)
    model = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    rows = [("model", name), ("task", summary.get("task")), ("layers compressed", _layers_text(summary.get("layers"))),
            ("calibration tokens", fmt(summary.get("calibration_tokens"))),
            ("eval texts", fmt(summary.get("eval_texts"))), ("eval tokens", fmt(summary.get("eval_tokens"))),
            ("KV bytes per value", fmt(summary.get("kv_bytes_per_value")))]
    if with_keys:
        rows.append(("key latents", fmt(summary.get("keys"))))
    for key in ("budget", "dtype"):
        if summary.get(key) is not None:
            rows.append((key, fmt(summary[key])))
    for key in ("family", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if model.get(key) is not None:
            rows.append((f"model {key}", fmt(model[key])))
    seconds = summary.get("seconds")
    if isinstance(seconds, dict) and seconds:
        rows.append(("seconds", ", ".join(f"{k} {fmt(v)}" for k, v in seconds.items())))
    body = "".join(f'<tr><th class="l">{_e(k)}</th><td>{_e(v)}</td></tr>' for k, v in rows)
    return f"<h1>headlens compress: {_e(name)}</h1><table class=\"kv\"><tbody>{body}</tbody></table>"


def _config_columns(causal: bool, with_keys: bool = False) -> list[str]:
    cols = ["configuration", "latent", "allocation", "latent dims", "KV bytes/token before \u2192 after", "saving"]
    if with_keys:
        cols[1:4] = ["part", "latent", "key latent", "allocation", "latent dims", "key latent dims"]
    cols += (["KL mean (nats)", "KL p95 (nats)", "top-1 agreement", "ppl before \u2192 after"] if causal
             else ["embedding cosine mean", "embedding cosine min", "neighbour agreement"])
    return cols + ["hidden error"]


def _config_cells(r: dict, causal: bool, with_keys: bool = False) -> list[str]:
    cells = [str(r.get("name")), str(r.get("latent")), str(r.get("allocation")), fmt(r.get("latent_dims")),
             f"{fmt_bytes(r.get('kv_bytes_per_token_before'))} \u2192 {fmt_bytes(r.get('kv_bytes_per_token_after'))}",
             _pct(r.get("saving"))]
    if with_keys:  # a part's latent that it does not compress shows as a dash
        values, keys = r.get("part") in ("values", "both"), r.get("part") in ("keys", "both")
        cells[1:4] = [str(r.get("part")), str(r.get("latent")) if values else "\u2013",
                      str(r.get("key_latent")) if keys else "\u2013", str(r.get("allocation")),
                      fmt(r.get("latent_dims")) if values else "\u2013", fmt(r.get("key_dims")) if keys else "\u2013"]
    if causal:
        cells += [_num(r.get("kl_mean"), ".4f"), _num(r.get("kl_p95"), ".4f"), _pct(r.get("top1_agreement")),
                  f"{_ppl(r, 'before')} \u2192 {_ppl(r, 'after')}"]
    else:
        cells += [_num(r.get("embedding_cosine_mean"), ".4f"), _num(r.get("embedding_cosine_min"), ".4f"),
                  _pct(r.get("neighbour_agreement"))]
    return cells + [_num(r.get("hidden_error"), ".4f")]


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0) -> str:
    """An HTML table, every cell escaped; the first ``left`` columns left-aligned."""
    cls = [' class="l"' if i < left else "" for i in range(len(columns))]
    head = "".join(f"<th{cls[i]}>{_e(c)}</th>" for i, c in enumerate(columns))
    body = "".join("<tr>" + "".join(f"<td{cls[i]}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _configurations(records: list[dict], causal: bool, with_keys: bool = False) -> str:
    if not records:
        return "<h2>Configurations</h2><p class=\"note\">No configuration was measured.</p>"
    return ("<h2>Configurations</h2>"
            + _table(_config_columns(causal, with_keys), [_config_cells(r, causal, with_keys) for r in records],
                     left=6 if with_keys else 3))


def comparison_sentence(c: dict) -> str:
    """'at 42.0% saved: A KL 0.0154 vs B 0.0140 -> uniform is better' (plain text, not escaped)."""
    what = "KL" if c.get("metric") == "kl_mean" else "cosine"
    head = (f"at {_pct(c.get('saving'))} saved: {c.get('a')} {what} {_num(c.get('a_value'), '.4f')} vs "
            f"{c.get('b')} {_num(c.get('b_value'), '.4f')}")
    better = c.get("better")
    if better is None:
        return head + " -> not comparable (a value is missing)"
    return head + (" -> equal" if better == "equal" else f" -> {better} is better")


def _comparisons(comps: list[dict]) -> str:
    if not comps:
        return ""
    items = "".join(f"<li>{_e(comparison_sentence(c))}</li>" for c in comps)
    return ("<h2>At equal KV bytes</h2><p class=\"note\">Each budget against the uniform allocation with the same "
            "bytes, and each data-aware budget against the plain budgets' trade-off interpolated at its saving.</p>"
            f"<ul>{items}</ul>")


def _per_layer(records: list[dict]) -> str:
    if not any(r.get("layers") for r in records):
        return ""
    cols = ["layer", "k per kv group", "predicted", "value-path", "isolated", "accumulated"]
    parts = ["<h2>Per layer</h2><p class=\"note\">Relative errors of each compressed layer: the spectrum's "
             "prediction, the value path, the attention output with only this layer compressed, and with every "
             "layer compressed.</p>"]
    for r in records:
        if r.get("part") == "keys":  # keys alone: no value layers (its keys are in the keys section)
            continue
        layers = r.get("layers") or []
        rows = [[fmt(e.get("layer")), ", ".join(str(k) for k in e.get("ks") or []),
                 *(_num(e.get(k), ".4f") for k in ("predicted_error", "value_path_error", "isolated_error",
                                                   "accumulated_error"))] for e in layers]
        parts.append(f"<details><summary>{_e(r.get('name'))} ({len(layers)} layers)</summary>"
                     + _table(cols, rows) + "</details>")
    return "\n".join(parts)


KEY_COLUMNS = ["layer", "key k per kv group", "rotary", "predicted key error", "measured logit error",
               "attention KL", "isolated: keys", "isolated: values", "isolated: both", "accumulated"]
KEY_FIELDS = ("key_predicted_error", "key_logit_error", "key_attention_kl", "isolated_keys_error",
              "isolated_values_error", "isolated_both_error", "attention_accumulated_error")


def _per_key_layer(records: list[dict]) -> str:
    """Per configuration with key latents, its layers' key errors (collapsed); "" without key latents."""
    keyed_records = [r for r in records if keyed(r)]
    if not keyed_records:
        return ""
    parts = ["<h2>Keys per layer</h2><p class=\"note\">Per compressed layer: the key spectrum's predicted relative "
             "logit error (for a rotary layer the expectation over relative rotations), the measured relative logit "
             "error and the attention pattern's KL (nats, mean over query rows and heads) with only this layer's "
             "keys compressed; the attention output's relative error (every head's softmax(q k^T) v, before the "
             "output projection) with only this layer compressed, keys alone, values alone and both, and with "
             "everything the configuration compresses (accumulated). A dash: that part is not compressed.</p>"]
    for r in keyed_records:
        layers = r["key_layers"]
        rows = [[fmt(e.get("layer")), ", ".join(str(k) for k in e.get("key_ks") or []) or "\u2013",
                 {True: "yes", False: "no"}.get(e.get("rotary"), "\u2013"),
                 *(_num(e.get(k), ".4f") for k in KEY_FIELDS)] for e in layers]
        parts.append(f"<details><summary>{_e(r.get('name'))} ({_e(r.get('part'))}, {len(layers)} layers)</summary>"
                     + _table(KEY_COLUMNS, rows) + "</details>")
    return "\n".join(parts)


def _notes(notes: Any) -> str:
    if not notes:
        return ""
    notes = [notes] if isinstance(notes, str) else list(notes)
    return "<h2>Notes</h2><ul class=\"note\">" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


def write_html(path: Path, summary: dict, images: list[Path]) -> Path:
    """Write ``compress.html`` to ``path`` (atomically) and return ``path``.

    Sections: the run (model, task, layers, calibration tokens, eval texts and tokens, KV bytes per value); the
    configurations table (latent, allocation, latent dims, KV bytes before -> after, saving, then KL, top-1
    agreement and perplexity for causal LMs or embedding cosine and neighbour agreement for encoders, and the
    hidden-state error); the equal-bytes comparisons as sentences; ``images`` in the given order, inlined as
    base64 data URIs with captions; each configuration's per-layer errors (collapsed); the notes. With key latents
    (a configuration whose ``part`` is keys or both) also the key latent kind in the run, the part, key latent and
    key latent dims in the configurations table, and per configuration with keys its per-layer key errors
    (collapsed, after the value errors).
    """
    if not isinstance(summary, dict):
        raise HeadlensError(f"`summary` must be a dict, got {type(summary).__name__}")
    records = list(summary.get("configurations") or [])
    causal = summary.get("task") == "causal-lm"
    with_keys = any(keyed(r) for r in records)
    name = model_name(summary)
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>headlens compress: {_e(name)}</title>",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             f"<style>{CSS}</style></head><body>", _header(summary, with_keys),
             _configurations(records, causal, with_keys),
             _comparisons(list(summary.get("comparisons") or []))]
    if images:
        parts.append("<h2>Figures</h2>")
        parts.extend(image_tag(p, _KEY_CAPTIONS if with_keys else _CAPTIONS) for p in images)
    parts += [_per_layer(records), _per_key_layer(records), _notes(summary.get("notes")), "</body></html>\n"]
    final = Path(path)
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(p for p in parts if p))
    return final
