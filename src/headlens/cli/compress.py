"""``headlens compress``: put MLA-style value latents into the running model, measure what they lose end to end
against the unmodified model, and export the compressed checkpoint."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from headlens.cli.common import command_parser, int_arg, model_source, with_flags
from headlens.errors import HeadlensError

LATENT_CHOICES = ("plain", "data-aware", "both")


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeadlensError(f"{flag} {text!r}: give numbers between 0 and 1, comma-separated (e.g. 0.1,0.2)") from None
    if not values:
        raise HeadlensError(f"{flag} is empty: give numbers between 0 and 1, comma-separated")
    for v in values:
        if not 0 < v < 1:
            raise HeadlensError(f"{flag} {v:g}: a target lies strictly between 0 and 1")
    return values


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeadlensError(f"{flag} {text!r}: give whole latent sizes, comma-separated (e.g. 16,32)") from None
    if not values or any(v < 0 for v in values):
        raise HeadlensError(f"{flag} {text!r}: give whole latent sizes 0..head_dim, comma-separated")
    return values


def add_parser(sub) -> None:
    p = command_parser(sub, "compress", default_model="tiny-lm",
                       help="put value latents into the running model, measure the loss, export the checkpoint",
                       description="Replace each kv group's values by an MLA-style latent (plain or data-aware), "
                                   "measure per layer the predicted, value-path, isolated and accumulated errors "
                                   "and for the whole model KL / top-1 / perplexity (decoders) or embedding "
                                   "cosine (encoders) against the unmodified model, next to a uniform allocation "
                                   "of the same KV bytes; optionally save the compressed model.")
    p.add_argument("--layers", metavar="SEL", help="layers to compress: 0:12 (slice), 1,4,9, or all (default)")
    p.add_argument("--calib", metavar="FILE",
                   help="calibration texts, one per line, that fit the data-aware latents (default for the "
                        "embedded models: texts shipped with headlens)")
    p.add_argument("--eval", metavar="FILE", dest="eval_file",
                   help="held-out eval texts, one per line, never used to fit (default for the embedded models: "
                        "texts shipped with headlens, disjoint from the calibration texts)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--target-error", metavar="E[,E...]",
                   help="budget: per kv group the smallest latent whose predicted error is <= E, one configuration "
                        "per value (default 0.1,0.2,0.4)")
    b.add_argument("--target-energy", metavar="F[,F...]",
                   help="budget: per kv group the smallest latent keeping energy >= F")
    b.add_argument("--k", metavar="K[,K...]", dest="ks", help="budget: the same latent size K for every kv group")
    b.add_argument("--budget", metavar="CSV",
                   help="budget: the sweep_budget.csv `headlens sweep` wrote for this model (k_plain, k_data)")
    b.add_argument("--saving", metavar="S[,S...]",
                   help="budget: the fraction of the whole KV cache saved (keys and values together, positions "
                        "counted), e.g. 0.5,0.6,0.7; one configuration per value, spent by --allocate")
    b.add_argument("--kv-budget", metavar="B", type=float,
                   help="budget: KV bytes per token of the whole cache, spent by --allocate")
    p.add_argument("--allocate", choices=("uniform", "error", "energy", "fisher", "greedy"),
                   help="how a --saving / --kv-budget is spent over every (layer, kv group, keys or values) latent: "
                        "greedy (default), uniform, error (the largest predicted error first; energy picks the same), "
                        "fisher (sizes by Fisher score, Palu's rule); greedy: the largest predicted end-to-end loss "
                        "reduction per byte, spectrum x each layer's sensitivity measured on the calibration texts; "
                        "the uniform allocation of the same bytes is always measured beside it")
    p.add_argument("--latent", choices=LATENT_CHOICES, default="both",
                   help="which latents: plain (from the weights), data-aware (whitened by the calibration tokens) "
                        "or both (default)")
    p.add_argument("--keys", choices=("none", "plain", "data-aware"), default="none",
                   help="key latents too: plain (from the weights, q/k norm gains folded) or data-aware (the "
                        "calibration tokens' own queries and keys, un-rotated); the keys alone, and keys with values, "
                        "are measured beside the values (default none: values only)")
    p.add_argument("--key-k", metavar="K[,K...]", dest="key_ks",
                   help="key latent sizes: one for every budget value, or one each (default: the values' budget: the "
                        "same --k, or the target cut from the key spectra)")
    p.add_argument("--kv-bytes", type=int, default=2, metavar="B", help="bytes per cached value, 1..8 (default 2)")
    p.add_argument("--max-calib-tokens", type=int, default=2048, metavar="N",
                   help="cap on calibration tokens (default 2048)")
    p.add_argument("--truncate", action="store_true",
                   help="cut texts longer than the model's positions (refused otherwise)")
    p.add_argument("--generate", type=int_arg, metavar="N",
                   help="per configuration, generate N greedy tokens with its LatentCache (decoders) and check the "
                        "cache's measured bytes per token against the planned ones")
    p.add_argument("--save-model", metavar="DIR",
                   help="write the compressed model (one configuration: one target or --k, one --latent) as a "
                        "HuggingFace directory with headlens_latent.json and latent_factors.safetensors")
    p.add_argument("--out-dir", default="headlens-out/compress", metavar="DIR",
                   help="default headlens-out/compress")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="summary JSON (default <out-dir>/compress_summary.json)")
    p.set_defaults(func=cmd_compress)


def _texts(args, source, cfg):
    """The run's texts (:func:`headlens.compress.texts.compress_texts`): the files of --eval / --calib (one text per
    line), else the texts shipped with an embedded model; its notes say which."""
    from headlens.compress.texts import compress_texts
    from headlens.io.files import read_text_lines

    given_eval = read_text_lines(args.eval_file, "eval") if args.eval_file else None
    given_calib = read_text_lines(args.calib, "calib") if args.calib else None
    return compress_texts(source, cfg.needs_calibration(), given_eval, given_calib, cfg.calibration_reason())


def _n_saved(cfg) -> int:
    """How many configurations --save-model would have to choose between (budgets, not their uniform twins)."""
    from headlens.compress.configs import DEFAULT_TARGET_ERRORS

    values = cfg.ks or cfg.target_energies or cfg.target_errors or cfg.savings or (
        [cfg.budget] if cfg.budget else [cfg.kv_budget] if cfg.kv_budget is not None else DEFAULT_TARGET_ERRORS)
    return len(values) * len(cfg.latents)


def cmd_compress(args: argparse.Namespace) -> int:
    from headlens.compress.plan import LATENT_KINDS
    from headlens.compress.run import CompressConfig, run_compress
    from headlens.io.files import check_new_dir, check_writable_dir
    from headlens.report.compress import header_line, preload_in_background, result_lines, summary, write_report

    cfg = CompressConfig(
        layers=args.layers,
        target_errors=_floats(args.target_error, "--target-error") if args.target_error is not None else None,
        target_energies=_floats(args.target_energy, "--target-energy") if args.target_energy is not None else None,
        ks=_ints(args.ks, "--k") if args.ks is not None else None, budget=args.budget,
        latents=LATENT_KINDS if args.latent == "both" else (args.latent,), kv_bytes=args.kv_bytes,
        max_calib_tokens=args.max_calib_tokens, truncate=args.truncate, dtype=args.dtype, generate=args.generate,
        keys=args.keys, key_ks=_ints(args.key_ks, "--key-k") if args.key_ks is not None else None,
        savings=_floats(args.saving, "--saving") if args.saving is not None else None,
        kv_budget=args.kv_budget, allocate=args.allocate)
    cfg.validate()
    save = Path(args.save_model) if args.save_model else None
    if save is not None:
        if _n_saved(cfg) != 1:
            raise HeadlensError(f"--save-model writes one configuration, this run has {_n_saved(cfg)}: give one "
                                "--target-error/--target-energy/--k value and --latent plain or data-aware")
        check_new_dir(save, "save_model")  # again, under the lock this run holds since it started
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    preload_in_background()  # the report's imports overlap loading and the eval passes
    source = model_source(args)
    texts = _texts(args, source, cfg)
    eval_texts = texts.eval
    for n in texts.notes:
        print(with_flags(n, "compress"))

    def started(start: dict) -> None:
        print("\n".join([header_line(start), *(f"note: {n}" for n in start["notes"])]), flush=True)

    result = run_compress(source, cfg, eval_texts, texts.calib, on_start=started, keep_model=save is not None)
    result.notes[:0] = texts.notes  # the summary JSON says which texts were used
    paths = write_report(result, out_dir, Path(args.json) if args.json else None)
    data = summary(result)
    lines = result_lines(data)
    if save is not None:
        part = "both" if cfg.keys != "none" else "values"  # with key latents, the keys-and-values configuration
        conf = next(c for c in result.configurations  # the budget's own sizes, not its uniform twin
                    if (c.matches is None or c.budget == "k") and c.part == part)
        record = next(r for r in data["configurations"] if r["name"] == conf.name)
        digest = hashlib.sha256("\n".join(eval_texts).encode()).hexdigest()[:16]
        info = {"configuration": conf.name, "measured": {k: v for k, v in record.items() if k != "layers"},
                "eval_texts": len(eval_texts), "eval_sha256": digest, "dtype": result.config.dtype}
        paths.append(result.save_model(conf.name, save, info))
    print("\n".join(lines + [f"saved -> {p}" for p in paths]))
    return 0
