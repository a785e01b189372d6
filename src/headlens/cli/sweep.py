"""``headlens sweep``: every head of every layer, streamed layer by layer, with an MLA latent budget."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from headlens.cli.common import model_source
from headlens.errors import HeadlensError
from headlens.selection import parse_ks, parse_layers

PARTS = "sweep_layers"  # one JSON per finished layer: what --resume reads


def add_parser(sub) -> None:
    from headlens.cli.common import add_model_args

    p = sub.add_parser("sweep", help="every head of every layer: OV/QK spectra, kv groups, latent-cache budget",
                       description="Sweep all layers and heads: factored OV and QK spectra, ranks at energy "
                                   "levels, stacked kv-group operators, optional data-aware (whitened) latents, "
                                   "and the KV-cache budget of an MLA-style latent per layer and kv group.")
    add_model_args(p)
    p.add_argument("--layers", metavar="SEL", help="layers to sweep: 0:12 (slice), 1,4,9, or all (default)")
    p.add_argument("--k", default=None, metavar="K,K,...",
                   help="latent sizes to report (default 8,16,32,64, those not above head_dim)")
    p.add_argument("--fold-norm", action="store_true", help="fold the pre-attention norm gain into the inputs")
    p.add_argument("--no-qk", action="store_true", help="skip the QK-circuit spectra (faster)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--target-error", type=float, default=None, metavar="E",
                   help="budget: smallest latent per kv group with relative error <= E (default 0.1)")
    t.add_argument("--target-energy", type=float, default=None, metavar="F",
                   help="budget: smallest latent per kv group keeping energy >= F")
    p.add_argument("--kv-bytes", type=int, default=2, metavar="B", help="bytes per cached value (default 2)")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--calib", metavar="FILE", help="calibration text, one sample per line (data-aware mode)")
    c.add_argument("--prompt", metavar="TEXT", help="calibration text (data-aware mode)")
    p.add_argument("--max-calib-tokens", type=int, default=2048, metavar="N",
                   help="cap on calibration tokens (default 2048); half fit the latents, half are held out")
    p.add_argument("--resume", action="store_true", help="skip layers already finished in --out-dir")
    p.add_argument("--out-dir", default="headlens-out/sweep", metavar="DIR", help="default headlens-out/sweep")
    p.add_argument("--json", default=None, metavar="PATH", help="summary JSON (default <out-dir>/sweep_summary.json)")
    p.set_defaults(func=cmd_sweep)


def read_calibration(args) -> list[str] | None:
    if args.calib:
        from headlens.io.files import read_text_lines

        return read_text_lines(args.calib, "--calib")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise HeadlensError("--prompt is empty")
        return [args.prompt]
    return None


def capture_calibration(source, ck, texts: list[str], layers: list[int], dtype, max_tokens: int):
    """Every selected layer's attention input for the calibration tokens: ({layer: (d, N) float64}, N)."""
    from headlens.residual.capture import capture_attention_inputs, max_positions

    if ck.directory is None:
        raise HeadlensError("data-aware mode runs the model: pass --weights DIR (a HuggingFace model directory "
                            "with config.json and tokenizer) or --hf-repo")
    tok = source.tokenizer(ck.directory)
    limit = max_positions(ck.config or {})
    model = source.model(ck.directory, dtype)
    X, n = capture_attention_inputs(model, tok, ck.spec, texts, layers, max_tokens, limit)
    if n < 4:
        raise HeadlensError(f"the calibration text gives {n} tokens: at least 4 are needed (half fit, half held out)")
    return X, n


