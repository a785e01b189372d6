"""``headlens toy``: create a toy attention stack (planted heads), trace it, and run the pipelines on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from headlens.errors import HeadlensError

if TYPE_CHECKING:
    from headlens.toy.stack import Planting, ToyConfig
    from headlens.toy.traces import TraceInputs


def _toy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-model", type=int, default=64, metavar="D", help="width d of the residual stream (default 64)")
    p.add_argument("--heads", type=int, default=4, metavar="H", help="query heads per layer (default 4)")
    p.add_argument("--kv-heads", type=int, default=None, metavar="G",
                   help="key/value heads, a divisor of --heads (default: --heads, MHA; 1: MQA; in between: GQA)")
    p.add_argument("--head-dim", type=int, default=16, metavar="HD", help="width of each head (default 16)")
    p.add_argument("--layers", type=int, default=2, metavar="L", help="attention layers, no MLPs (default 2)")
    p.add_argument("--no-causal", action="store_true",
                   help="let every token attend to every other (default: causal, no attending to later tokens)")
    p.add_argument("--rope", action="store_true", help="rotary position embedding on q and k (default: none)")
    p.add_argument("--no-norm", action="store_true", help="no pre-attention RMSNorm (default: RMSNorm)")
    p.add_argument("--no-residual", action="store_true",
                   help="replace the stream by the attention output instead of adding it (default: residual)")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy's random weights (default 0)")
    p.add_argument("--plant", choices=("geometric", "power", "flat"), default=None,
                   help="plant every kv group's W_OV spectrum with this profile (default: none, random weights)")
    p.add_argument("--plant-rank", type=int, default=None, metavar="R",
                   help="planted rank: the singular values after the R-th are zero (needs --plant; default: the "
                        "head width, full rank)")
    p.add_argument("--plant-decay", type=float, default=None, metavar="X",
                   help="geometric ratio or power-law exponent (default 0.7; needs --plant)")


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", choices=("random", "anisotropic", "embeddings"), default="anisotropic",
                   help="token inputs: random (isotropic Gaussian), anisotropic (see --input-decay) or embeddings "
                        "(rows of --embeddings-from) (default anisotropic)")
    p.add_argument("--embeddings-from", metavar="DIR",
                   help="HF model directory whose token embeddings feed the toy (--inputs embeddings; no default)")
    p.add_argument("--tokens", type=int, default=256, metavar="N", help="tokens to trace, 2..8192 (default 256)")
    p.add_argument("--input-decay", type=float, default=0.8, metavar="X",
                   help="anisotropic inputs: covariance eigenvalues X^i in a random basis, 0 < X <= 1 (default 0.8)")
    p.add_argument("--input-seed", type=int, default=1, metavar="SEED",
                   help="seed of the inputs and of the embedding rows drawn (default 1)")


def add_parser(sub) -> None:
    toy = sub.add_parser("toy", help="a toy attention stack: planted heads, traces, the clustering demo",
                         description="Create a toy multi-head attention stack (MHA/MQA/GQA, causal or not, optional "
                                     "RoPE, pre-norm, residual), plant OV spectra, trace activations, and run "
                                     "headlens' pipelines on it.")
    tsub = toy.add_subparsers(dest="toy_command", metavar="ACTION")
    dir_rule = "; a directory (an existing one, or a path ending in /) gets "
    c = tsub.add_parser("create", help="build a toy and save it (.safetensors or .pt)")
    _toy_args(c)
    c.add_argument("--out", required=True, metavar="FILE", help="toy.safetensors or toy.pt" + dir_rule
                   + "DIR/toy.safetensors")
    c.set_defaults(func=cmd_create)
    t = tsub.add_parser("trace", help="run inputs through a saved toy and export every layer's activations")
    t.add_argument("--weights", required=True, metavar="FILE", help="a toy saved by `headlens toy create`")
    _trace_args(t)
    t.add_argument("--out", required=True, metavar="STEM", help="writes STEM.safetensors and STEM.json" + dir_rule
                   + "DIR/traces.safetensors and DIR/traces.json")
    t.set_defaults(func=cmd_trace)
    k = tsub.add_parser("cluster", help="the token-clustering demo: deep shared-weight attention on the sphere")
    k.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="tokens (points on the sphere), at least 4 (default 64)")
    k.add_argument("--dim", type=int, default=None, metavar="D", help="width of each token, at least 3 (default 16)")
    k.add_argument("--depth", type=int, default=None, metavar="L",
                   help="shared-weight attention layers, at least 1 (default 30)")
    k.add_argument("--beta", type=float, default=None,
                   help="inverse temperature of the attention softmax, 0..1e6 (default 4)")
    k.add_argument("--seed", type=int, default=None, help="seed of the initial tokens (default 0)")
    k.add_argument("--frame-seconds", type=float, default=0.5, metavar="S",
                   help="GIF seconds per frame (default 0.5)")
    k.add_argument("--out-dir", default="headlens-out/toy-cluster", metavar="DIR",
                   help="output directory (default headlens-out/toy-cluster)")
    k.set_defaults(func=cmd_cluster)
    r = tsub.add_parser("run", help="create, trace and analyse in one go (ov on every head, sphere on the stream)")
    _toy_args(r)
    _trace_args(r)
    r.add_argument("--latent-dim", type=int, default=4, metavar="K",
                   help="latent size k each head's OV circuit is measured at, 1..--head-dim (default 4)")
    r.add_argument("--out-dir", default="headlens-out/toy", metavar="DIR",
                   help="output directory: the toy, its traces, toy_ov.json and sphere/ (default headlens-out/toy)")
    r.set_defaults(func=cmd_run)
    toy.set_defaults(func=_no_action)


def _no_action(args) -> int:
    raise HeadlensError("choose an action: create, trace, cluster or run (see headlens toy --help)")


def _toy_config(args) -> ToyConfig:
    from headlens.toy.stack import ToyConfig

    return ToyConfig(d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads,
                     head_dim=args.head_dim, n_layers=args.layers, causal=not args.no_causal, rope=args.rope,
                     pre_norm=not args.no_norm, residual=not args.no_residual)


def _planting(args) -> Planting | None:
    from headlens.toy.stack import Planting

    if not args.plant:  # a planting option without a planting is a mistake, not something to ignore
        given = [f for f, v in (("--plant-rank", args.plant_rank), ("--plant-decay", args.plant_decay)) if v is not None]
        if given:
            raise HeadlensError(f"{' and '.join(given)} shape a planted spectrum: add --plant geometric|power|flat")
        return None
    return Planting(kind=args.plant, rank=args.plant_rank, decay=0.7 if args.plant_decay is None else args.plant_decay)


def _trace_inputs(args) -> TraceInputs:
    from headlens.toy.traces import TraceInputs

    return TraceInputs(inputs=args.inputs, tokens=args.tokens, input_decay=args.input_decay,
                       input_seed=args.input_seed, embeddings_from=args.embeddings_from)


def cmd_create(args) -> int:
    from headlens.io.files import check_writable_dir, file_in_dir
    from headlens.report.toy import create_lines
    from headlens.toy.stack import build_toy, save_toy

    out = file_in_dir(args.out, "toy.safetensors")
    if out.suffix not in (".safetensors", ".pt"):
        raise HeadlensError(f"--out {out}: save the toy as .safetensors or .pt")
    check_writable_dir(out.parent)
    model, planted = build_toy(_toy_config(args), args.seed, _planting(args))
    save_toy(model, out)
    print("\n".join(create_lines(model.cfg, planted, out)))
    return 0


def cmd_trace(args) -> int:
    from headlens.io.files import check_writable_dir, file_in_dir
    from headlens.toy.stack import load_toy
    from headlens.toy.traces import save_traces, toy_inputs, trace

    if not Path(args.weights).exists():
        raise HeadlensError(f"--weights {args.weights}: no such file")
    stem = file_in_dir(args.out, "traces")
    check_writable_dir(stem.parent)
    spec = _trace_inputs(args)
    spec.validate()
    model = load_toy(Path(args.weights))
    x = toy_inputs(spec, model.cfg.d_model)
    traces = trace(model, x)
    st, js = save_traces(stem, model, traces, {"inputs": args.inputs, "input_seed": args.input_seed,
                                                "weights": str(args.weights)})
    from headlens.words import count

    print(f"traced {x.shape[0]} {args.inputs} tokens through {count(len(traces), 'layer')}")
    print(f"saved traces -> {st}\nsaved metadata -> {js}")
    return 0


def cmd_cluster(args) -> int:
    from headlens.io.files import check_writable_dir
    from headlens.report.cluster import write_cluster_demo
    from headlens.report.toy import cluster_lines
    from headlens.toy.cluster import ClusterConfig, run_demo

    given = {"tokens": args.tokens, "dim": args.dim, "layers": args.depth, "beta": args.beta, "seed": args.seed}
    cfg = ClusterConfig(**{k: v for k, v in given.items() if v is not None})
    if cfg.tokens < 4 or cfg.dim < 3 or cfg.layers < 1:
        raise HeadlensError("the clustering demo needs --tokens >= 4, --dim >= 3 and --depth >= 1")
    cfg.check()
    if args.frame_seconds <= 0:
        raise HeadlensError(f"--frame-seconds must be positive, got {args.frame_seconds:g}")
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    demo = run_demo(cfg)
    files = write_cluster_demo(demo, out_dir, frame_seconds=args.frame_seconds)
    print("\n".join(cluster_lines(cfg, demo, files)))
    return 0


def cmd_run(args) -> int:
    """create -> trace -> ov on every head with the traced inputs -> sphere on the traced stream."""
    from headlens.io.files import check_writable_dir, write_json
    from headlens.report.sphere import sphere_lines, write_sphere_outputs
    from headlens.report.toy import run_lines
    from headlens.residual.sphere import SphereConfig
    from headlens.toy.run import run_toy
    from headlens.toy.traces import sphere_from_traces

    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    run = run_toy(_toy_config(args), _trace_inputs(args), out_dir, args.seed, _planting(args), args.latent_dim)
    jpath = write_json(out_dir / "toy_ov.json", run.to_json())
    print("\n".join(run_lines(run, jpath)), flush=True)
    result = sphere_from_traces(str(run.traces), SphereConfig(labels="none", workers=1))  # read while staged
    print("\n".join(sphere_lines(result)), flush=True)
    files = write_sphere_outputs(result, out_dir / "sphere")
    print("\n".join(files.lines() + result.summary))
    return 0
