"""What ``headlens compress`` found, as plain JSON-ready data: the content of ``compress_summary.json``
(:meth:`headlens.compress.run.CompressResult.to_json`), its per-configuration records and the equal-bytes
comparisons. The report (:mod:`headlens.report.compress`) writes and draws from it.

JSON stays strict: a perplexity that overflows float64 (:func:`headlens.compress.measure.perplexity` gives
``inf``) is written as ``null`` with ``ppl_before_overflow`` / ``ppl_after_overflow`` true, next to the mean
next-token loss it comes from (``nll_before`` / ``nll_after``, in nats, always finite).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headlens.compress.run import CompressResult

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
    "perplexity of the eval texts' actual next tokens, exp of their mean loss (nll_before / nll_after, nats); "
    "float64 log-softmax. A perplexity beyond float64 (a mean loss above 709.8 nats) is null in JSON with "
    "ppl_before_overflow / ppl_after_overflow true, and printed as inf.",
]

MODEL_FIELDS = ("kv_bytes_per_token_before", "kv_bytes_per_token_after", "saving", "hidden_error", "kl_mean",
                "kl_p95", "top1_agreement", "ppl_before", "ppl_after", "ppl_before_overflow", "ppl_after_overflow",
                "nll_before", "nll_after", "embedding_cosine_mean", "embedding_cosine_min", "neighbour_agreement")


def _strict(s: dict) -> dict:
    """A measurement's summary with each perplexity that overflowed (inf) as None and its ``*_overflow`` flag."""
    s = dict(s)
    for side in ("before", "after"):
        value = s.get(f"ppl_{side}")
        over = isinstance(value, float) and math.isinf(value)
        s[f"ppl_{side}"] = None if over else value
        s[f"ppl_{side}_overflow"] = over
    return s


def configuration_records(result: CompressResult) -> list[dict[str, Any]]:
    """Per configuration: ``name, budget, target, latent, allocation, matches, latent_dims, ks`` and the
    measurement's fields (:data:`MODEL_FIELDS`, None where they do not apply) with ``layers``."""
    out = []
    for c, m in result.pairs():
        s = _strict(m.summary())
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
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()}, "notes": [*result.notes, *NOTES]}
