"""``headlens router`` outputs: the dump, the statistics CSV, three figures and a page colouring the text.

Takes a :class:`~headlens.moe.router.RouterResult`; writes every file atomically under one directory.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path

from headlens.words import count
from headlens.moe.router import RouterResult
from headlens.moe.statistics import LayerStats


@dataclass
class RouterFiles:
    """What :func:`write_router_outputs` wrote."""

    dump: Path  # router_dump.safetensors: the routing tensors
    dump_json: Path  # router_dump.json: the report
    csv: Path  # router_stats.csv: one row per MoE layer
    figures: list[Path]  # router_load.png, router_coactivation.png, router_entropy.png
    page: Path  # router.html: the text coloured by top expert, the table and the figures inlined

    def all(self) -> list[Path]:
        """Every file, in the order the command lists them."""
        return [self.dump, self.dump_json, self.csv, *self.figures, self.page]


def write_router_outputs(result: RouterResult, out_dir: Path) -> RouterFiles:
    """Write the dump, the CSV, the figures and the page of ``result`` into ``out_dir`` (created)."""
    from headlens.io.files import atomic_path, ensure_dir
    from headlens.moe.dump import write_dump

    report = result.report
    name = report.model["name"]
    ensure_dir(out_dir)
    st, js = write_dump(out_dir / "router_dump", report, result.layers)
    csv_path = out_dir / "router_stats.csv"
    with atomic_path(csv_path) as tmp:
        tmp.write_text(stats_csv(report.stats), encoding="utf-8")
    pngs = [save_load_heatmap(out_dir / "router_load.png", report.stats, name),
            save_coactivation(out_dir / "router_coactivation.png", report.stats, name),
            save_entropies(out_dir / "router_entropy.png", report.stats, name)]
    page = write_page(out_dir / "router.html", result, pngs)
    return RouterFiles(dump=st, dump_json=js, csv=csv_path, figures=pngs, page=page)


def _overlap(s: LayerStats, fmt: str, missing: str = "n/a") -> str:
    """The consecutive-token overlap, or ``missing`` when no text had two tokens."""
    return missing if s.repeat_consecutive is None else format(s.repeat_consecutive, fmt)


def summary_lines(result: RouterResult, files: RouterFiles) -> list[str]:
    """What ``headlens router`` prints: the model line, one line per MoE layer, the definitions, the files."""
    r = result.report
    lines = [f"{r.model['name']}: {count(len(r.moe_layers), 'MoE layer')} ({count(r.experts, 'expert')}, "
             f"top-{r.top_k}, {r.rule}), {count(r.tokens, 'token')} from {count(len(result.texts), 'text')}"
             + (f"; dense layers skipped: {r.dense_layers}" if r.dense_layers else "")]
    for s in r.stats:
        lines.append(f"layer {s.layer:3d}: load CV {s.load_cv:.3f}  max/mean {s.load_max_over_mean:.2f}  "
                     f"dead {len(s.dead_experts)}  load entropy {s.load_entropy_norm:.3f}  routing entropy "
                     f"{s.routing_entropy_norm:.3f}  consecutive overlap {_overlap(s, '.3f')}")
    lines.append(f"routing entropy = mean over tokens of H({r.stats[0].routing_entropy_kind}) / log E; load entropy "
                 f"= H(load share) / log E (1 = uniform load)")
    if any(s.repeat_consecutive is None for s in r.stats):
        lines.append("consecutive overlap n/a: no text has two tokens, so there are no consecutive tokens to compare "
                     "(null in the JSON, empty in the CSV)")
    lines.extend(f"saved -> {p}" for p in files.all())
    return lines


def stats_csv(stats: list[LayerStats]) -> str:
    """One row per MoE layer: the scalar statistics, then the load share of each expert."""
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["layer", "tokens", "experts", "top_k", "load_cv", "load_max_over_mean", "dead_experts",
            "load_entropy_norm", "routing_entropy_norm", "repeat_consecutive"]
    w.writerow(cols + [f"load_share_e{e}" for e in range(stats[0].experts)])
    for s in stats:
        w.writerow([s.layer, s.tokens, s.experts, s.top_k, f"{s.load_cv:.6g}", f"{s.load_max_over_mean:.6g}",
                    len(s.dead_experts), f"{s.load_entropy_norm:.6g}", f"{s.routing_entropy_norm:.6g}",
                    _overlap(s, ".6g", "")] + [f"{x:.6g}" for x in s.load_share])
    return buf.getvalue()


LOAD_DPI = 100  # router_load.png: at most 14 x 12 inches, 1400 x 1200 px
COACTIVATION_DPI = 100  # router_coactivation.png: panels of at most 11 x 11 inches in all, labels around them


def load_heatmap_figure(stats: list[LayerStats], name: str):
    """The figure of :func:`save_load_heatmap`: MoE layer x expert load share, (L, E). Every layer and expert
    is labelled up to 40 of them, every s-th above (at most 40 labels an axis); the size is bounded."""
    import numpy as np

    from headlens.report.figures import _pyplot
    from headlens.report.labels import tick_positions

    plt = _pyplot()
    L, E = len(stats), stats[0].experts
    load = np.array([s.load_share for s in stats])  # (L, E)
    fig, ax = plt.subplots(figsize=(max(7.0, min(3 + 0.3 * E, 14)), max(3.0, min(2 + 0.3 * L, 12))),
                           layout="constrained")
    im = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    rows, cols = tick_positions(L), tick_positions(E)
    ax.set_yticks(rows, [str(stats[i].layer) for i in rows], fontsize=8)
    ax.set_xticks(cols, [str(e) for e in cols], fontsize=8, rotation=90 if E > 20 else 0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{name}: load share per expert\n(uniform = 1/{E} = {1 / E:.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of token assignments")
    return fig


def save_load_heatmap(path: Path, stats: list[LayerStats], name: str) -> Path:
    """MoE layer x expert heatmap of the load share (:func:`load_heatmap_figure`); returns ``path``."""
    from headlens.report.figures import save_figure

    return save_figure(load_heatmap_figure(stats, name), path, dpi=LOAD_DPI)


def _grid(n: int) -> tuple[int, int, float]:
    """(rows, columns, panel side in inches) for ``n`` co-activation panels: four to a row up to 16 panels,
    then a near-square grid; panels of at most 3 inches, smaller as the grid grows so that with each row's title
    and gap (~0.3 in) the grid stays within ~12 x 12 inches (94 layers: 10 x 10 panels of 0.9 in)."""
    import math

    cols = min(n, 4 if n <= 16 else math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    return rows, cols, min(3.0, (12.0 - 0.1 * cols) / cols, (12.0 - 0.3 * rows) / rows)


def coactivation_figure(stats: list[LayerStats], name: str):
    """The figure of :func:`save_coactivation`: one P(j | i) matrix (E, E) per MoE layer on a grid, one shared
    colour bar; tick labels and the i / j axis labels only on the outer panels (the first column, and the
    panels with none below them), every panel's labels given room by
    :func:`~headlens.report.panels.place_panels`, so none runs into its neighbour."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from headlens.report.figures import _pyplot
    from headlens.report.panels import place_panels

    plt = _pyplot()
    L = len(stats)
    rows, cols, panel = _grid(L)
    fig = plt.figure(dpi=COACTIVATION_DPI)
    fontsize = 8 if panel >= 2 else 7
    grid: list[list] = [[None] * cols for _ in range(rows)]
    for i, s in enumerate(stats):
        r, c = divmod(i, cols)
        ax = grid[r][c] = fig.add_axes((0.1, 0.1, 0.2, 0.2))
        im = ax.imshow(np.array(s.coactivation), vmin=0, vmax=1, cmap="magma", interpolation="nearest",
                       aspect="auto")  # (E, E), square: the panel is square
        ax.set_title(f"layer {s.layer}", fontsize=fontsize + 1)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=4 if panel >= 2 else 3, integer=True))
        outer_x = i + cols >= L  # no panel below this one
        ax.tick_params(labelsize=fontsize, labelbottom=outer_x, labelleft=c == 0)
        if outer_x:
            ax.set_xlabel("j (expert)", fontsize=fontsize + 1)
        if c == 0:
            ax.set_ylabel("i (expert)", fontsize=fontsize + 1)
    cax = fig.add_axes((0.9, 0.1, 0.02, 0.5))
    fig.colorbar(im, cax=cax, label="P(j | i)")
    place_panels(fig, grid, (panel, panel), cax,
                 title=f"{name}: expert co-activation P(j\u00a0|\u00a0i) over the top-k pairs of a token")
    return fig


