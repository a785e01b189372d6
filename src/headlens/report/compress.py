"""The output side of ``headlens compress``: the summary, the tables, the figures and the page of a
:class:`~headlens.compress.run.CompressResult`, and the lines the command prints.

Files in ``out_dir``: ``compress_summary.json`` (per configuration the issue's fields and its layers),
``compress_layers.csv`` (one row per configuration and layer: the four errors side by side),
``compress_tradeoff.csv`` (one row per configuration), with key latents ``compress_keys.csv`` (one row per
configuration and layer: the key errors), ``compress_scatter.png`` (predicted against measured per layer, with the
diagonal; with key latents a keys panel), ``compress_tradeoff.png`` (KV saving against KL, or against embedding
cosine for encoders; with key latents a line per part) and ``compress.html`` (all of it on one self-contained page).
"""

from __future__ import annotations

from pathlib import Path

from headlens.compress.run import CompressResult
from headlens.compress.summary import MODEL_FIELDS, summary
from headlens.io.files import write_json
from headlens.io.tables import write_csv

SUMMARY_JSON = "compress_summary.json"
LAYERS_CSV = "compress_layers.csv"
TRADEOFF_CSV = "compress_tradeoff.csv"
SCATTER_PNG = "compress_scatter.png"
TRADEOFF_PNG = "compress_tradeoff.png"
PAGE_HTML = "compress.html"
KEYS_CSV = "compress_keys.csv"

def layer_rows(records: list[dict]) -> list[dict]:
    return [{"configuration": r["name"], "latent": r["latent"], "allocation": r["allocation"], "target": r["target"],
             "layer": e["layer"], "k": sum(e["ks"]), "ks": ";".join(str(k) for k in e["ks"]),
             "predicted_error": e["predicted_error"], "value_path_error": e["value_path_error"],
             "isolated_error": e["isolated_error"], "accumulated_error": e["accumulated_error"]}
            for r in records for e in r["layers"]]


def tradeoff_rows(records: list[dict]) -> list[dict]:
    return [{"configuration": r["name"], "budget": r["budget"], "target": r["target"], "latent": r["latent"],
             "allocation": r["allocation"], "latent_dims": r["latent_dims"],
             **({"part": r["part"], "key_latent": r["key_latent"], "key_dims": r["key_dims"]} if _keys(records) else {}),
             **{k: r[k] for k in MODEL_FIELDS}}
            for r in records]


def _keys(records: list[dict]) -> bool:
    return any(r.get("key_layers") for r in records)


def key_rows(records: list[dict]) -> list[dict]:
    """One row per configuration and layer: keys beside values (the key form kept, predicted and measured key errors,
    attention KL, the attention output's isolated errors for keys alone, values alone and both, and its accumulated error)."""
    return [{"configuration": r["name"], "part": r["part"], "layer": e["layer"],
             "key_k": sum(e["key_ks"]) if e["key_ks"] else None,
             "key_form": e.get("key_form"),
             **{k: e[k] for k in ("rotary", "key_predicted_error", "key_logit_error", "key_attention_kl",
                                  "isolated_keys_error", "isolated_values_error", "isolated_both_error",
                                  "attention_accumulated_error")}}
            for r in records for e in r.get("key_layers") or []]


def preload_in_background() -> None:
    """Import the figure and page modules (matplotlib) in a thread, so the import overlaps the eval passes (whose
    torch kernels release the GIL). Errors are left to the writers, which report their own."""
    import threading

    def load() -> None:
        try:
            import headlens.report.compress_figures  # noqa: F401
            import headlens.report.compress_html  # noqa: F401
            from headlens.report.figures import _pyplot

            _pyplot()
        except Exception:  # noqa: BLE001
            pass

    threading.Thread(target=load, daemon=True, name="headlens-preload").start()


def write_report(result: CompressResult, out_dir: Path, json_path: Path | None = None) -> list[Path]:
    """Every output file; returns their paths (tables, figures, summary JSON, page)."""
    from headlens.report.compress_figures import scatter, tradeoff
    from headlens.report.compress_html import write_html

    out_dir = Path(out_dir)
    data = summary(result)
    records = data["configurations"]
    files = [write_csv(out_dir / LAYERS_CSV, layer_rows(records)),
             write_csv(out_dir / TRADEOFF_CSV, tradeoff_rows(records))] + ([write_csv(out_dir / KEYS_CSV, key_rows(records))] if _keys(records) else [])
    images = [scatter(out_dir / SCATTER_PNG, data), tradeoff(out_dir / TRADEOFF_PNG, data)]
    jpath = write_json(Path(json_path) if json_path else out_dir / SUMMARY_JSON, data)
    page = write_html(out_dir / PAGE_HTML, data, images)
    return files + images + [jpath, page]


