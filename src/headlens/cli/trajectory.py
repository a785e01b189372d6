"""``headlens trajectory``: the sweep of every checkpoint of a training run, one tidy table, figures, a page."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from headlens.cli.common import add_executor_args, add_placement_args, executor_from
from headlens.cli.sweep import add_sweep_options
from headlens.errors import HeadlensError


def add_parser(sub) -> None:
    p = sub.add_parser("trajectory", help="the sweep across training checkpoints: one table keyed by step, figures",
                       description="Sweep every checkpoint of a training run (a list, a directory of checkpoint-N "
                                   "folders, or hub revisions) and write one tidy table keyed by (checkpoint, step, "
                                   "layer, head or kv group) with the sweep's columns, figures against the step and "
                                   "a page. With --prompt/--calib also the data-aware errors, the first token's "
                                   "attention share and residual norm per layer, and the routers' statistics.")
    g = p.add_argument_group("checkpoints (one of --weights or --hf-repo with --revisions)")
    g.add_argument("--weights", nargs="+", metavar="PATH",
                   help="checkpoints: HuggingFace model directories or weight files; a directory of checkpoint-N "
                        "folders (transformers' Trainer) stands for those folders")
    g.add_argument("--hf-repo", metavar="ORG/NAME", help="a hub repo whose --revisions are the checkpoints")
    g.add_argument("--revisions", metavar="R,R,...",
                   help="with --hf-repo: branches, tags or commits, e.g. step1000,step2000 (Pythia)")
    g.add_argument("--cache-dir", metavar="DIR", help="hub cache directory (default: HF_HUB_CACHE)")
    g.add_argument("--steps", metavar="S,S,...",
                   help="the training step of each checkpoint, in the order given (default: trainer_state.json, "
                        "then the name, checkpoint-N / stepN, then the order given)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub repo's own modeling code (off unless you ask for it)")
    add_placement_args(p)
    s = p.add_argument_group("sweep (as headlens sweep)")
    add_sweep_options(s, calib_help="texts, one per line: data-aware errors and the prompt numbers",
                      prompt_help="a text: data-aware errors and the prompt numbers")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the finished layers and prompt numbers kept in --out-dir whose fingerprints match "
                        "(default; --no-resume computes everything again)")
    p.add_argument("--out-dir", default="headlens-out/trajectory", metavar="DIR",
                   help="default headlens-out/trajectory")
    add_executor_args(p)
    p.set_defaults(func=cmd_trajectory)


def _steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeadlensError(f"--steps {text!r}: give integers separated by commas, e.g. 0,100,200") from None


def points_from(args: argparse.Namespace):
    from headlens.trajectory.checkpoints import hub_points, local_points

    common = {"device": args.device, "trust_remote_code": args.trust_remote_code}
    steps = _steps(args.steps)
    if args.weights and args.hf_repo:
        raise HeadlensError("give either --weights or --hf-repo with --revisions, not both")
    if args.hf_repo:
        if not args.revisions:
            raise HeadlensError("--hf-repo needs --revisions, the checkpoints: e.g. --revisions step1000,step2000")
        revisions = [r.strip() for r in args.revisions.split(",") if r.strip()]
        return hub_points(args.hf_repo, revisions, steps, cache_dir=args.cache_dir, **common)
    if args.revisions or args.cache_dir:
        raise HeadlensError("--revisions and --cache-dir apply to --hf-repo only")
    if not args.weights:
        raise HeadlensError("give the checkpoints: --weights A B C (or a directory of checkpoint-N folders), or "
                            "--hf-repo ORG/NAME --revisions R1,R2")
    from headlens.trajectory.checkpoints import own_models

    for d in own_models(args.weights):
        print(f"note: {d} holds checkpoint-N folders and a model of its own: the folders are the trajectory, its "
              "own model is not included", flush=True)
    return local_points(args.weights, steps, **common)


def cmd_trajectory(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from headlens.circuits.sweep import SweepConfig
    from headlens.cli.sweep import read_calibration
    from headlens.io.files import check_writable_dir
    from headlens.trajectory.run import run_trajectory

    if args.device_map or args.max_memory or args.offload_dir:
        raise HeadlensError("--device-map, --max-memory and --offload-dir do not apply to trajectory: it reads one "
                            "layer's tensors at a time (and loads each checkpoint once for the prompt numbers)")
    cfg = SweepConfig(layers=args.layers, ks=args.k, fold_norm=args.fold_norm, with_qk=not args.no_qk, dtype=args.dtype,
                      target_error=args.target_error, target_energy=args.target_energy, kv_bytes=args.kv_bytes,
                      max_calib_tokens=args.max_calib_tokens, truncate=args.truncate)
    cfg.validate()
    executor = executor_from(args)
    points = points_from(args)
    cfg = replace(cfg, calibration=read_calibration(args))
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)

    def planned(plan) -> None:
        todo = sum(t for _, t, _ in plan)
        kept = sum(r for _, _, r in plan)
        print(f"{len(plan)} checkpoints (steps {plan[0][0].step}..{plan[-1][0].step}): {todo} layers to sweep"
              + (f", {kept} kept from an earlier run" if kept else "") + f" on the {executor.name} executor",
              flush=True)

    def bar(stream, total: int):
        return tqdm(stream, total=total, desc="layers", unit="layer", file=sys.stderr, disable=None)

    from headlens.report.trajectory import result_lines, write_report

    with executor as ex:
        result = run_trajectory(points, cfg, out_dir, executor=ex, layers_per_task=args.layers_per_task,
                                resume=args.resume, progress=bar, on_plan=planned)
        if ex.name == "ray":
            print(ex.started_line(), flush=True)
    paths = write_report(result, out_dir)
    print("\n".join(result_lines(result) + [f"saved -> {p}" for p in paths]))
    return 0
