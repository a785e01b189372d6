"""The output side of ``headlens compress``: the summary, the tables, the figures and the page of a
:class:`~headlens.compress.run.CompressResult`, and the lines the command prints.

Files in ``out_dir``: ``compress_summary.json`` (per configuration the issue's fields and its layers),
``compress_layers.csv`` (one row per configuration and layer: the four errors side by side),
``compress_tradeoff.csv`` (one row per configuration), ``compress_scatter.png`` (predicted against measured per
layer, with the diagonal), ``compress_tradeoff.png`` (KV saving against KL, or against embedding cosine for
encoders) and ``compress.html`` (all of it on one self-contained page).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headlens.compress.run import CompressResult
from headlens.io.files import write_json
from headlens.io.tables import write_csv

SUMMARY_JSON = "compress_summary.json"
LAYERS_CSV = "compress_layers.csv"
TRADEOFF_CSV = "compress_tradeoff.csv"
SCATTER_PNG = "compress_scatter.png"
TRADEOFF_PNG = "compress_tradeoff.png"
PAGE_HTML = "compress.html"

NOTES = [
    "Construction: per layer and kv group g the cache stores c = P_g x (k_g numbers per token) instead of the "
    "group's values, rebuilt as v = W_V^g B_g c (+ value bias): the model with W_V^g replaced by W_V^g Q_g, "
    "Q_g = B_g P_g of rank k_g. Keys stay at full size (a key latent under RoPE needs a partial-RoPE split, as "
    "MHA2MLA and TransMLA do; not done here), so the saving is at most 50%.",
    "plain: Q_g = V_k V_k^T from the stacked operator M_g = [W_O^h W_V^g] over the group's query heads; "
    "data-aware: Q_g = S V_k V_k^T S^-1 with S S^T = X X^T on the calibration tokens, V_k from M_g S.",
    "predicted_error: the spectrum's prediction (the sweep's); value_path_error: ||M_g (v - v')|| over the "
    "layer's kv groups and the eval tokens, relative, before attention mixes tokens; isolated_error: only this "
    "layer compressed, fed the original inputs, relative error of what the output projection writes (the value "
    "bias's constant part taken out of the denominator); accumulated_error: every layer compressed.",
    "The value-path error sums each query head's output separately (the stacked operator); what the output "
    "projection writes adds the heads together and mixes tokens through attention, so (iii) can differ from (ii) "
    "even where attention is the identity, unless a layer has one head.",
    "uniform: the same total latent dims (hence KV bytes) spread evenly over every (layer, kv group).",
    "KL(original || compressed) of the next-token distributions in nats, at every position with a next token; "
    "perplexity of the eval texts' actual next tokens; float64 log-softmax.",
]

MODEL_FIELDS = ("kv_bytes_per_token_before", "kv_bytes_per_token_after", "saving", "hidden_error", "kl_mean",
                "kl_p95", "top1_agreement", "ppl_before", "ppl_after", "embedding_cosine_mean",
                "embedding_cosine_min", "neighbour_agreement")


def configuration_records(result: CompressResult) -> list[dict[str, Any]]:
    """Per configuration: ``name, budget, target, latent, allocation, matches, latent_dims, ks`` and the
    measurement's fields (:data:`MODEL_FIELDS`, None where they do not apply) with ``layers``."""
    out = []
    for c, m in result.pairs():
        s = m.summary()
        out.append({"name": c.name, "budget": c.budget, "target": c.target, "latent": c.latent,
                    "allocation": c.allocation, "matches": c.matches, "latent_dims": c.latent_dims,
                    "ks": {str(layer): list(v) for layer, v in sorted(c.ks.items())},
                    **{k: s[k] for k in MODEL_FIELDS},
                    "layers": [{k: e[k] for k in ("layer", "predicted_error", "value_path_error", "isolated_error",
                                                   "accumulated_error", "ks")} for e in s["layers"]]})
    return out


def _measure_of(rec: dict, task: str) -> float | None:
    return rec["kl_mean"] if task == "causal-lm" else rec["embedding_cosine_mean"]


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (saving, value) points at saving ``x`` (None outside their range)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1] if len(pts) == 1 and pts[0][0] == x else None