def save_coactivation(path: Path, stats: list[LayerStats], name: str) -> Path:
    """One P(j | i) co-activation matrix per MoE layer (:func:`coactivation_figure`); returns ``path``."""
    from headlens.report.figures import save_figure

    return save_figure(coactivation_figure(stats, name), path, dpi=COACTIVATION_DPI)


def save_entropies(path: Path, stats: list[LayerStats], name: str) -> Path:
    """Load entropy, mean routing entropy and consecutive-token overlap through the MoE layers."""
    from headlens.report.figures import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ls = [s.layer for s in stats]
    ax.plot(ls, [s.load_entropy_norm for s in stats], marker="o", label="load entropy H(f)/log E")
    ax.plot(ls, [s.routing_entropy_norm for s in stats], marker="s", label="mean routing entropy / log E")
    ax.plot(ls, [float("nan") if s.repeat_consecutive is None else s.repeat_consecutive for s in stats],
            marker=".", ls=":", label="consecutive-token overlap")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("MoE layer")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{name}: entropies per layer")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def _expert_colors(experts: int) -> list[str]:
    """One ``#rrggbb`` per expert from matplotlib's tab20 (repeating after 20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return ["#%02x%02x%02x" % tuple(int(255 * c) for c in cmap(e % 20)[:3]) for e in range(experts)]


def _text_spans(result: RouterResult, colors: list[str]) -> list[str]:
    """One ``<p>`` per text, each token a span coloured by its top expert at ``result.color_layer``."""
    r = next(x for x in result.layers if x.layer == result.color_layer)
    top = r.indices[range(len(r.indices)), r.weights.argmax(-1)].tolist()  # (T,)
    spans, t = [], 0
    for pieces in result.token_pieces:
        parts = []
        for piece in pieces:
            e = top[t]
            w = float(r.weights[t].max())
            parts.append(f'<span style="background:{colors[e]}" title="token {t}: expert {e} (weight {w:.3f})">'
                         f"{html.escape(piece)}</span>")
            t += 1
        spans.append(f"<p class=\"text\">{''.join(parts)}</p>")
    return spans


def write_page(path: Path, result: RouterResult, pngs: list[Path]) -> Path:
    """The HTML page: the text coloured by top expert, the per-layer table, the figures inlined."""
    from headlens.io.files import atomic_path, readable  # the figures are staged until the command ends

    report = result.report
    name = report.model["name"]
    colors = _expert_colors(report.experts)
    spans = _text_spans(result, colors)
    legend = "".join(f'<span class="key" style="background:{colors[e]}">expert {e}</span>'
                     for e in range(report.experts))
    imgs = "".join(f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(readable(p).read_bytes()).decode()}">' for p in pngs)
    rows = "".join(f"<tr><td>{s.layer}</td><td>{s.load_cv:.3f}</td><td>{s.load_max_over_mean:.2f}</td>"
                   f"<td>{len(s.dead_experts)}</td><td>{s.load_entropy_norm:.3f}</td>"
                   f"<td>{s.routing_entropy_norm:.3f}</td><td>{_overlap(s, '.3f')}</td></tr>"
                   for s in report.stats)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(name)} router</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} .text{{line-height:1.9}}
.text span{{padding:1px 0;border-radius:2px}} .key{{display:inline-block;margin:2px;padding:2px 6px;border-radius:3px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
img{{max-width:100%;display:block;margin:1em 0}}</style></head><body>
<h1>{html.escape(name)}: mixture-of-experts routing</h1>
<p>{len(report.moe_layers)} MoE layers, {report.experts} experts, top-{report.top_k}, scoring rule
<code>{html.escape(report.rule)}</code>, {report.tokens} tokens. Dense layers skipped: {report.dense_layers or 'none'}.</p>
<h2>Text coloured by each token's top expert at layer {result.color_layer}</h2>{legend}{''.join(spans)}
<h2>Per-layer statistics</h2><table><tr><th>layer</th><th>load CV</th><th>max/mean</th><th>dead</th>
<th>load entropy</th><th>routing entropy</th><th>consecutive overlap</th></tr>{rows}</table>
{imgs}</body></html>"""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
