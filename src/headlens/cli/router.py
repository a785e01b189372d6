"""``headlens router``: mixture-of-experts router statistics, dispatch structure and a dump that reloads."""

from __future__ import annotations

import argparse
from pathlib import Path

from headlens.cli.common import command_parser, int_arg, model_source
from headlens.errors import HeadlensError


def add_parser(sub) -> None:
    p = command_parser(sub, "router", help="mixture-of-experts router statistics and dumps", default_model="tiny-moe",
                       description="Run text through a MoE checkpoint and report, per MoE layer, expert load, "
                                   "entropies, co-activation, repetition, layer-to-layer transitions and the "
                                   "token x expert dispatch structure.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", metavar="TEXT", help="text to route (default: the notebook's prompt)")
    g.add_argument("--prompt-file", metavar="FILE", help="one text per line (batched)")
    p.add_argument("--truncate", action="store_true", help="cut a text longer than the model's positions "
                                                           "(refused otherwise)")
    p.add_argument("--batch-size", type=int_arg, default=8, metavar="N", help="texts per forward (default 8)")
    p.add_argument("--color-layer", type=int_arg, default=None, metavar="L",
                   help="MoE layer whose top expert colours the text in the HTML page (default: the first)")
    p.add_argument("--out-dir", default="headlens-out/router", metavar="DIR", help="default headlens-out/router")
    p.set_defaults(func=cmd_router)


def _texts(args) -> list[str]:
    from headlens.prompts import NOTEBOOK_PROMPT

    if args.prompt_file:
        from headlens.io.files import read_text_lines

        return read_text_lines(args.prompt_file, "prompt_file")
    text = NOTEBOOK_PROMPT if args.prompt is None else args.prompt
    if not text.strip():
        raise HeadlensError("--prompt is empty")
    return [text]


def cmd_router(args: argparse.Namespace) -> int:
    from headlens.io.files import check_writable_dir
    from headlens.moe.router import RouterConfig, route
    from headlens.report.router import summary_lines, write_router_outputs

    texts = _texts(args)
    cfg = RouterConfig(batch_size=args.batch_size, color_layer=args.color_layer, dtype=args.dtype,
                       truncate=args.truncate)
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    result = route(model_source(args), texts, cfg)
    files = write_router_outputs(result, out_dir)
    print("\n".join(summary_lines(result, files)))
    return 0
