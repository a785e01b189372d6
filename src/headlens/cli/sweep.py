"""``headlens sweep``: every head of every layer, streamed layer by layer, with an MLA latent budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from headlens.cli.common import add_executor_args, command_parser, executor_from, int_arg, model_source
from headlens.errors import HeadlensError


def add_parser(sub) -> None:
    p = command_parser(sub, "sweep", help="every head of every layer: OV/QK spectra, kv groups, latent-cache budget",
                       description="Sweep all layers and heads: factored OV and QK spectra, ranks at energy "
                                   "levels, stacked kv-group operators, optional data-aware (whitened) latents, "
                                   "and the KV-cache budget of an MLA-style latent per layer and kv group.")
    add_sweep_options(p)
    p.add_argument("--resume", action="store_true", help="skip layers already finished in --out-dir")
    p.add_argument("--out-dir", default="headlens-out/sweep", metavar="DIR", help="default headlens-out/sweep")
    p.add_argument("--json", default=None, metavar="PATH", help="summary JSON (default <out-dir>/sweep_summary.json)")
    add_executor_args(p)
    p.set_defaults(func=cmd_sweep)


def add_sweep_options(p, calib_help: str = "calibration text, one sample per line (data-aware mode)",
                      prompt_help: str = "calibration text (data-aware mode)") -> None:
    """The flags of what a sweep computes (shared by ``sweep`` and ``trajectory``)."""
    p.add_argument("--layers", metavar="SEL", help="layers to sweep: 0:12 (slice), 1,4,9, or all (default)")
    p.add_argument("--k", default=None, metavar="K,K,...",
                   help="latent sizes to report (default 8,16,32,64, those not above head_dim)")
    p.add_argument("--fold-norm", action="store_true", help="fold the pre-attention norm gain into the inputs")
    p.add_argument("--no-qk", action="store_true",
                   help="skip the QK side: QK spectra, stacked key operators and the key budget (faster)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--target-error", type=float, default=None, metavar="E",
                   help="budget: smallest latent per kv group with relative error <= E (default 0.1)")
    t.add_argument("--target-energy", type=float, default=None, metavar="F",
                   help="budget: smallest latent per kv group keeping energy >= F")
    p.add_argument("--kv-bytes", type=int_arg, default=2, metavar="B", help="bytes per cached value, 1..8 (default 2)")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--calib", metavar="FILE", help=calib_help)
    c.add_argument("--prompt", metavar="TEXT", help=prompt_help)
    p.add_argument("--max-calib-tokens", type=int_arg, default=2048, metavar="N",
                   help="cap on calibration tokens (default 2048); half fit the latents, half are held out")
    p.add_argument("--truncate", action="store_true",
                   help="cut a calibration text longer than the model's positions (refused otherwise)")


def read_calibration(args) -> list[str] | None:
    if args.calib:
        from headlens.io.files import read_text_lines

        return read_text_lines(args.calib, "calib")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise HeadlensError("--prompt is empty")
        return [args.prompt]
    return None


# A worker for the heatmaps pays off from about this many (layer, head) cells (Qwen3-0.6B has 448, Qwen3-4B 1152):
# below, drawing them here is quicker than starting a process and importing matplotlib there.
POOL_MIN_CELLS = 256


def cmd_sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tqdm.auto import tqdm

    from headlens.circuits.mla import is_mla_config
    from headlens.circuits.sweep import SweepConfig, run_sweep
    from headlens.io.files import check_writable_dir
    from headlens.report.pool import WorkerPool, usable_cores
    from headlens.report.sweep import header_line, layer_line, preload_in_background, result_lines, write_report
    from headlens.report.sweep_figures import warm_up

    cfg = SweepConfig(layers=args.layers, ks=args.k, fold_norm=args.fold_norm, with_qk=not args.no_qk,
                      dtype=args.dtype, target_error=args.target_error, target_energy=args.target_energy,
                      kv_bytes=args.kv_bytes, max_calib_tokens=args.max_calib_tokens, out_dir=args.out_dir,
                      resume=args.resume, truncate=args.truncate)
    cfg.validate()
    executor = executor_from(args)
    cfg = replace(cfg, calibration=read_calibration(args))
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    preload_in_background()  # the report's imports overlap the layer loop

    def bar(layers, total: int):
        return tqdm(layers, total=total, desc="layers", unit="layer", file=sys.stderr, disable=None)

    source = model_source(args)
    if is_mla_config(source.peek_config()):  # DeepSeek-style latent attention: its own analysis and tables
        from headlens.circuits.mla import run_mla_sweep
        from headlens.report.mla import mla_lines, write_mla_report

        with executor as ex:
            mla = run_mla_sweep(source, args.layers, args.kv_bytes, progress=bar, executor=ex,
                                layers_per_task=args.layers_per_task)
            ray_line = [ex.started_line()] if ex.name == "ray" else []
        paths = write_mla_report(mla, out_dir, Path(args.json) if args.json else None)
        print("\n".join(ray_line + mla_lines(mla) + [f"saved -> {p}" for p in paths]))
        return 0
    ks: list[int] = []

    def started(start) -> None:
        print(header_line(start), flush=True)
        ks.extend(start.ks)
        cells = (len(start.todo) + len(start.done)) * start.shape.num_heads
        if cells >= POOL_MIN_CELLS:
            pool.start()  # the heatmaps' worker: its imports overlap the layer loop

    def finished(layer) -> None:  # each layer's line as it finishes, above the progress bar
        tqdm.write(layer_line(layer, ks), file=sys.stdout)
        sys.stdout.flush()

    with WorkerPool(lambda: 1 if usable_cores() >= 2 else 0, warm_up) as pool, executor as ex:
        result = run_sweep(source, cfg, on_start=started, progress=bar, on_layer=finished, executor=ex,
                           layers_per_task=args.layers_per_task)
        paths = write_report(result, out_dir, Path(args.json) if args.json else None, pool=pool.executor)
        ray_line = [ex.started_line()] if ex.name == "ray" else []
    print("\n".join(ray_line + result_lines(result, per_layer=False) + [f"saved -> {p}" for p in paths]))
    return 0
