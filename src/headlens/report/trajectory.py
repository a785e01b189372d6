"""``headlens trajectory``'s files: the tidy table, the summary, one figure of four panels and one page.

- ``trajectory.parquet`` / ``trajectory.csv``: :meth:`TrajectoryResult.rows` (keyed by checkpoint, step, unit,
  layer, head, kv_head);
- ``trajectory_summary.json``: checkpoints with their steps and where each step came from, budgets, config;
- ``trajectory.png``: per layer against the step: the mean OV rank at 90% energy over the layer's heads, the
  value latent each kv group needs at the budget's target (mean over groups), the first token's attention share
  (mean over heads; with texts) and the routers' entropy (MoE layers; with texts). A panel without its numbers
  says why instead of drawing nothing;
- ``trajectory.html``: the summary, the figure and the per-checkpoint table, self-contained.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from headlens.io.files import atomic_path, write_json
from headlens.io.tables import write_table
from headlens.report.figures import _pyplot, save_figure
from headlens.report.page import CSS, escape, image_tag
from headlens.trajectory.run import TrajectoryResult

STEM = "trajectory"
PANELS = (("head", "ov_rank_e90", "OV rank at 90% energy (mean over heads)", "no heads"),
          ("group", "k_plain", "value latent at the target (mean k over kv groups)", "no budget"),
          ("head", "first_token_share", "first token's attention share (mean over heads)",
           "needs texts: --prompt or --calib"),
          ("layer", "router_entropy", "router entropy / log E (MoE layers)", None))


def layer_series(rows: list[dict[str, Any]], unit: str, column: str) -> dict[int, list[tuple[int, float]]]:
    """{layer: [(step, mean of ``column`` over that layer's ``unit`` rows at the step)]}, steps ascending; rows
    without a value are left out."""
    acc: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in rows:
        if r.get("unit") == unit and r.get(column) is not None:
            acc[(r["layer"], r["step"])].append(float(r[column]))
    out: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (layer, step) in sorted(acc, key=lambda k: (k[0], k[1])):
        vals = acc[(layer, step)]
        out[layer].append((step, sum(vals) / len(vals)))
    return dict(out)


def draw_figure(result: TrajectoryResult, path: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    """The four panels (see the module docstring) as one PNG."""
    plt = _pyplot()
    rows = result.rows() if rows is None else rows
    steps = sorted({c.point.step for c in result.checkpoints})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    name = run_name(result)
    n_layers = max((r["layer"] for r in rows), default=0) + 1
    cmap = plt.get_cmap("viridis")
    for ax, (unit, column, title, why) in zip(axes.flat, PANELS):
        series = layer_series(rows, unit, column)
        if column == "k_plain":
            title = f"value latent at {result.config.get('target', 'the target')} (mean k over kv groups)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step" + (" (order given)" if {c.point.step_from for c in result.checkpoints}
                                         == {"order"} else ""))
        if not series:
            reason = why or ("needs texts: --prompt or --calib" if result.config.get("moe") else
                             "no MoE layers in this model")
            ax.text(0.5, 0.5, reason, ha="center", va="center", transform=ax.transAxes, color="#666")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for layer, pts in sorted(series.items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, lw=1.4, color=cmap(layer / max(1, n_layers - 1)),
                    label=f"layer {layer}")
        if len(steps) > 2 and steps[0] >= 0 and steps[-1] > 10 * max(1, steps[1]):
            ax.set_xscale("symlog", linthresh=max(1, steps[1]))  # Pythia-like spacing: log past the first steps
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{name}: {len(result.checkpoints)} checkpoints, steps {steps[0]}..{steps[-1]}", fontsize=11)
    return save_figure(fig, path)


def run_name(result: TrajectoryResult) -> str:
    """What the checkpoints are of: the hub repo, the folder holding them all, or the first one's name."""
    import os

    if not result.checkpoints:
        return "?"
    repo = result.checkpoints[0].point.source.hf_repo
    if repo is not None:
        return repo
    wheres = [c.point.where for c in result.checkpoints]
    try:
        parent = os.path.commonpath([str(Path(w).resolve().parent) for w in wheres])
    except ValueError:
        parent = ""
    return Path(parent).name or result.checkpoints[0].sweep.name


def _checkpoint_table(result: TrajectoryResult) -> str:
    head = ("checkpoint", "step", "step from", "layers", "mean OV rank@90%", "KV bytes/token after (plain)",
            "saved %", "first-token share", "resumed layers")
    body = []
    for c in result.checkpoints:
        aggs = c.sweep.aggregates()
        ranks = [a.rank_e90.mean for a in aggs if a.rank_e90.mean is not None]
        t = c.sweep.budget.totals
        shares = [h["first_token_share"] for h in (c.prompt or {}).get("heads", [])]
        cells = (c.point.name, c.point.step, c.point.step_from, len(c.sweep.layers),
                 f"{sum(ranks) / len(ranks):.2f}" if ranks else "", t.kv_bytes_after_plain,
                 f"{t.saving_plain_pct:.1f}", f"{sum(shares) / len(shares):.3f}" if shares else "", c.resumed_layers)
        body.append("<tr>" + "".join(f"<td{' class=l' if i == 0 else ''}>{escape(v)}</td>"
                                     for i, v in enumerate(cells)) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def write_page(result: TrajectoryResult, path: Path, image: Path, summary: dict[str, Any]) -> Path:
    name = run_name(result)
    notes = "".join(f"<li>{escape(n)}</li>" for n in summary.get("notes", []))
    ex = summary.get("executor") or {}
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>headlens trajectory: {escape(name)}</title>",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             f"<style>{CSS}</style></head><body>",
             f"<h1>headlens trajectory: {escape(name)}</h1>",
             f"<p class=note>{len(result.checkpoints)} checkpoints; budget target {escape(result.config['target'])}; "
             f"{'data-aware on the given texts' if result.config['data_aware'] else 'weight-only'}; computed on the "
             f"{escape(ex.get('executor', 'serial'))} executor. Table: <code>trajectory.parquet</code>.</p>",
             image_tag(image, {image.name: "per layer against the training step"}),
             "<h2>Checkpoints</h2>", _checkpoint_table(result),
             f"<h2>Notes</h2><ul>{notes}</ul>", "</body></html>"]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts) + "\n", encoding="utf-8")
    return Path(path)


def write_report(result: TrajectoryResult, out_dir: Path) -> list[Path]:
    """Every file of the run (see the module docstring); returns their paths."""
    out_dir = Path(out_dir)
    rows = result.rows()
    files = write_table(out_dir / STEM, rows)
    from headlens.results import strict

    summary = strict(result.summary())
    jpath = write_json(out_dir / f"{STEM}_summary.json", summary)
    image = draw_figure(result, out_dir / f"{STEM}.png", rows)
    page = write_page(result, out_dir / f"{STEM}.html", image, summary)
    return files + [jpath, image, page]


def result_lines(result: TrajectoryResult) -> list[str]:
    """One line per checkpoint for the terminal."""
    lines = []
    for c in result.checkpoints:
        aggs = c.sweep.aggregates()
        ranks = " ".join(f"{a.rank_e90.mean:.1f}" for a in aggs if a.rank_e90.mean is not None)
        t = c.sweep.budget.totals
        shares = [h["first_token_share"] for h in (c.prompt or {}).get("heads", [])]
        extra = f", first-token share {sum(shares) / len(shares):.3f}" if shares else ""
        lines.append(f"step {c.point.step:>8} {c.point.name}: OV rank@90% per layer [{ranks}], KV bytes/token "
                     f"{t.kv_bytes_before} -> {t.kv_bytes_after_plain} ({t.saving_plain_pct:.1f}% saved){extra}")
    return lines