def comparisons(records: list[dict], task: str) -> list[dict]:
    """At equal KV bytes: each budget against its uniform allocation (exactly the same bytes), and each
    data-aware budget against the plain budgets' trade-off curve interpolated at its saving. ``better`` names
    the one with the lower KL (causal LMs) or the higher embedding cosine (encoders); ties are "equal"."""
    lower_is_better = task == "causal-lm"
    metric = "kl_mean" if lower_is_better else "embedding_cosine_mean"

    def winner(a_name: str, a: float | None, b_name: str, b: float | None) -> str | None:
        if a is None or b is None:
            return None
        if a == b:
            return "equal"
        return a_name if (a < b) == lower_is_better else b_name

    by_name = {r["name"]: r for r in records}
    out = []
    for r in records:
        if r["allocation"] == "uniform" and r["matches"] in by_name:
            b = by_name[r["matches"]]
            out.append({"metric": metric, "saving": b["saving"], "a": b["name"], "a_value": _measure_of(b, task),
                        "b": r["name"], "b_value": _measure_of(r, task),
                        "better": winner("budget", _measure_of(b, task), "uniform", _measure_of(r, task))})
    plain = [(r["saving"], _measure_of(r, task)) for r in records
             if r["latent"] == "plain" and r["allocation"] == "budget" and _measure_of(r, task) is not None]
    for r in records:
        if r["latent"] == "data-aware" and r["allocation"] == "budget" and plain:
            p = _interpolate(plain, r["saving"])  # type: ignore[arg-type]
            out.append({"metric": metric, "saving": r["saving"], "a": r["name"], "a_value": _measure_of(r, task),
                        "b": "plain budgets (interpolated at this saving)", "b_value": p,
                        "better": winner("data-aware", _measure_of(r, task), "plain", p)})
    return out


def summary(result: CompressResult) -> dict[str, Any]:
    """Everything ``compress_summary.json`` holds."""
    records = configuration_records(result)
    m0 = result.measurements[0]
    cfg = result.config
    return {"model": result.model, "task": result.task, "layers": result.layers, "budget": cfg.budget_kind(),
            "latents": list(cfg.latents), "kv_bytes_per_value": cfg.kv_bytes, "dtype": cfg.dtype,
            "calibration_tokens": result.calibration_tokens, "eval_texts": m0.n_texts, "eval_tokens": m0.n_tokens,
            "predicted_positions": m0.n_predicted,
            "ridge": {str(k): v for k, v in sorted(result.ridge.items())},
            "configurations": records, "comparisons": comparisons(records, result.task),
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()}, "notes": NOTES}


def layer_rows(records: list[dict]) -> list[dict]:
    return [{"configuration": r["name"], "latent": r["latent"], "allocation": r["allocation"], "target": r["target"],
             "layer": e["layer"], "k": sum(e["ks"]), "ks": ";".join(str(k) for k in e["ks"]),
             "predicted_error": e["predicted_error"], "value_path_error": e["value_path_error"],
             "isolated_error": e["isolated_error"], "accumulated_error": e["accumulated_error"]}
            for r in records for e in r["layers"]]


def tradeoff_rows(records: list[dict]) -> list[dict]:
    return [{"configuration": r["name"], "budget": r["budget"], "target": r["target"], "latent": r["latent"],
             "allocation": r["allocation"], "latent_dims": r["latent_dims"], **{k: r[k] for k in MODEL_FIELDS}}
            for r in records]


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
             write_csv(out_dir / TRADEOFF_CSV, tradeoff_rows(records))]
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


def result_lines(data: dict) -> list[str]:
    """One line per configuration, then the equal-bytes comparisons."""
    causal = data["task"] == "causal-lm"
    lines = []
    width = max(len(r["name"]) for r in data["configurations"])
    for r in data["configurations"]:
        pred = max(e["predicted_error"] for e in r["layers"]) if r["layers"] else 0.0
        acc = max(e["accumulated_error"] for e in r["layers"]) if r["layers"] else 0.0
        model = (f"KL {_f(r['kl_mean'], '.4f')} (p95 {_f(r['kl_p95'], '.4f')}) nats, top-1 "
                 f"{100 * r['top1_agreement']:.1f}%, ppl {r['ppl_before']:.2f} -> {r['ppl_after']:.2f}" if causal
                 else f"cosine mean {_f(r['embedding_cosine_mean'], '.4f')} min {_f(r['embedding_cosine_min'], '.4f')}"
                      f", neighbours {_f(r['neighbour_agreement'], '.2f')}")
        lines.append(f"{r['name']:<{width}}  KV {r['kv_bytes_per_token_before']:.0f} -> "
                     f"{r['kv_bytes_per_token_after']:.0f} B/token ({100 * r['saving']:.1f}% saved); {model}; "
                     f"max layer error predicted {pred:.3f}, accumulated {acc:.3f}")
    for c in data["comparisons"]:
        if c["better"] is None:
            continue
        what = "KL" if c["metric"] == "kl_mean" else "cosine"
        lines.append(f"at {100 * c['saving']:.1f}% saved: {c['a']} {what} {c['a_value']:.4f} vs {c['b']} "
                     f"{c['b_value']:.4f} -> {c['better']} is better")
    return lines
