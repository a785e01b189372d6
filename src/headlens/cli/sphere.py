"""``headlens sphere``: the residual stream of every layer, projected onto the unit sphere and animated."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from headlens.cli.common import model_source
from headlens.errors import HeadlensError
from headlens.selection import parse_layers
from headlens.prompts import NOTEBOOK_PROMPT

SPHERE_SITES = ("resid_pre", "resid_mid", "resid_post")


def add_parser(sub) -> None:
    from headlens.cli.common import add_model_args

    p = sub.add_parser("sphere", help="the residual stream of every layer on the unit sphere (GIF, HTML, metrics)",
                       description="Run a prompt, take each layer's residual stream, project it by PCA onto 3 "
                                   "components and the unit sphere, animate the layers, and measure clustering.")
    add_model_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", metavar="TEXT", help="text to run (default: the notebook's prompt)")
    g.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a text file")
    g.add_argument("--traces", metavar="FILE",
                   help="animate a toy model's traced residual stream (headlens toy trace) instead of running a model")
    p.add_argument("--truncate", action="store_true", help="cut a prompt longer than the model's positions")
    p.add_argument("--layers", metavar="SEL", help="layers to show: 7:35 (slice), 1,4,9, or all (default)")
    p.add_argument("--site", choices=SPHERE_SITES, default="resid_pre",
                   help="residual site per layer (default resid_pre, the decoder layer's input)")
    p.add_argument("--align", action=argparse.BooleanOptionalAction, default=True,
                   help="align each layer's 3-D basis to the previous one (default on)")
    p.add_argument("--basis", choices=("layer", "global"), default="layer",
                   help="PCA per layer (default) or one basis fitted on all selected layers")
    p.add_argument("--drop-first", action="store_true", help="leave out the first token (attention sink)")
    p.add_argument("--drop-outliers", action="store_true",
                   help="leave out tokens whose norm is more than --outlier-factor x the layer's median")
    p.add_argument("--outlier-factor", type=float, default=8.0, metavar="X", help="outlier threshold (default 8)")
    p.add_argument("--cluster-threshold", type=float, default=0.9, metavar="COS",
                   help="cosine threshold for counting clusters (default 0.9)")
    p.add_argument("--frame-seconds", type=float, default=1.0, metavar="S", help="GIF seconds per frame (default 1)")
    p.add_argument("--no-labels", action="store_true", help="draw the points without token labels in the GIF")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="frame-rendering processes (default: cores)")
    p.add_argument("--half", action="store_true", help="store the captured residual stream in float16")
    p.add_argument("--out-dir", default="headlens-out", metavar="DIR", help="output directory (default headlens-out)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="full result (points, metrics, tokens) as JSON (default <out-dir>/sphere.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-direction baseline")
    p.set_defaults(func=cmd_sphere)


def read_prompt(args) -> str:
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise HeadlensError(f"--prompt-file {args.prompt_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise HeadlensError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
    else:
        text = NOTEBOOK_PROMPT if args.prompt is None else args.prompt
    if not text.strip():
        raise HeadlensError("the prompt is empty" + (f" ({args.prompt_file})" if args.prompt_file else ""))
    return text


def cmd_sphere(args: argparse.Namespace) -> int:
    from headlens.io.files import check_writable_dir
    from headlens.io.checkpoint import cast_dtype
    from headlens.report.sphere_frames import start_pool

    prompt = read_prompt(args) if not args.traces else ""
    if args.frame_seconds <= 0:
        raise HeadlensError(f"--frame-seconds must be positive, got {args.frame_seconds:g}")
    if not -1.0 <= args.cluster_threshold <= 1.0:
        raise HeadlensError(f"--cluster-threshold must be a cosine in [-1, 1], got {args.cluster_threshold:g}")
    if args.outlier_factor <= 1.0:
        raise HeadlensError(f"--outlier-factor must be above 1, got {args.outlier_factor:g}")
    if args.workers is not None and args.workers < 1:
        raise HeadlensError(f"--workers must be at least 1, got {args.workers}")
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)  # created only when the first file is written
    dtype = cast_dtype(args.dtype)
    if args.traces:
        return _run_traces(args, out_dir)
    from headlens.residual.capture import max_positions, prompt_ids

    source = model_source(args)
    ck = source.checkpoint(full=True)
    layers = parse_layers(args.layers, ck.shape.num_layers)
    if ck.directory is None or ck.config is None:
        raise HeadlensError("sphere runs the model: pass --weights DIR (a HuggingFace model directory with "
                            "config.json and tokenizer) or --hf-repo, not a bare state dict")
    spec = ck.spec
    if args.site == "resid_mid" and (not spec.mid_input or (spec.parallel_flag and ck.config.get(spec.parallel_flag))):
        raise HeadlensError(f"{spec.family} layers add attention and MLP to the same stream in parallel: there is "
                            "no resid_mid; use --site resid_pre or resid_post")
    # Everything that can be checked without the weights is checked before loading them.
    tokenizer = source.tokenizer(ck.directory)
    ids, tokens = prompt_ids(tokenizer, prompt, max_positions(ck.config), truncate=args.truncate)
    # Renderer processes start now: their plotting imports overlap loading and running the model.
    pool = start_pool(args.workers)
    try:
        return _run(args, source, ck, layers, prompt, ids, tokens, dtype, out_dir, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _run(args, source, ck, layers, prompt, ids, tokens, dtype, out_dir, pool) -> int:
    import torch

    from headlens.residual.capture import record_sites

    model = source.model(ck.directory, dtype)
    with torch.no_grad(), record_sites(model, ck.spec, (args.site,), layers,
                                       store_dtype=torch.float16 if args.half else None) as rec:
        model(input_ids=ids.to(model.device))  # the one forward pass
    if args.site in rec.missing:
        raise HeadlensError(rec.missing[args.site] + "; use --site resid_pre or resid_post")
    hidden = {layer: rec.values[args.site][layer][0] for layer in layers}  # (N, d) each
    header = (f"{ck.name}: {len(tokens)} tokens, {len(layers)} of {ck.shape.num_layers} layers; site {args.site}: "
              f"{rec.hooks[args.site]}")
    return project_and_write(args, ck.name, ck.describe(), header, hidden, tokens, prompt, out_dir, pool)


def _run_traces(args, out_dir: Path) -> int:
    """Frames from a toy trace file: the residual stream entering each layer, and leaving the last one."""
    from headlens.report.sphere_frames import start_pool
    from headlens.toy.stack import load_traces

    meta, tensors = load_traces(args.traces)
    n = int(meta["layers"])
    stream = {l: tensors[f"layer{l}.input"] for l in range(n)}
    stream[n] = tensors[f"layer{n - 1}.output"]
    layers = parse_layers(args.layers, n + 1)
    hidden = {l: stream[l].double() for l in layers}
    tokens = [f"t{i}" for i in range(int(meta["tokens"]))]
    name = Path(args.traces).name.removesuffix(".safetensors").removesuffix(".json")
    header = (f"{name}: {len(tokens)} traced tokens, {len(layers)} of {n + 1} stream states (layer inputs, then the "
              f"last layer's output) from {args.traces}")
    pool = start_pool(args.workers)
    try:
        return project_and_write(args, name, {"name": name, "source": str(args.traces), **meta.get("config", {})},
                                 header, hidden, tokens, "", out_dir, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def project_and_write(args, name: str, describe: dict, header: str, hidden: dict, tokens: list[str], prompt: str,
                      out_dir: Path, pool) -> int:
    """Project ``hidden`` ({layer: (N, d)}) on the sphere and write the GIF, page, metrics and JSON."""
    from tqdm.auto import tqdm

    from headlens.io.files import atomic_path, write_json
    from headlens.residual.sphere import SphereConfig, project
    from headlens.report.sphere_html import write_sphere_html
    from headlens.report.sphere_frames import Deferred, render_frame, write_gif, write_metrics_png

    cfg = SphereConfig(align=args.align, basis=args.basis, drop_first=args.drop_first,
                       drop_outliers=args.drop_outliers, outlier_factor=args.outlier_factor,
                       cluster_threshold=args.cluster_threshold, seed=args.seed)
    result = project(hidden, tokens, cfg)

    lines = [header]
    for o in result.outliers:
        action = "dropped" if o.position in result.dropped else "kept; --drop-outliers leaves it out"
        lines.append(f"outlier: token {o.position} {o.token!r} has norm {o.norm:.1f} at layer {o.layer}, "
                     f"{o.max_ratio:.0f}x the layer's median ({action})")
    for f, m in zip(result.frames, result.metrics):
        ev = f.explained_variance
        lines.append(f"layer {f.layer:3d}: PCA-3 explains {ev.sum():6.1%} (PC1 {ev[0]:.1%}, PC2 {ev[1]:.1%}, "
                     f"PC3 {ev[2]:.1%})  mean cos {m.mean_cos:.3f}  clusters {m.n_clusters}  "
                     f"eff. rank {m.effective_rank:.1f}")
    if cfg.align and cfg.basis == "layer" and len(result.frames) > 1:
        lines.append(f"alignment: movement between frames {result.movement_unaligned:.1f} -> "
                     f"{result.movement_aligned:.1f} (sum of squared displacements on the sphere)")
    print("\n".join(lines), flush=True)

    title = f"{name} {args.site}"
    jobs = [{"points": f.points, "tokens": [tokens[i] for i in f.kept], "positions": f.kept.tolist(),
             "title": f"{title} layer {f.layer}: PCA-3 explains {f.explained_total:.1%} of variance",
             "labels": not args.no_labels} for f in result.frames]
    metrics = result.to_json()["metrics"]
    mpng = out_dir / "sphere_metrics.png"
    mpng_args = (mpng, metrics, cfg.cluster_threshold,
                 f"{name}: clustering of the normalised tokens through depth ({args.site})")
    # Worker processes draw the frames and the metrics plot while this process writes the page and tables.
    frame_calls = [Deferred(pool, render_frame, job) for job in jobs]
    metrics_call = Deferred(pool, write_metrics_png, *mpng_args)
    frames_html = [{"layer": f.layer, "points": f.points, "tokens": [tokens[i] for i in f.kept],
                    "positions": f.kept.tolist(), "norms": f.norms3, "full_norms": f.full_norms,
                    "explained_variance": f.explained_total, "site": args.site} for f in result.frames]
    html = write_sphere_html(out_dir / "tokens.html", frames_html, title=f"{name}: {args.site} on the unit sphere",
                             metrics=metrics)
    mjson = write_json(out_dir / "sphere_metrics.json", {"model": describe, "site": args.site,
                                                         "metrics": metrics, "summary": result.summary})
    mcsv = out_dir / "sphere_metrics.csv"
    with atomic_path(mcsv) as tmp:
        tmp.write_text(_metrics_csv(metrics), encoding="utf-8")
    full = Path(args.json) if args.json else out_dir / "sphere.json"
    write_json(full, {"model": describe, "site": args.site, "prompt": prompt, **result.to_json()})
    with tqdm(total=len(jobs), desc="rendering frames", unit="frame", file=sys.stderr, disable=None) as bar:
        pngs = []
        for call in frame_calls:  # in layer order
            pngs.append(call.result())
            bar.update(1)
    gif = write_gif(out_dir / "tokens.gif", pngs, args.frame_seconds)
    metrics_call.result()
    out = [f"saved gif -> {gif}", f"saved html -> {html}", f"saved metrics plot -> {mpng}",
           f"saved metrics -> {mjson}", f"saved metrics csv -> {mcsv}", f"saved json -> {full}"]
    print("\n".join(out + result.summary))
    return 0




def _metrics_csv(metrics: list[dict]) -> str:
    cols = ["layer", "n_tokens", "mean_cos", "q05", "q25", "q50", "q75", "q95", "n_clusters", "largest_cluster",
            "effective_rank", "baseline_mean_cos", "baseline_effective_rank", "anisotropy", "mean_norm",
            "explained_variance_3"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for m in metrics:
        row = {**m, **m["cos_quantiles"]}
        w.writerow([row[c] if not isinstance(row[c], float) else f"{row[c]:.6g}" for c in cols])
    return buf.getvalue()
