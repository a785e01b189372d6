"""``headlens ov``: one head's OV circuit, its spectrum, the latent-cache error and the heatmap."""

from __future__ import annotations

import argparse
from pathlib import Path

from headlens.cli.common import command_parser, int_arg, model_source


def add_parser(sub) -> None:
    ov = command_parser(sub, "ov", help="one head's OV circuit: rank, spectrum, latent-cache error, heatmap",
                       description="Isolate one attention head, build its OV circuit W_OV = W_O^h W_V^g, "
                                    "report its spectrum and the error of a rank-k latent cache.")
    ov.add_argument("--layer", type=int_arg, default=0, help="layer index (default 0)")
    ov.add_argument("--head", type=int_arg, default=0, help="query head index (default 0)")
    ov.add_argument("--latent-dim", type=int_arg, default=None, metavar="K",
                    help="latent size k for rel_error/cache_error (default min(32, rank))")
    ov.add_argument("--circuit", choices=("ov", "qk", "both"), default="ov",
                    help="which circuit: ov (W_O^h W_V^g, default), qk ((W_Q^h)^T W_K^g, the bilinear form of the "
                         "logits at relative position 0), or both")
    ov.add_argument("--fold-norm", action="store_true",
                    help="fold the pre-attention norm's gain into the input side: W_OV diag(gamma) "
                         "(and W_Q, W_K for the QK circuit)")
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
    ov.set_defaults(func=cmd_ov, writes_out_dir=writes_out_dir)


def writes_out_dir(args: argparse.Namespace) -> bool:
    """Whether this run writes into ``--out-dir`` (and so locks it): a plot, heatmap or JSON at its default place.
    Without them ``ov`` only prints, and runs side by side with anything."""
    return bool(((args.plot or args.heatmap) and not args.plot_path) or args.json == "")


def cmd_ov(args: argparse.Namespace) -> int:
    from headlens.circuits.ov import OVConfig, analyze_head, open_head
    from headlens.io.files import check_writable_dir
    from headlens.report.ov import OVFiles, write_ov_outputs

    source = model_source(args)
    cfg = OVConfig(layer=args.layer, head=args.head, latent_dim=args.latent_dim, fold_norm=args.fold_norm,
                   dtype=source.dtype(args.dtype), prompt=args.prompt, traces=args.traces, heatmap=args.heatmap,
                   truncate=args.truncate, probe_tokens=args.probe_tokens, seed=args.seed,
                   circuit=args.circuit)
    ck = open_head(source, cfg)  # opened first, so that the files are named and checked before any work
    files = OVFiles.choose(ck.name, args.layer, args.head, Path(args.out_dir), plot=args.plot,
                           plot_path=args.plot_path, heatmap=args.heatmap, json=args.json)
    for directory in files.directories():
        check_writable_dir(directory)
    result = analyze_head(source, cfg, checkpoint=ck)
    print("\n".join(write_ov_outputs(result, files)))
    return 0
