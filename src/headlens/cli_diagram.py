"""``headlens diagram``: print the model, then draw one decoder layer (PNG and Mermaid) and say what to hook."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from headlens.errors import HeadlensError


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("diagram", help="print the model and draw one decoder layer: modules, norms, skip connections",
                       description="Print the model as print(model) does, then derive one decoder layer's structure "
                                   "from a traced forward (modules in order with their shapes, the norms, where each "
                                   "skip connection branches off and joins back), save it as PNG and Mermaid, and "
                                   "say which module and hook capture each residual site.")
    add_model_args(p)
    p.add_argument("--layer", type=_int, default=0, help="layer index (default 0)")
    p.add_argument("--out-dir", default="headlens-out", metavar="DIR",
                   help="directory for the PNG, the Mermaid text and JSON (default headlens-out)")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="write the layer graph as JSON; without PATH: <out-dir>/<model>_layer<L>_diagram.json")
    p.set_defaults(func=cmd_diagram)


def diagram_stem(model_name: str, layer: int) -> str:
    """``<model>_layer<L>_diagram``, the name sanitised as ``headlens ov`` does."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name) or "model"
    return f"{safe}_layer{layer}_diagram"


def load_model(directory: Path, dtype, trust_remote_code: bool = False):
    """The base HuggingFace model (a diagram needs no tokenizer)."""
    from headlens import capture

    loader = getattr(capture, "load_model", None)
    if loader is not None:
        return loader(directory, dtype, trust_remote_code=trust_remote_code)
    model, _tokenizer = capture.load_hf_model(directory, dtype, trust_remote_code=trust_remote_code)
    return model


def cmd_diagram(args: argparse.Namespace) -> int:
    from headlens.diagram import build_layer_graph, hook_guide, save_diagram_png, save_mermaid, summary_lines
    from headlens.fileio import ensure_dir, write_json
    from headlens.heads import check_layer_head
    from headlens.loading import cast_dtype, open_model

    dtype = cast_dtype(args.dtype)
    ck = open_model(weights=args.weights, hf_repo=args.hf_repo, revision=args.revision, cache_dir=args.cache_dir,
                    auto_infer=args.auto_infer, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                    full=True)
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

    model = load_model(ck.directory, dtype, trust_remote_code=args.trust_remote_code)
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
        from headlens.diagram import hook_sites

        files["json"] = str(json_path)
        data = {"model": ck.describe(), "graph": graph.to_json(),
                "hooks": [vars(s) for s in hook_sites(model, ck.spec, graph)],
                "hook_guide": hook_guide(model, ck.spec, graph), "files": files}
        write_json(json_path, data)
        lines.append(f"saved json -> {json_path}")
    print("\n".join(lines))
    return 0
