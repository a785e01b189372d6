"""``headlens ov``: one head's OV circuit, its spectrum, the latent-cache error and the heatmap."""

from __future__ import annotations

import argparse
from pathlib import Path

from headlens.cli.common import add_model_args, int_arg, model_source
from headlens.errors import HeadlensError


def add_parser(sub) -> None:
    ov = sub.add_parser("ov", help="one head's OV circuit: rank, spectrum, latent-cache error, heatmap",
                        description="Isolate one attention head, build its OV circuit W_OV = W_O^h W_V^g, "
                                    "report its spectrum and the error of a rank-k latent cache.")
    add_model_args(ov)
    ov.add_argument("--layer", type=int_arg, default=0, help="layer index (default 0)")
    ov.add_argument("--head", type=int_arg, default=0, help="query head index (default 0)")
    ov.add_argument("--latent-dim", type=int_arg, default=None, metavar="K",
                    help="latent size k for rel_error/cache_error (default min(32, rank))")
    ov.add_argument("--fold-norm", action="store_true",
                    help="fold the pre-attention norm's gain into the input side: W_OV diag(gamma)")
    src = ov.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT",
                     help="run this text and use the layer's real attention inputs for cache_error")
    src.add_argument("--traces", metavar="FILE",
                     help="use a toy trace file's attention inputs (headlens toy trace) for cache_error")
    ov.add_argument("--heatmap", action="store_true", help="draw this head's attention over --prompt")
    ov.add_argument("--truncate", action="store_true", help="cut a prompt longer than the model's positions")
    ov.add_argument("--plot", action="store_true", help="save the singular spectrum / cumulative energy plot")
    ov.add_argument("--plot-path", metavar="PNG", help="where to save the plot (implies --plot)")
    ov.add_argument("--out-dir", default="headlens-out", metavar="DIR",
                    help="directory for pictures and JSON (default headlens-out)")
    ov.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                    help="write every number (full spectrum included) as JSON; without PATH: "
                         "<out-dir>/<model>_layer<L>_head<H>.json")
    ov.add_argument("--probe-tokens", type=int_arg, default=2048, metavar="N",
                    help="Gaussian probe tokens for cache_error when there is no prompt (default 2048)")
    ov.add_argument("--seed", type=int, default=0, help="seed of the Gaussian probes (default 0)")
    ov.set_defaults(func=cmd_ov)


def cmd_ov(args: argparse.Namespace) -> int:
    from headlens.circuits.ov import OVConfig, analyze_ov, default_stem, extra_lines, report_lines

    if args.heatmap and not (args.prompt or args.traces):
        raise HeadlensError("--heatmap needs --prompt TEXT (the tokens to draw attention over)")
    if args.prompt is not None and not args.prompt.strip():
        raise HeadlensError("--prompt is empty")
    if args.latent_dim is not None and args.latent_dim <= 0:
        raise HeadlensError(f"--latent-dim must be positive, got {args.latent_dim}")
    from headlens.io.checkpoint import cast_dtype
    from headlens.io.files import check_writable_dir, write_json
    from headlens.residual.capture import capture_layer, max_positions, prompt_ids

    dtype = cast_dtype(args.dtype)
    source = model_source(args)
    ck = source.checkpoint(layers=[args.layer], full=bool(args.prompt))
    out_dir = Path(args.out_dir)
    stem = default_stem(ck.name, args.layer, args.head)
    want_plot = args.plot or args.plot_path is not None
    plot_path = Path(args.plot_path) if args.plot_path else out_dir / f"{stem}.png"
    heatmap_path = plot_path.with_name(plot_path.stem + "_heatmap.png") if args.plot_path \
        else out_dir / f"{stem}_heatmap.png"
    json_path = None if args.json is None else (Path(args.json) if args.json else out_dir / f"{stem}.json")
    for path, wanted in ((plot_path, want_plot), (heatmap_path, args.heatmap), (json_path, json_path is not None)):
        if wanted and path is not None:
            check_writable_dir(path.parent)

    capture_fn = None
    if args.prompt:
        def capture_fn():
            if ck.directory is None:
                raise HeadlensError("--prompt needs config.json and tokenizer files: pass --weights DIR (a "
                                    "HuggingFace model directory) or --hf-repo, not a bare state dict")
            tokenizer = source.tokenizer(ck.directory)
            prompt_ids(tokenizer, args.prompt, max_positions(ck.config or {}), truncate=args.truncate)  # fail early
            model = source.model(ck.directory, dtype)
            return capture_layer(model, tokenizer, ck.spec, args.layer, args.prompt, want_probs=args.heatmap,
                                 truncate=args.truncate)

    if args.traces:
        def capture_fn():
            from headlens.residual.capture import PromptCapture
            from headlens.toy.stack import load_traces

            meta, tensors = load_traces(args.traces)
            key = f"layer{args.layer}.attn_in"
            if key not in tensors:
                raise HeadlensError(f"--traces {args.traces} has no layer {args.layer} (it traced {meta.get('layers')} "
                                    "layers)")
            n = tensors[key].shape[0]
            return PromptCapture(input_ids=list(range(n)), tokens=[f"t{i}" for i in range(n)],
                                 attn_input=tensors[key], attn_probs=tensors.get(f"layer{args.layer}.probs"))

    cfg = OVConfig(layer=args.layer, head=args.head, latent_dim=args.latent_dim, fold_norm=args.fold_norm,
                   dtype=dtype, prompt=args.prompt, traces=args.traces, heatmap=args.heatmap,
                   probe_tokens=args.probe_tokens, seed=args.seed)
    result = analyze_ov(ck, cfg, capture_fn=capture_fn)

    lines = report_lines(result)
    if want_plot:
        from headlens.report.figures import save_spectrum_plot

        title = f"{ck.name} layer {args.layer} head {args.head}: W_OV spectrum (rank {result.rank})"
        save_spectrum_plot(plot_path, result.singular_values, result.cumulative_energy, result.latent_dim, title,
                           rank=result.rank)
        result.files["plot"] = str(plot_path)
        lines.append(f"saved plot -> {plot_path}")
    if args.heatmap:
        import numpy as np

        from headlens.report.figures import save_attention_heatmap

        assert result.attention is not None and result.tokens is not None
        title = f"{ck.name} layer {args.layer} head {args.head} (kv head {result.kv_head}): attention"
        save_attention_heatmap(heatmap_path, np.asarray(result.attention), result.tokens, title)
        result.files["heatmap"] = str(heatmap_path)
        lines.append(f"saved heatmap -> {heatmap_path}")
    lines.extend(extra_lines(result))
    if json_path is not None:
        result.files["json"] = str(json_path)
        write_json(json_path, result.to_json())
        lines.append(f"saved json -> {json_path}")
    print("\n".join(lines))
    return 0


