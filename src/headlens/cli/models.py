"""``headlens models``: the embedded models, their shapes and where they came from."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the embedded models (--model NAME): shapes and provenance",
                       description="List the models that ship with headlens and can be chosen with --model: "
                                   "architecture, layers, heads, kv heads, head_dim, parameters, and for the "
                                   "models trained here the corpus, steps, tokens and held-out loss.")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the list as JSON; without PATH: headlens-models.json")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from headlens.errors import HeadlensError
    from headlens.io.embedded import NAMES, describe
    from headlens.io.files import write_json
    from headlens.report.models import models_table

    rows, missing = [], []
    for name in NAMES:
        try:
            rows.append(describe(name))
        except HeadlensError as exc:  # e.g. MiniLM's registry package not installed: say so, list the rest
            missing.append(f"{name}: {exc}")
    lines = models_table(rows)
    lines += [f"not available: {m}" for m in missing]
    if args.json is not None:
        path = args.json or "headlens-models.json"
        write_json(path, {"models": rows, "unavailable": missing})
        lines.append(f"saved json -> {path}")
    print("\n".join(lines))
    return 0
