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
    "Q_g = B_g P_g of rank k_g. Keys stay at full size unless `keys` is plain or data-aware (KEYS_NOTE), so a "
    "values-only saving is at most 50%.",
    "plain: Q_g = V_k V_k^T from the stacked operator M_g = [W_O^h W_V^g] over the group's query heads; "
    "data-aware: Q_g = S V_k V_k^T S^-1 with S S^T = X X^T on the calibration tokens, V_k from M_g S.",
    "predicted_error: the spectrum's prediction (the sweep's); value_path_error: ||M_g (v - v')|| over the "
    "layer's kv groups and the eval tokens, relative, before attention mixes tokens; isolated_error: only this "
    "layer compressed, fed the original inputs, relative error of what the output projection writes (the value "
    "bias's constant part taken out of the denominator); accumulated_error: every layer compressed.",
    "The value-path error sums each query head's output separately (the stacked operator); what the output "
    "projection writes adds the heads together and mixes tokens through attention, so (iii) can differ from (ii) "
    "even where attention is the identity, unless a layer has one head.",
    "uniform: the same total latent dims (hence KV bytes) spread evenly over every (layer, kv group). A budget of "
    "bytes (saving, kv-budget) is spent by allocation: uniform, error (the largest predicted relative error first; "
    "energy picks the same sizes), fisher (sizes by each latent's squared gradient of the calibration loss) or greedy "
    "(the largest predicted end-to-end loss reduction per number: spectrum times each layer's sensitivity measured "
    "on the calibration texts), keys and values competing for the same bytes.",
    "calib_error_in_sample / calib_error_heldout: the value latents' error on calibration tokens, refitted on the "
    "even positions and measured there and on the odd ones (held out); plain_error_heldout: plain latents of the "
    "same sizes on the same held-out tokens (null without data-aware latents).",
    "KL(original || compressed) of the next-token distributions in nats, at every position with a next token; "
    "perplexity of the eval texts' actual next tokens, exp of their mean loss (nll_before / nll_after, nats); "
    "float64 log-softmax. A perplexity beyond float64 (a mean loss above 709.8 nats) is null in JSON with "
    "ppl_before_overflow / ppl_after_overflow true, and printed as inf.",
]

KEYS_NOTE = (
    "Keys: per layer and kv group the cache stores c = E_g (k - b) (pre-rotary keys, un-rotated with the family's "
    "own rotary, in rotary layers) and rebuilds k' = U_g c + b, turned back by each token's position; E_g, U_g from "
    "the query-weighted key moments (plain: the weights; data-aware: the calibration tokens' own queries and keys), "
    "the queries averaged over relative rotations. key_predicted_error: the spectrum's relative logit error (the "
    "expectation over relative rotations in rotary layers); key_logit_error and key_attention_kl: measured, only "
    "that layer's keys compressed; isolated_keys/values/both_error and attention_accumulated_error: the attention "
    "output (before the output projection), relative. part: values, keys or both; comparisons pit like against "
    "like. key_frequency_*: TransMLA's per-frequency cross-head latent at the same numbers per token (rotary layers, "
    "G > 1). key_form: the form the cache keeps for the layer, per_group or across (c = E x of every kv head's rotated "
    "keys side by side, no positions), whichever has the lower predicted error (calibration, never the eval texts); "
    "the isolated and accumulated output errors, the end-to-end numbers, `generate` and `save_model` use it, while "
    "key_predicted_error/key_logit_error/key_attention_kl stay the per-group latent's.")

ENCODER_NOTE = (
    "An encoder keeps no KV cache: every token's keys and values are computed in one pass and dropped, so the KV "
    "bytes above are what a cache of these layers would hold, not memory saved. What the latents save in an "
    "encoder is in the value projections: each kv group's block W_V^g (hd x d) becomes W_V^g Q_g of rank k_g, "
    "which stored as its two factors (latent_factors.safetensors: P_g, k_g x d, and U_g, hd x k_g) takes "
    "k_g (hd + d) numbers where that is fewer than hd d, and as many multiply-adds per token "
    "(value_params_before/after, value_flops_per_token_before/after: 2 FLOPs per multiply-add; every layer of the "
    "model counted, layers left out at full size). The exported model keeps dense blocks of rank k_g.")

GENERATE_NOTE = (
    "kv_bytes_per_token_measured (a run that generates): the bytes of every tensor the configuration's LatentCache holds "
    "after a greedy generation, over the tokens it has seen, in the dtype the model ran in "
    "(kv_bytes_per_value_measured bytes per number); kv_bytes_per_token_after counts the same numbers at "
    "kv_bytes_per_value bytes each. kv_measured_matches_plan: the measured numbers per token (bytes over bytes per "
    "number) equal the planned ones.")

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


