"""``headlens diagram``: print the model, then draw one decoder layer (PNG and Mermaid) and say what to hook."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from headlens.cli.common import int_arg, model_source
from headlens.errors import HeadlensError


def add_parser(sub) -> None:
    from headlens.cli.common import add_model_args

    p = sub.add_parser("diagram", help="print the model and draw one decoder layer: modules, norms, skip connections",
                       description="Print the model as print(model) does, then derive one decoder layer's structure "
                                   "from a traced forward (modules in order with their shapes, the norms, where each "
                                   "skip connection branches off and joins back), save it as PNG and Mermaid, and "
                                   "say which module and hook capture each residual site.")
    add_model_args(p)
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


def cmd_diagram(args: argparse.Namespace) -> int:
    from headlens.residual.diagram import build_layer_graph, hook_guide, save_diagram_png, save_mermaid, summary_lines
    from headlens.io.files import ensure_dir, write_json
    from headlens.circuits.heads import check_layer_head
    from headlens.io.checkpoint import cast_dtype

    dtype = cast_dtype(args.dtype)
    source = model_source(args)
    ck = source.checkpoint(full=True)
    check_layer_head(ck, args.layer)
    if ck.directory is None or not (ck.directory / "config.json").exists():
        raise HeadlensError("a diagram runs the model, so it needs a HuggingFace model directory with config.json: "
                            "pass --weights DIR or --hf-repo, not a bare state dict")
    out_dir = Path(args.out_dir)
    stem = diagram_stem(ck.name, args.layer)
    png_path = out_dir / f"{stem}.png"
    mmd_path = out_dir / f"{stem}.mmd"
    json_path = None if args.json is None else (Path(args.json) if args.json else out_dir / f"{stem}.json")
    ensure_dir(out_dir)
    if json_path is not None:
        ensure_dir(json_path.parent if str(json_path.parent) else Path("."))

    model = source.model(ck.directory, dtype)
    graph = build_layer_graph(model, ck.spec, args.layer)
    lines = [str(model), ""]
    lines += summary_lines(graph)
    lines += hook_guide(model, ck.spec, graph)
    files = {"png": str(png_path), "mermaid": str(mmd_path)}
    save_diagram_png(graph, png_path)
    lines.append(f"saved diagram -> {png_path}")
    save_mermaid(graph, mmd_path)
    lines.append(f"saved mermaid -> {mmd_path}")
    if json_path is not None:
        from headlens.residual.diagram import hook_sites

        files["json"] = str(json_path)
        data = {"model": ck.describe(), "graph": graph.to_json(),
                "hooks": [vars(s) for s in hook_sites(model, ck.spec, graph)],
                "hook_guide": hook_guide(model, ck.spec, graph), "files": files}
        write_json(json_path, data)
        lines.append(f"saved json -> {json_path}")
    print("\n".join(lines))
    return 0
