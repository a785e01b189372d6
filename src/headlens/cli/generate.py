"""``headlens generate``: greedy text from the original model with DynamicCache and from the compressed model with
LatentCache, side by side: the two texts, the cache bytes per token, the decode speed, agreement and KL."""

from __future__ import annotations

import argparse
from pathlib import Path

from headlens.cli.common import command_parser, int_arg, model_source, with_flags
from headlens.errors import HeadlensError


def add_parser(sub) -> None:
    p = command_parser(sub, "generate", default_model="tiny-lm",
                       help="generate with the value-latent cache next to the original model and its cache",
                       description="Generate greedy tokens with the original model and transformers' DynamicCache, "
                                   "and with the compressed model and LatentCache (value latents stored in the "
                                   "cache); print both texts, the cache bytes per token measured from the cache "
                                   "tensors, decode tokens/s, greedy agreement and the teacher-forced KL.")
    p.add_argument("--compressed", metavar="DIR",
                   help="a `compress --save-model` directory: its exported model and latent factors (the original "
                        "is the checkpoint it records, or the model flags' when given)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", metavar="TEXT", action="append",
                   help="a prompt (repeat for several; default: the openings of the embedded model's shipped eval "
                        "texts)")
    g.add_argument("--prompt-file", metavar="FILE", help="prompts, one per line")
    p.add_argument("--max-new-tokens", type=int_arg, default=32, metavar="N",
                   help="greedy tokens per prompt (default 32)")
    p.add_argument("--k", type=int_arg, metavar="K",
                   help="without --compressed: compress here with latents of K numbers per kv group "
                        "(default head_dim / 4)")
    p.add_argument("--latent", choices=("plain", "data-aware"),
                   help="without --compressed: plain (from the weights, default) or data-aware latents")
    p.add_argument("--layers", metavar="SEL", help="without --compressed: layers to compress (default all)")
    p.add_argument("--calib", metavar="FILE",
                   help="calibration texts for --latent data-aware, one per line (default for the embedded "
                        "models: texts shipped with headlens)")
    p.add_argument("--out-dir", default="headlens-out/generate", metavar="DIR", help="default headlens-out/generate")
    p.add_argument("--json", default=None, metavar="PATH", help="the JSON (default <out-dir>/generate.json)")
    p.set_defaults(func=cmd_generate)


def _prompts(args) -> list[str] | None:
    if args.prompt_file:
        from headlens.io.files import read_text_lines

        return read_text_lines(args.prompt_file, "prompt_file")
    if args.prompt is not None:
        for text in args.prompt:
            if not text.strip():
                raise HeadlensError("--prompt is empty")
        return list(args.prompt)
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    from headlens.compress.generate import GenerateConfig, run_generate
    from headlens.io.files import check_writable_dir
    from headlens.report.generate import GENERATE_JSON, generate_lines, write_generate

    calib = None
    if args.calib:
        from headlens.io.files import read_text_lines

        calib = read_text_lines(args.calib, "calib")
    cfg = GenerateConfig(prompts=_prompts(args), max_new_tokens=args.max_new_tokens, compressed=args.compressed,
                         k=args.k, latent=args.latent, layers=args.layers, calib_texts=calib, dtype=args.dtype,
                         device=args.device if args.compressed else None)
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    named = args.model is not None or args.weights is not None or args.hf_repo is not None
    if args.compressed and not named:
        given = [f for f, v in (("--device-map", args.device_map), ("--max-memory", args.max_memory),
                                ("--offload-dir", args.offload_dir)) if v is not None]
        if given:
            raise HeadlensError(f"{given[0]} places the model the model flags name: with --compressed alone (the "
                                "original it records) choose --device, or name the original with --weights, "
                                "--hf-repo or --model")
    source = model_source(args) if named or args.compressed is None else None
    result = run_generate(source, cfg)
    path = write_generate(result, Path(args.json) if args.json else out_dir / GENERATE_JSON)
    notes = [f"note: {with_flags(n, 'generate')}" for n in result.notes]
    print("\n".join([*notes, *generate_lines(result), f"saved -> {path}"]))
    return 0