def cmd_sweep(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from headlens.io.files import check_writable_dir, ensure_dir, write_json
    from headlens.io.checkpoint import cast_dtype
    from headlens.circuits.heads import find_non_finite
    from headlens.circuits.sweep import BudgetTarget, LayerResult, NonFiniteWeights, SweepConfig, analyze_layer, iter_layers

    ks_text = args.k
    if ks_text is not None:
        parse_ks(ks_text)
    if args.kv_bytes <= 0:
        raise HeadlensError(f"--kv-bytes must be positive, got {args.kv_bytes}")
    if args.target_error is not None and not 0 <= args.target_error < 1:
        raise HeadlensError(f"--target-error must be in [0, 1), got {args.target_error:g}")
    if args.target_energy is not None and not 0 < args.target_energy <= 1:
        raise HeadlensError(f"--target-energy must be in (0, 1], got {args.target_energy:g}")
    if args.max_calib_tokens < 4:
        raise HeadlensError(f"--max-calib-tokens must be at least 4, got {args.max_calib_tokens}")
    texts = read_calibration(args)
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    _preload_report_modules()  # their imports overlap the layer loop, whose torch kernels release the GIL
    dtype = cast_dtype(args.dtype)
    source = model_source(args)
    ck = source.checkpoint(full=texts is not None, roles=("q", "k", "v", "o", "qkv", "norm"))
    s = ck.shape
    if ks_text is None:
        ks = [k for k in (8, 16, 32, 64) if k <= s.head_dim] or [s.head_dim]
    else:
        ks = parse_ks(ks_text, s.head_dim)
    layers = parse_layers(args.layers, s.num_layers)
    cfg = SweepConfig(ks=ks, fold_norm=args.fold_norm, with_qk=not args.no_qk,
                      rank_eps=float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps))
    target = (BudgetTarget("energy", args.target_energy) if args.target_energy is not None
              else BudgetTarget("error", 0.1 if args.target_error is None else args.target_error))
    run_id = {"model": ck.describe(), "config": {**cfg.__dict__, "dtype": args.dtype},
              "data": None if texts is None else {"texts": len(texts), "max_tokens": args.max_calib_tokens,
                                                  "hash": _hash(texts)}}
    parts = out_dir / PARTS
    done: dict[int, dict] = {}
    if args.resume and (parts / "run.json").exists():
        previous = json.loads((parts / "run.json").read_text())
        if previous != json.loads(json.dumps(run_id)):
            raise HeadlensError(f"--resume: {parts} was written by a different model or configuration; use another "
                                "--out-dir or drop --resume")
        for layer in layers:
            f = parts / f"layer_{layer:04d}.json"
            if f.exists():
                done[layer] = json.loads(f.read_text())

    todo = [layer for layer in layers if layer not in done]
    X = {}
    n_calib = 0
    if texts is not None and todo:
        X, n_calib = capture_calibration(source, ck, texts, todo, dtype, args.max_calib_tokens)
    ensure_dir(parts)
    write_json(parts / "run.json", run_id)
    print(f"{ck.name}: {s.num_layers} layers, {s.num_heads} query heads, {s.num_kv_heads} kv heads, head_dim "
          f"{s.head_dim}, hidden {s.hidden_size}; sweeping {len(todo)} layer(s)"
          + (f", {len(done)} already done (--resume)" if done else "")
          + (f"; data-aware on {n_calib} calibration tokens" if texts is not None else "; weight-only"), flush=True)
    for layer, f in tqdm(iter_layers(ck, todo, cfg, dtype), total=len(todo), desc="layers", unit="layer",
                         file=sys.stderr, disable=None):
        Xf = Xt = None
        if layer in X:
            Xl = X.pop(layer)
            if cfg.fold_norm:
                from headlens.circuits.heads import norm_gain

                gain, _ = norm_gain(ck, layer)
                safe = torch.where(gain != 0, gain, torch.ones_like(gain))
                Xl = torch.where((gain != 0)[:, None], Xl / safe[:, None], torch.zeros_like(Xl))
            Xf, Xt = Xl[:, 0::2], Xl[:, 1::2]
        try:
            r = analyze_layer(layer, f.W_O, f.W_V, cfg, f.W_Q, f.W_K, Xf, Xt)
        except NonFiniteWeights:
            find_non_finite(ck, layer, cfg.with_qk)  # raises, naming the tensor
            raise
        done[layer] = {"head_rows": r.head_rows, "group_rows": r.group_rows, "group_plain": r.group_plain.tolist(),
                       "group_white": None if r.group_white is None else r.group_white.tolist(),
                       "group_white_heldout": (None if r.group_white_heldout is None
                                               else r.group_white_heldout.tolist())}
        write_json(parts / f"layer_{layer:04d}.json", done[layer])

    results = [LayerResult(layer=layer, head_rows=done[layer]["head_rows"], group_rows=done[layer]["group_rows"],
                           group_plain=torch.tensor(done[layer]["group_plain"], dtype=torch.float64),
                           group_white=_tensor(done[layer]["group_white"]),
                           group_white_heldout=_tensor(done[layer].get("group_white_heldout")))
               for layer in layers]
    return _write_outputs(args, ck, cfg, target, results, out_dir, n_calib, texts is not None)


