"""``headlens sphere``: the residual stream of every layer, projected onto the unit sphere and animated."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from headlens.cli.common import command_parser, model_source
from headlens.errors import HeadlensError
from headlens.prompts import NOTEBOOK_PROMPT
from headlens.selection import LABEL_CHOICES

if TYPE_CHECKING:
    from headlens.residual.sphere import SphereConfig

SPHERE_SITES = ("resid_pre", "resid_mid", "resid_post")  # residual.sphere.SPHERE_SITES (torch-free here)


def add_parser(sub) -> None:
    p = command_parser(sub, "sphere", help="the residual stream of every layer on the unit sphere (GIF, HTML, metrics)",
                       description="Run a prompt, take each layer's residual stream, project it by PCA onto 3 "
                                   "components and the unit sphere, animate the layers, and measure clustering.")
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
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labels", choices=LABEL_CHOICES, default="auto",
                   help="token labels in the GIF: auto (default: the first token, the outliers and up to 120 others "
                        "that fit without overlapping), all (every token), none")
    g.add_argument("--no-labels", action="store_const", dest="labels", const="none", help="same as --labels none")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="frame-rendering processes (default: cores)")
    p.add_argument("--half", action="store_true", help="store the captured residual stream in float16")
    p.add_argument("--out-dir", default="headlens-out", metavar="DIR", help="output directory (default headlens-out)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="full result (points, metrics, tokens) as JSON (default <out-dir>/sphere.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-direction baseline")
    p.set_defaults(func=cmd_sphere)


def read_prompt(args) -> str:
    if args.prompt_file:
        from headlens.io.files import read_text

        text = read_text(args.prompt_file, "prompt_file")  # one prompt: the whole file, line ends as stored
    else:
        text = NOTEBOOK_PROMPT if args.prompt is None else args.prompt
    if not text.strip():
        raise HeadlensError("the prompt is empty" + (f" ({args.prompt_file})" if args.prompt_file else ""))
    return text


def sphere_config(args: argparse.Namespace, prompt: str | None) -> SphereConfig:
    """The :class:`~headlens.residual.sphere.SphereConfig` the flags describe."""
    from headlens.residual.sphere import SphereConfig

    return SphereConfig(align=args.align, basis=args.basis, drop_first=args.drop_first,
                        drop_outliers=args.drop_outliers, outlier_factor=args.outlier_factor,
                        cluster_threshold=args.cluster_threshold, seed=args.seed, prompt=prompt,
                        truncate=args.truncate, layers=args.layers, site=args.site, dtype=args.dtype, half=args.half,
                        frame_seconds=args.frame_seconds, labels=args.labels, workers=args.workers)


def cmd_sphere(args: argparse.Namespace) -> int:
    from headlens.io.files import check_writable_dir
    from headlens.report.sphere import sphere_lines, write_sphere_outputs
    from headlens.report.sphere_frames import RendererPool
    from headlens.residual.sphere import sphere_from_model
    from headlens.toy.traces import sphere_from_traces

    if args.traces and args.device_map is not None:
        raise HeadlensError("--device-map places the modules of a loaded model, but --traces reads a trace file and "
                            "loads none: leave it out")
    cfg = sphere_config(args, read_prompt(args) if not args.traces else None)
    cfg.check()
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)  # created only when the first file is written
    # Renderer processes start once the cheap checks pass: their imports overlap loading and running the model.
    with RendererPool(cfg.workers) as pool:
        if args.traces:
            result = sphere_from_traces(args.traces, cfg, on_checked=pool.start)
        else:
            result = sphere_from_model(model_source(args), cfg, on_checked=pool.start)
        print("\n".join(sphere_lines(result)), flush=True)
        files = write_sphere_outputs(result, out_dir, json_path=args.json, pool=pool.executor)
        print("\n".join(files.lines() + result.summary))
    return 0
