"""``headlens router``: mixture-of-experts router statistics, dispatch structure and a dump that reloads."""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import sys
from pathlib import Path

from headlens.cli.common import model_source
from headlens.errors import HeadlensError

MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def add_parser(sub) -> None:
    from headlens.cli.common import add_model_args

    p = sub.add_parser("router", help="mixture-of-experts router statistics and dumps",
                       description="Run text through a MoE checkpoint and report, per MoE layer, expert load, "
                                   "entropies, co-activation, repetition, layer-to-layer transitions and the "
                                   "token x expert dispatch structure.")
    add_model_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", metavar="TEXT", help="text to route (default: the notebook's prompt)")
    g.add_argument("--prompt-file", metavar="FILE", help="one text per line (batched)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="texts per forward (default 8)")
    p.add_argument("--color-layer", type=int, default=None, metavar="L",
                   help="MoE layer whose top expert colours the text in the HTML page (default: the first)")
    p.add_argument("--out-dir", default="headlens-out/router", metavar="DIR", help="default headlens-out/router")
    p.set_defaults(func=cmd_router)


def _texts(args) -> list[str]:
    from headlens.prompts import NOTEBOOK_PROMPT

    if args.prompt_file:
        from headlens.io.files import read_text_lines

        return read_text_lines(args.prompt_file, "--prompt-file")
    text = NOTEBOOK_PROMPT if args.prompt is None else args.prompt
    if not text.strip():
        raise HeadlensError("--prompt is empty")
    return [text]


def cmd_router(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from headlens.residual.capture import max_positions
    from headlens.io.files import atomic_path, check_writable_dir, ensure_dir
    from headlens.io.checkpoint import cast_dtype
    from headlens.moe.router import (RouterReport, capture_routing, layer_stats, prompt_hash, scoring_rule,
                                 transitions, write_dump)

    texts = _texts(args)
    if args.batch_size < 1:
        raise HeadlensError(f"--batch-size must be at least 1, got {args.batch_size}")
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    source = model_source(args)
    name, directory, config = source.model_dir()
    cfg = config.get("text_config") or config
    if not any(cfg.get(k) for k in MOE_CONFIG_KEYS):
        raise HeadlensError(f"no MoE layers in {name}: its config ({cfg.get('model_type')}) has no experts")
    n_layers = int(cfg.get("num_hidden_layers") or 0)
    if args.color_layer is not None and not 0 <= args.color_layer < n_layers:
        raise HeadlensError(f"--color-layer {args.color_layer} is out of range: {name} has {n_layers} layers "
                            f"(valid 0..{n_layers - 1})")
    tok = source.tokenizer(directory)
    model = source.model(directory, cast_dtype(args.dtype))
    with tqdm(total=len(texts), desc="routing", unit="text", file=sys.stderr, disable=None) as bar:
        layers, n_tokens, ids = capture_routing(model, tok, texts, args.batch_size, max_positions(config),
                                                progress=bar.update)
    rule = scoring_rule(model)
    E = int(layers[0].logits.shape[1])
    k = int(layers[0].indices.shape[1])
    moe = [r.layer for r in layers]
    dense = [l for l in range(n_layers) if l not in moe]
    color_layer = moe[0] if args.color_layer is None else args.color_layer
    if color_layer not in moe:
        raise HeadlensError(f"--color-layer {color_layer} is not a MoE layer: choose one of {moe}")
    stats = [layer_stats(r, E, rule) for r in layers]
    trans = {f"{a.layer}->{b.layer}": transitions(a, b, E).tolist() for a, b in zip(layers, layers[1:])}
    report = RouterReport(model={"name": name, "source": str(directory), "model_type": cfg.get("model_type"),
                                 "revision": args.revision}, rule=rule, experts=E, top_k=k, moe_layers=moe, dense_layers=dense,
                          tokens=n_tokens, prompt_sha256=prompt_hash(texts), stats=stats, transitions=trans)

    ensure_dir(out_dir)
    st, js = write_dump(out_dir / "router_dump", report, layers)
    csv_path = out_dir / "router_stats.csv"
    with atomic_path(csv_path) as tmp:
        tmp.write_text(_stats_csv(stats), encoding="utf-8")
    pngs = _figures(out_dir, stats, name)
    page = _html(out_dir / "router.html", name, report, texts, ids, tok, layers, color_layer, pngs)
    lines = [f"{name}: {len(moe)} MoE layers ({E} experts, top-{k}, {rule}), {n_tokens} tokens from "
             f"{len(texts)} text(s)" + (f"; dense layers skipped: {dense}" if dense else "")]
    for s in stats:
        lines.append(f"layer {s.layer:3d}: load CV {s.load_cv:.3f}  max/mean {s.load_max_over_mean:.2f}  "
                     f"dead {len(s.dead_experts)}  load entropy {s.load_entropy_norm:.3f}  routing entropy "
                     f"{s.routing_entropy_norm:.3f}  consecutive overlap {s.repeat_consecutive:.3f}")
    lines.append(f"routing entropy = mean over tokens of H({stats[0].routing_entropy_kind}) / log E; load entropy "
                 f"= H(load share) / log E (1 = uniform load)")
    for p in [st, js, csv_path, *pngs, page]:
        lines.append(f"saved -> {p}")
    print("\n".join(lines))
    return 0


def _stats_csv(stats) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["layer", "tokens", "experts", "top_k", "load_cv", "load_max_over_mean", "dead_experts",
            "load_entropy_norm", "routing_entropy_norm", "repeat_consecutive"]
    w.writerow(cols + [f"load_share_e{e}" for e in range(stats[0].experts)])
    for s in stats:
        w.writerow([s.layer, s.tokens, s.experts, s.top_k, f"{s.load_cv:.6g}", f"{s.load_max_over_mean:.6g}",
                    len(s.dead_experts), f"{s.load_entropy_norm:.6g}", f"{s.routing_entropy_norm:.6g}",
                    f"{s.repeat_consecutive:.6g}"] + [f"{x:.6g}" for x in s.load_share])
    return buf.getvalue()


def _figures(out_dir: Path, stats, name: str) -> list[Path]:
    import numpy as np

    from headlens.report.figures import _pyplot, save_figure

    plt = _pyplot()
    paths = []
    L, E = len(stats), stats[0].experts
    load = np.array([s.load_share for s in stats])
    fig, ax = plt.subplots(figsize=(max(7.0, min(3 + 0.35 * E, 24)), max(3.0, min(2 + 0.35 * L, 20))))
    im = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_yticks(range(L), [str(s.layer) for s in stats])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{name}: load share per expert\n(uniform = 1/{E} = {1 / E:.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of token assignments")
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "router_load.png", dpi=100))
    cols = min(L, 4)
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, s in zip(axes.flat, stats):
        im = ax.imshow(np.array(s.coactivation), vmin=0, vmax=1, cmap="magma")
        ax.set_title(f"layer {s.layer}: P(j | i)", fontsize=9)
        ax.set_xlabel("j")
        ax.set_ylabel("i")
    for ax in list(axes.flat)[L:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"{name}: expert co-activation over the top-k pairs of a token")
    paths.append(save_figure(fig, out_dir / "router_coactivation.png", dpi=100))
    fig, ax = plt.subplots(figsize=(7, 4))
    ls = [s.layer for s in stats]
    ax.plot(ls, [s.load_entropy_norm for s in stats], marker="o", label="load entropy H(f)/log E")
    ax.plot(ls, [s.routing_entropy_norm for s in stats], marker="s", label="mean routing entropy / log E")
    ax.plot(ls, [s.repeat_consecutive for s in stats], marker=".", ls=":", label="consecutive-token overlap")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("MoE layer")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{name}: entropies per layer")
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "router_entropy.png", dpi=100))
    return paths


def _html(path: Path, name: str, report, texts, ids, tok, layers, color_layer: int, pngs: list[Path]) -> Path:
    from matplotlib import colormaps

    from headlens.io.files import atomic_path

    r = next(x for x in layers if x.layer == color_layer)
    top = r.indices[range(len(r.indices)), r.weights.argmax(-1)].tolist()
    cmap = colormaps["tab20"]
    colors = ["#%02x%02x%02x" % tuple(int(255 * c) for c in cmap(e % 20)[:3]) for e in range(report.experts)]
    spans, t = [], 0
    for n, seq in enumerate(ids):
        parts = []
        for tid in seq:
            e = top[t]
            w = float(r.weights[t].max())
            piece = html.escape(tok.decode([tid]))
            parts.append(f'<span style="background:{colors[e]}" title="token {t}: expert {e} (weight {w:.3f})">'
                         f"{piece}</span>")
            t += 1
        spans.append(f"<p class=\"text\">{''.join(parts)}</p>")
    legend = "".join(f'<span class="key" style="background:{colors[e]}">expert {e}</span>'
                     for e in range(report.experts))
    imgs = "".join(f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}">' for p in pngs)
    rows = "".join(f"<tr><td>{s.layer}</td><td>{s.load_cv:.3f}</td><td>{s.load_max_over_mean:.2f}</td>"
                   f"<td>{len(s.dead_experts)}</td><td>{s.load_entropy_norm:.3f}</td>"
                   f"<td>{s.routing_entropy_norm:.3f}</td><td>{s.repeat_consecutive:.3f}</td></tr>"
                   for s in report.stats)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(name)} router</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} .text{{line-height:1.9}}
.text span{{padding:1px 0;border-radius:2px}} .key{{display:inline-block;margin:2px;padding:2px 6px;border-radius:3px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
img{{max-width:100%;display:block;margin:1em 0}}</style></head><body>
<h1>{html.escape(name)}: mixture-of-experts routing</h1>
<p>{len(report.moe_layers)} MoE layers, {report.experts} experts, top-{report.top_k}, scoring rule
<code>{html.escape(report.rule)}</code>, {report.tokens} tokens. Dense layers skipped: {report.dense_layers or 'none'}.</p>
<h2>Text coloured by each token's top expert at layer {color_layer}</h2>{legend}{''.join(spans)}
<h2>Per-layer statistics</h2><table><tr><th>layer</th><th>load CV</th><th>max/mean</th><th>dead</th>
<th>load entropy</th><th>routing entropy</th><th>consecutive overlap</th></tr>{rows}</table>
{imgs}</body></html>"""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
