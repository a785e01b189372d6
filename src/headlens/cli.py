"""Command line: a thin layer that builds configs, calls the library and writes files.

``main(argv) -> int`` so tests run the CLI in-process. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from headlens import __version__
from headlens.errors import HeadlensError

DTYPES = ("float32", "float64", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump) and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_or_any_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags every command shares to pick a checkpoint."""
    g = p.add_argument_group("model (default: the embedded all-MiniLM-L6-v2 checkpoint)")
    g.add_argument("--weights", metavar="PATH",
                   help="a .safetensors file, a .pt/.bin state dict, or a HuggingFace model directory "
                        "(single-file or sharded)")
    g.add_argument("--hf-repo", metavar="ORG/NAME",
                   help="a hub repo read through the local hub cache, e.g. Qwen/Qwen3-0.6B "
                        "(honours HF_HUB_OFFLINE; downloads only the files needed)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) for --hf-repo")
    g.add_argument("--cache-dir", metavar="DIR", help="hub cache directory (default: HF_HUB_CACHE)")
    g.add_argument("--auto-infer", action="store_true",
                   help="read layers, heads, kv heads, head_dim and hidden size from config.json")
    g.add_argument("--num-heads", type=_positive_or_any_int, metavar="H",
                   help="query heads, for a bare state dict without config.json")
    g.add_argument("--num-kv-heads", type=_positive_or_any_int, metavar="G",
                   help="key/value heads (GQA/MQA), for a bare state dict; inferred from shapes if omitted")
    g.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="precision the weights are rounded to and the model runs in (default float32); "
                        "spectra are always accumulated in float64")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub repo's own modeling code (off unless you ask for it)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="headlens", description="Open up the attention heads and the residual stream of "
                                                  "transformer checkpoints.")
    parser.add_argument("--version", action="version", version=f"headlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ov = sub.add_parser("ov", help="one head's OV circuit: rank, spectrum, latent-cache error, heatmap",
                        description="Isolate one attention head, build its OV circuit W_OV = W_O^h W_V^g, "
                                    "report its spectrum and the error of a rank-k latent cache.")
    add_model_args(ov)
    ov.add_argument("--layer", type=_positive_or_any_int, default=0, help="layer index (default 0)")
    ov.add_argument("--head", type=_positive_or_any_int, default=0, help="query head index (default 0)")
    ov.add_argument("--latent-dim", type=_positive_or_any_int, default=None, metavar="K",
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
    ov.add_argument("--probe-tokens", type=_positive_or_any_int, default=2048, metavar="N",
                    help="Gaussian probe tokens for cache_error when there is no prompt (default 2048)")
    ov.add_argument("--seed", type=int, default=0, help="seed of the Gaussian probes (default 0)")
    ov.set_defaults(func=cmd_ov)

    from headlens.cli_sphere import add_parser as add_sphere_parser

    add_sphere_parser(sub, add_model_args)

    from headlens.cli_sweep import add_parser as add_sweep_parser

    add_sweep_parser(sub, add_model_args)

    from headlens.cli_router import add_parser as add_router_parser

    add_router_parser(sub, add_model_args)

    from headlens.cli_toy import add_parser as add_toy_parser

    add_toy_parser(sub, add_model_args)
    from headlens.cli_diagram import add_parser as add_diagram_parser
    add_diagram_parser(sub, add_model_args)
    return parser


def cmd_ov(args: argparse.Namespace) -> int:
    from headlens.capture import capture_layer, load_model, load_tokenizer, max_positions, prompt_ids
    from headlens.fileio import check_writable_dir, write_json
    from headlens.loading import cast_dtype, open_model
    from headlens.ov import OVConfig, analyze_ov, default_stem, extra_lines, report_lines

    if args.heatmap and not (args.prompt or args.traces):
        raise HeadlensError("--heatmap needs --prompt TEXT (the tokens to draw attention over)")
    if args.prompt is not None and not args.prompt.strip():
        raise HeadlensError("--prompt is empty")
    if args.latent_dim is not None and args.latent_dim <= 0:
        raise HeadlensError(f"--latent-dim must be positive, got {args.latent_dim}")
    dtype = cast_dtype(args.dtype)
    ck = open_model(weights=args.weights, hf_repo=args.hf_repo, revision=args.revision, cache_dir=args.cache_dir,
                    auto_infer=args.auto_infer, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                    layers=[args.layer], full=bool(args.prompt))
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
            tokenizer = load_tokenizer(ck.directory, trust_remote_code=args.trust_remote_code)
            prompt_ids(tokenizer, args.prompt, max_positions(ck.config or {}), truncate=args.truncate)  # fail early
            model = load_model(ck.directory, dtype, trust_remote_code=args.trust_remote_code)
            return capture_layer(model, tokenizer, ck.spec, args.layer, args.prompt, want_probs=args.heatmap,
                                 truncate=args.truncate)

    if args.traces:
        def capture_fn():
            from headlens.capture import PromptCapture
            from headlens.toy import load_traces

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
        from headlens.plotting import save_spectrum_plot

        title = f"{ck.name} layer {args.layer} head {args.head}: W_OV spectrum (rank {result.rank})"
        save_spectrum_plot(plot_path, result.singular_values, result.cumulative_energy, result.latent_dim, title,
                           rank=result.rank)
        result.files["plot"] = str(plot_path)
        lines.append(f"saved plot -> {plot_path}")
    if args.heatmap:
        import numpy as np

        from headlens.plotting import save_attention_heatmap

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        names = ", ".join(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
        print(f"headlens: error: choose a command: {names} (see headlens --help)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except HeadlensError as exc:
        print(f"headlens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headlens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `headlens ... | head`: the reader left, nothing is wrong
        import os

        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