def _preload_report_modules() -> None:
    import threading

    def load() -> None:
        try:
            import headlens.report.sweep  # noqa: F401
            from headlens.report.sweep import _pyplot, _pyarrow

            _pyplot()
            _pyarrow()
        except Exception:  # the writers report their own errors when called
            pass

    threading.Thread(target=load, daemon=True).start()


def _tensor(values):
    import torch

    return None if values is None else torch.tensor(values, dtype=torch.float64)


def _hash(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def _write_outputs(args, ck, cfg, target, results, out_dir: Path, n_calib: int, data: bool) -> int:
    from headlens.io.files import write_json
    from headlens.circuits.sweep import budget
    from headlens.report.sweep import budget_outputs, heatmaps, write_html, write_table

    s = ck.shape
    head_rows = [row for r in results for row in r.head_rows]
    group_rows = [row for r in results for row in r.group_rows]
    bud = budget(results, target, s.num_kv_heads, s.head_dim, args.kv_bytes)
    files = write_table(out_dir / "sweep_heads", head_rows) + write_table(out_dir / "sweep_groups", group_rows)
    images = heatmaps(out_dir, head_rows, cfg.ks, ck.name)
    bfiles = budget_outputs(out_dir, bud, ck.name)
    tot = bud["totals"]
    per_layer = []
    for r in results:
        rows = r.head_rows
        per_layer.append({"layer": r.layer,
                          "ov_rank_e90_mean": sum(x["ov_rank_e90"] for x in rows) / len(rows),
                          **{f"ov_rel_error_k{k}_mean": sum(x[f"ov_rel_error_k{k}"] for x in rows) / len(rows)
                             for k in cfg.ks}})
    notes = ["QK spectra describe W_Q^h^T W_K^g without RoPE and q/k norms, which act between them: approximate.",
             "Budget: keys are kept in full; each kv group's values become a latent of k_g numbers per token.",
             f"Numerical rank: singular values above max(m, n) * {cfg.rank_eps:.3g} * sigma_1."]
    if data:
        notes.append(f"Data-aware: {n_calib} calibration tokens at each layer's attention input; even positions "
                     "fit the latents, odd positions are held out.")
    summary = {"model": ck.describe(), "config": {**cfg.__dict__, "dtype": args.dtype}, "layers": [r.layer for r in results],
               "data_aware": data, "calibration_tokens": n_calib, "budget": {k: v for k, v in bud.items() if k != "rows"},
               "per_layer": per_layer, "notes": notes}
    jpath = Path(args.json) if args.json else out_dir / "sweep_summary.json"
    write_json(jpath, summary)
    page = write_html(out_dir / "sweep.html", summary, head_rows, group_rows, bud, images + [
        p for p in bfiles if p.suffix == ".png"])
    lines = []
    for pl in per_layer:
        lines.append(f"layer {pl['layer']:3d}: mean rank@90% {pl['ov_rank_e90_mean']:6.1f}  "
                     + "  ".join(f"rel_error@{k} {pl[f'ov_rel_error_k{k}_mean']:.3f}" for k in cfg.ks))
    lines.append(f"budget ({bud['target']}): KV bytes/token {tot['kv_bytes_before']} -> {tot['kv_bytes_after_plain']} "
                 f"plain ({tot['saving_plain_pct']:.1f}% saved)"
                 + (f", {tot['kv_bytes_after_data']} data-aware ({tot['saving_data_pct']:.1f}% saved)" if data else ""))
    lines.append(f"uniform allocation with the same total (k={tot['uniform_k']:.1f} per kv group): mean/max error "
                 f"{tot['mean_err_uniform']:.3f}/{tot['max_err_uniform']:.3f} vs budgeted "
                 f"{tot['mean_err_plain']:.3f}/{tot['max_err_plain']:.3f}")
    if data:
        lines.append(f"data-aware latents: predicted mean/max error {tot['mean_err_data']:.3f}/{tot['max_err_data']:.3f}"
                     f" (fit tokens), measured on held-out tokens {tot['mean_err_data_heldout']:.3f}/"
                     f"{tot['max_err_data_heldout']:.3f}")
    for p in files + images + bfiles + [jpath, page]:
        lines.append(f"saved -> {p}")
    print("\n".join(lines))
    return 0
