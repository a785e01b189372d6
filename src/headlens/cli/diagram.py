"""``headlens diagram``: print the model, then draw one decoder layer (PNG and Mermaid) and say what to hook."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from headlens.cli.common import command_parser, int_arg, model_source


def add_parser(sub) -> None:
    p = command_parser(sub, "diagram", help="print the model and draw one decoder layer: modules, norms, skip connections",
                       description="Print the model as print(model) does, then derive one decoder layer's structure "
                                   "from a traced forward (modules in order with their shapes, the norms, where each "
                                   "skip connection branches off and joins back), save it as PNG and Mermaid, and "
                                   "say which module and hook capture each residual site.")
    p.add_argument("--layer", type=int_arg, default=0, help="layer index (default 0)")
    p.add_argument("--out-dir", default="headlens-out", metavar="DIR",
                   help="directory for the PNG, the Mermaid text and JSON (default headlens-out)")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="write the layer graph as JSON; without PATH: <out-dir>/<model>_layer<L>_diagram.json")
    p.set_defaults(func=cmd_diagram)


def diagram_stem(model_name: str, layer: int) -> str:
    """``<model>_layer<L>_diagram``, the name sanitised as ``headlens ov`` does."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name) or "model"
    return f"{safe}_layer{layer}_diagram"


def _paths(args: argparse.Namespace, model_name: str) -> tuple[Path, Path, Path | None]:
    """(PNG, Mermaid, JSON or None) paths for the model called ``model_name``."""
    out_dir = Path(args.out_dir)
    stem = diagram_stem(model_name, args.layer)
    json_path = None if args.json is None else (Path(args.json) if args.json else out_dir / f"{stem}.json")
    return out_dir / f"{stem}.png", out_dir / f"{stem}.mmd", json_path


def cmd_diagram(args: argparse.Namespace) -> int:
    from headlens.io.files import ensure_dir
    from headlens.report.diagram import write_diagram_files
    from headlens.residual.tracing import trace_model_layer

    def make_dirs(ck) -> None:  # before the model loads: a bad --out-dir fails fast
        _png, _mmd, json_path = _paths(args, ck.name)
        ensure_dir(Path(args.out_dir))
        if json_path is not None:
            ensure_dir(json_path.parent if str(json_path.parent) else Path("."))

    result = trace_model_layer(model_source(args), args.layer, args.dtype, before_load=make_dirs)
    png_path, mmd_path, json_path = _paths(args, result.model_name)
    write_diagram_files(result, png_path, mmd_path, json_path)
    lines = result.lines()
    lines.append(f"saved diagram -> {png_path}")
    lines.append(f"saved mermaid -> {mmd_path}")
    if json_path is not None:
        lines.append(f"saved json -> {json_path}")
    print("\n".join(lines))
    return 0
