"""The output side of `headlens sweep`: every file of a :class:`~headlens.circuits.sweep.SweepResult`, and the
lines the command prints. Every file is written atomically, so an interrupted sweep never leaves a
half-written table or picture behind.

Files in ``out_dir`` (names in :mod:`headlens.report.sweep_common`), in this order:
``sweep_heads.{csv,parquet}``, ``sweep_groups.{csv,parquet}`` (:mod:`headlens.io.tables`), the heatmaps and the
budget chart (:mod:`headlens.report.sweep_figures`), ``sweep_budget.csv``, ``sweep_budget_layers.csv``,
``sweep_summary.json`` and ``sweep.html`` (:mod:`headlens.report.sweep_html`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from headlens.circuits.budget import Budget
from headlens.circuits.sweep import SweepResult, SweepStart
from headlens.circuits.sweep_results import LayerResult, layer_aggregates
from headlens.io.files import write_json
from headlens.io.quantized import weights_line
from headlens.io.tables import write_csv, write_table
from headlens.report.pool import Deferred
from headlens.report.sweep_common import (BUDGET_CSV, BUDGET_LAYERS_CSV, BUDGET_PNG, GROUPS_STEM, HEADS_STEM,
                                          PAGE_HTML, SUMMARY_JSON)

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor


def budget_outputs(out_dir: Path, budget: Budget | None, model_name: str, weights: str | None = None) -> list[Path]:
    """The latent-budget tables and chart; returns the written paths (``[]`` when ``budget`` is None):
    ``sweep_budget.csv`` (one row per (layer, kv head); with ``weights``, the model's
    :func:`~headlens.circuits.sweep_parts.weights_digest`, in a column ``model_weights`` that ``compress --budget``
    checks, followed by the key budget's ``key_*`` columns), ``sweep_budget_layers.csv`` (KV bytes per token before/after, per layer) and
    ``sweep_budget.png``."""
    from headlens.report.sweep_figures import budget_chart

    if budget is None:
        return []
    out_dir = Path(out_dir)
    data = budget.to_json()
    rows = [_budget_row(r, weights) for r in data["rows"]]
    paths = [write_csv(out_dir / BUDGET_CSV, rows), write_csv(out_dir / BUDGET_LAYERS_CSV, data["per_layer"])]
    chart = budget_chart(out_dir / BUDGET_PNG, budget, model_name)
    return paths + ([chart] if chart is not None else [])


def _budget_row(row: dict, weights: str | None) -> dict:
    """A ``sweep_budget.csv`` row: the value budget's columns, ``model_weights``, then the key budget's (``key_*``,
    appended after the columns older readers know)."""
    out = {k: v for k, v in row.items() if not k.startswith("key_")}
    if weights:
        out["model_weights"] = weights
    return {**out, **{k: v for k, v in row.items() if k.startswith("key_")}}


def write_report(result: SweepResult, out_dir: Path, json_path: Path | None = None,
                 pool: "ProcessPoolExecutor | None" = None) -> list[Path]:
    """Write every output file of ``result`` (summary JSON at ``json_path``, default in ``out_dir``); returns
    their paths in the order above.

    With a ``pool`` (:class:`~headlens.report.pool.WorkerPool`'s executor, warmed up with
    :func:`headlens.report.sweep_figures.warm_up`), the per-k heatmaps, the largest figures, are drawn there while
    this process writes the tables, the rank heatmap and the budget chart; the files are the same either way."""
    from headlens.report.sweep_figures import draw_heatmap, heatmap_jobs
    from headlens.report.sweep_html import write_html

    out_dir = Path(out_dir)
    jobs = heatmap_jobs(out_dir, result.heads(), result.config.ks, result.name)
    away = [Deferred(pool, draw_heatmap, path, job) if pool is not None and job["kind"] != "rank" else None
            for path, job in jobs]
    head_rows, group_rows = result.rows()
    files = write_table(out_dir / HEADS_STEM, head_rows) + write_table(out_dir / GROUPS_STEM, group_rows)
    here = {i: draw_heatmap(path, job) for i, (path, job) in enumerate(jobs) if away[i] is None}
    bfiles = budget_outputs(out_dir, result.budget, result.name, result.model.get("weights_digest"))
    images = [here[i] if d is None else d.result() for i, d in enumerate(away)]
    summary = result.summary()
    jpath = write_json(Path(json_path) if json_path else out_dir / SUMMARY_JSON, summary)
    page = write_html(out_dir / PAGE_HTML, summary, result.layers, result.budget,
                      images + [p for p in bfiles if p.suffix == ".png"])
    return files + images + bfiles + [jpath, page]


def header_line(start: SweepStart) -> str:
    """What the command prints before the first layer (and, for a quantized checkpoint, how its weights were read)."""
    s = start.shape
    quantized = weights_line(start.model)
    return (f"{quantized}\n" if quantized else "") + (f"{start.name}: {s.num_layers} layers, {s.num_heads} query heads, {s.num_kv_heads} kv heads, head_dim "
            f"{s.head_dim}, hidden {s.hidden_size}; sweeping {len(start.todo)} layer(s)"
            + (f", {len(start.done)} already done (--resume)" if start.done else "")
            + (f"; data-aware on {start.calibration_tokens} calibration tokens" if start.data_aware
               else "; weight-only"))


def layer_line(layer: LayerResult, ks: Sequence[int]) -> str:
    """One layer's line: its heads' mean OV rank at 90% energy and mean rel_error at each k."""
    a = layer_aggregates([layer], ks)[0]
    return (f"layer {a.layer:3d}: mean rank@90% {a.rank_e90.mean:6.1f}  "
            + "  ".join(f"rel_error@{k} {a.rel_error[k].mean:.3f}" for k in ks))


def result_lines(result: SweepResult, per_layer: bool = True) -> list[str]:
    """What the command prints at the end, before the file names: per-layer means (unless ``per_layer`` is False:
    printed as each layer finished, :func:`layer_line`) and the budget."""
    ks = result.config.ks
    lines = [layer_line(r, ks) for r in result.layers] if per_layer else []
    t = result.budget.totals
    data = result.data_aware
    lines.append(f"budget ({result.budget.target.label()}): KV bytes/token {t.kv_bytes_before} -> "
                 f"{t.kv_bytes_after_plain} plain ({t.saving_plain_pct:.1f}% saved)"
                 + (f", {t.kv_bytes_after_data} data-aware ({t.saving_data_pct:.1f}% saved)" if data else ""))
    lines.append(f"uniform allocation with the same total (k={t.uniform_k:.1f} per kv group): mean/max error "
                 f"{t.mean_err_uniform:.3f}/{t.max_err_uniform:.3f} vs budgeted "
                 f"{t.mean_err_plain:.3f}/{t.max_err_plain:.3f}")
    if t.key_latent_dims_plain is not None:
        lines.append(f"keys (stacked W_Q^T W_K, relative position 0): {t.key_latent_dims_plain} latent dims plain"
                     + (f", {t.key_latent_dims_data} data-aware" if t.key_latent_dims_data is not None else "")
                     + f" of {len(result.budget.rows) * result.shape.head_dim}; KV bytes/token with key latents too "
                     f"{t.kv_bytes_after_plain_with_keys} plain ({t.saving_plain_with_keys_pct:.1f}% saved)"
                     + (f", {t.kv_bytes_after_data_with_keys} data-aware ({t.saving_data_with_keys_pct:.1f}% saved)"
                        if t.kv_bytes_after_data_with_keys is not None and t.saving_data_with_keys_pct is not None
                        else ""))
    if data:
        lines.append(f"data-aware latents: predicted mean/max error {t.mean_err_data:.3f}/{t.max_err_data:.3f}"
                     f" (fit tokens), measured on held-out tokens {t.mean_err_data_heldout:.3f}/"
                     f"{t.max_err_data_heldout:.3f}")
    if result.device != "cpu" or result.gram_precision != "float64":
        lines.append(f"Gram products and eigensolves on {result.device} in {result.gram_precision}"
                     + (" (this device has no float64; eigensolves on the CPU in float64)"
                        if result.gram_precision != "float64" else ""))
    return lines


def preload_in_background() -> None:
    """Import the figure and table libraries in a thread, so their import overlaps the sweep's layer loop
    (whose torch kernels release the GIL). Errors are left to the writers, which report their own."""
    import threading

    def load() -> None:
        try:
            import headlens.report.sweep_figures  # noqa: F401
            import headlens.report.sweep_html  # noqa: F401
            from headlens.io.tables import pyarrow_parquet
            from headlens.report.figures import _pyplot

            _pyplot()
            pyarrow_parquet()
        except Exception:
            pass

    threading.Thread(target=load, daemon=True).start()