def value_weights(model: dict, ks: dict[int, list[int]]) -> dict[str, int]:
    """The value projections' parameters and multiply-add FLOPs per token over every layer of ``model`` (a
    checkpoint description: ``num_layers``, ``num_kv_heads``, ``head_dim``, ``hidden_size``), dense and with the
    kv groups of ``ks`` (layer -> k_g) as rank-k_g factors: ``hd d`` -> ``min(hd d, k_g (hd + d))`` per group."""
    L, G, hd, d = (int(model[k]) for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"))
    before = L * G * hd * d
    after = sum(min(hd * d, k * (hd + d)) for layer in range(L) for k in ks.get(layer, [hd] * G))
    return {"value_params_before": before, "value_params_after": after,
            "value_params_saving": 1.0 - after / before if before else 0.0,
            "value_flops_per_token_before": 2 * before, "value_flops_per_token_after": 2 * after}


ENCODER_FIELDS = ("value_params_before", "value_params_after", "value_params_saving", "value_flops_per_token_before",
                  "value_flops_per_token_after")
CHECK_FIELDS = ("kv_bytes_per_token_measured", "kv_bytes_per_value_measured", "kv_measured_matches_plan",
                "generated_text")


def _check_fields(check) -> dict[str, Any]:
    if check is None:
        return {k: None for k in CHECK_FIELDS}
    return {"kv_bytes_per_token_measured": check.kv_bytes_per_token,
            "kv_bytes_per_value_measured": check.kv_bytes_per_value, "kv_measured_matches_plan": check.agrees,
            "generated_text": check.text}


HELDOUT_FIELDS = ("calib_error_in_sample", "calib_error_heldout", "plain_error_heldout", "heldout_tokens")


def configuration_records(result: CompressResult) -> list[dict[str, Any]]:
    """Per configuration: ``name, budget, target, latent, allocation, matches, latent_dims, ks``, the
    measurement's fields (:data:`MODEL_FIELDS`, None where they do not apply), for an encoder the value weights it
    saves (:data:`ENCODER_FIELDS`, else None), with ``generate`` the cache measured in generation
    (:data:`CHECK_FIELDS`, else None), and ``layers``."""
    out = []
    checks = result.cache_checks or [None] * len(result.configurations)
    for (c, m), check in zip(result.pairs(), checks):
        s = _strict(m.summary())
        weights = (value_weights(result.model, c.ks) if result.task != "causal-lm"
                   else {k: None for k in ENCODER_FIELDS})
        out.append({"name": c.name, "budget": c.budget, "target": c.target, "latent": c.latent,
                    "allocation": c.allocation, "matches": c.matches, "latent_dims": c.latent_dims,
                    "ks": {str(layer): list(v) for layer, v in sorted(c.ks.items())},
                    "part": c.part, "key_latent": c.key_latent, "key_dims": c.key_dims,
                    "key_ks": ({str(layer): list(v) for layer, v in sorted(c.key_ks.items())}
                               if c.key_ks is not None else None),
                    **{k: s[k] for k in MODEL_FIELDS}, **weights, **_check_fields(check),
                    **{k: result.heldout.get(c.name, {}).get(k) for k in HELDOUT_FIELDS},
                    "layers": [{k: e[k] for k in ("layer", "predicted_error", "value_path_error", "isolated_error",
                                                   "accumulated_error", "ks")} for e in s["layers"]],
                    "key_layers": s["key_layers"]})
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
                        "better": winner(b["allocation"], _measure_of(b, task), "uniform", _measure_of(r, task))})
    for r in records:
        part = r.get("part", "values")
        plain = [(q["saving"], _measure_of(q, task)) for q in records
                 if q["latent"] == "plain" and q["allocation"] == "budget" and q.get("part", "values") == part
                 and _measure_of(q, task) is not None]
        if r["latent"] == "data-aware" and r["allocation"] == "budget" and part != "keys" and plain:
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
            "latents": list(cfg.latents), "keys": cfg.keys, "kv_bytes_per_value": cfg.kv_bytes, "dtype": cfg.dtype,
            "calibration_tokens": result.calibration_tokens, "eval_texts": m0.n_texts, "eval_tokens": m0.n_tokens,
            "predicted_positions": m0.n_predicted,
            "ridge": {str(k): v for k, v in sorted(result.ridge.items())},
            "configurations": records, "comparisons": comparisons(records, result.task),
            "generate": ({"tokens": cfg.generate, "prompt": result.generate_prompt} if result.cache_checks else None),
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
            "notes": [*result.notes, *_check_notes(result), *NOTES, *([KEYS_NOTE] if cfg.keys != "none" else []),
                      *([ENCODER_NOTE] if result.task != "causal-lm" else []),
                      *([GENERATE_NOTE] if result.cache_checks else [])]}


def _check_notes(result: CompressResult) -> list[str]:
    """One note per configuration whose LatentCache held other than the planned numbers per token."""
    out = []
    for c, check in zip(result.configurations, result.cache_checks or []):
        if check is not None and not check.agrees:
            out.append(f"{c.name}: the LatentCache held {check.numbers_per_token:g} numbers per token in generation, "
                       f"the plan counts {check.planned_numbers_per_token:g}"
                       + (f" ({'; '.join(check.notes)})" if check.notes else ""))
    return out