def _f(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def header_line(start: dict) -> str:
    s = start["shape"]
    return (f"{start['name']}: {s.num_layers} layers, {s.num_heads} query heads, {s.num_kv_heads} kv heads, "
            f"head_dim {s.head_dim}; compressing {len(start['layers'])} layer(s), {start['configurations']} "
            f"configuration(s) on {start['eval_texts']} eval text(s)"
            + (f"; data-aware latents fitted on {start['calibration_tokens']} calibration tokens"
               if start["calibration_tokens"] else ""))


def _ppl(value: float | None, overflow: bool = False) -> str:
    """A perplexity for the printed lines: ``inf`` where it overflowed, scientific notation from a million."""
    if overflow:
        return "inf"
    if value is None:
        return "n/a"
    return f"{value:.3e}" if value >= 1e6 else f"{value:.2f}"


def comparison_line(c: dict) -> str | None:
    """'at 42.0% saved: A KL 0.0126 vs B 0.0108 -> uniform is better' (None where a value is missing)."""
    if c["better"] is None:
        return None
    what = "KL" if c["metric"] == "kl_mean" else "cosine"
    verdict = "equal" if c["better"] == "equal" else f"{c['better']} is better"
    return f"at {100 * c['saving']:.1f}% saved: {c['a']} {what} {c['a_value']:.4f} vs {c['b']} {c['b_value']:.4f} -> {verdict}"


def overflow_notes(data: dict) -> list[str]:
    """One note per configuration whose perplexity overflowed float64."""
    out = []
    for r in data["configurations"]:
        for side in ("before", "after"):
            if r.get(f"ppl_{side}_overflow"):
                out.append(f"note: {r['name']}: perplexity {side} is beyond float64 (mean next-token loss "
                           f"{r[f'nll_{side}']:.1f} nats, exp of it above 1.8e308): printed as inf, null in the "
                           f"JSON with ppl_{side}_overflow true")
    return out


def generated_lines(data: dict, width: int) -> list[str]:
    """With ``--generate``: per configuration what its LatentCache held in generation, against the plan."""
    gen = data.get("generate")
    if not gen:
        return []
    lines = [f"generated {gen['tokens']} token(s) after {gen['prompt']!r} with each configuration's LatentCache "
             "(bytes read from its tensors):"]
    kvb = data["kv_bytes_per_value"]
    for r in data["configurations"]:
        bpv = r["kv_bytes_per_value_measured"]
        numbers = r["kv_bytes_per_token_measured"] / bpv
        lines.append(f"{r['name']:<{width}}  measured {r['kv_bytes_per_token_measured']:.0f} B/token at {bpv} "
                     f"B/number = {numbers:g} numbers/token; planned {r['kv_bytes_per_token_after'] / kvb:g} "
                     f"({r['kv_bytes_per_token_after']:.0f} B/token at --kv-bytes {kvb}): "
                     + ("agree" if r["kv_measured_matches_plan"] else "DIFFER (see the notes)"))
    return lines


def result_lines(data: dict) -> list[str]:
    """One line per configuration, the notes on perplexities that overflowed, then the equal-bytes comparisons."""
    causal = data["task"] == "causal-lm"
    lines = []
    width = max(len(r["name"]) for r in data["configurations"])
    for r in data["configurations"]:
        pred = max(e["predicted_error"] for e in r["layers"]) if r["layers"] else 0.0
        acc = max(e["accumulated_error"] for e in r["layers"]) if r["layers"] else 0.0
        model = (f"KL {_f(r['kl_mean'], '.4f')} (p95 {_f(r['kl_p95'], '.4f')}) nats, top-1 "
                 f"{100 * r['top1_agreement']:.1f}%, ppl {_ppl(r['ppl_before'], r.get('ppl_before_overflow'))} -> "
                 f"{_ppl(r['ppl_after'], r.get('ppl_after_overflow'))}" if causal
                 else f"cosine mean {_f(r['embedding_cosine_mean'], '.4f')} min {_f(r['embedding_cosine_min'], '.4f')}"
                      f", neighbours {_f(r['neighbour_agreement'], '.2f')}")
        saved = (f"KV {r['kv_bytes_per_token_before']:.0f} -> {r['kv_bytes_per_token_after']:.0f} B/token "
                 f"({100 * r['saving']:.1f}% saved)" if causal else
                 f"value weights {r['value_params_before']} -> {r['value_params_after']} parameters and "
                 f"multiply-adds per token ({100 * r['value_params_saving']:.1f}% saved)")
        keys = r.get("key_layers") or []
        kpred = [e["key_predicted_error"] for e in keys if e["key_predicted_error"] is not None]
        kmeas = [e["key_logit_error"] for e in keys if e["key_logit_error"] is not None]
        key_part = (f"; keys: max logit error predicted {max(kpred):.3f}, measured {max(kmeas):.3f}" if kpred else "")
        value_part = f"; max layer error predicted {pred:.3f}, accumulated {acc:.3f}" if r["layers"] else ""
        lines.append(f"{r['name']:<{width}}  {saved}; {model}{value_part}{key_part}")
    if not causal:
        lines.append("note: an encoder keeps no KV cache: the latents save value-projection weights and FLOPs "
                     "(value_params_*, value_flops_per_token_* in the summary), not cache memory")
    lines += generated_lines(data, width)
    lines += overflow_notes(data)
    lines += [line for line in map(comparison_line, data["comparisons"]) if line is not None]
    return lines
