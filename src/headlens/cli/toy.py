"""``headlens toy``: create a toy attention stack (planted heads), trace it, and run the pipelines on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from headlens.errors import HeadlensError


def _toy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA); 1 for MQA")
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--rope", action="store_true")
    p.add_argument("--no-norm", action="store_true", help="no pre-attention RMSNorm")
    p.add_argument("--no-residual", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plant", choices=("geometric", "power", "flat"), default=None,
                   help="plant every kv group's W_OV spectrum with this profile")
    p.add_argument("--plant-rank", type=int, default=None, help="planted rank (zeros after it)")
    p.add_argument("--plant-decay", type=float, default=0.7, help="geometric ratio or power-law exponent")


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", choices=("random", "anisotropic", "embeddings"), default="anisotropic")
    p.add_argument("--embeddings-from", metavar="DIR",
                   help="HF model directory whose token embeddings feed the toy (--inputs embeddings)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--input-decay", type=float, default=0.8,
                   help="anisotropic inputs: covariance eigenvalues decay^i in a random basis (default 0.8)")
    p.add_argument("--input-seed", type=int, default=1)


def add_parser(sub) -> None:
    from headlens.cli.common import add_model_args

    toy = sub.add_parser("toy", help="a toy attention stack: planted heads, traces, the clustering demo",
                         description="Create a toy multi-head attention stack (MHA/MQA/GQA, causal or not, optional "
                                     "RoPE, pre-norm, residual), plant OV spectra, trace activations, and run "
                                     "headlens' pipelines on it.")
    tsub = toy.add_subparsers(dest="toy_command", metavar="ACTION")
    c = tsub.add_parser("create", help="build a toy and save it (.safetensors or .pt)")
    _toy_args(c)
    c.add_argument("--out", required=True, metavar="FILE", help="toy.safetensors or toy.pt")
    c.set_defaults(func=cmd_create)
    t = tsub.add_parser("trace", help="run inputs through a saved toy and export every layer's activations")
    t.add_argument("--weights", required=True, metavar="FILE", help="a toy saved by `headlens toy create`")
    _trace_args(t)
    t.add_argument("--out", required=True, metavar="STEM", help="writes STEM.safetensors and STEM.json")
    t.set_defaults(func=cmd_trace)
    k = tsub.add_parser("cluster", help="the token-clustering demo: deep shared-weight attention on the sphere")
    k.add_argument("--tokens", type=int, default=None)
    k.add_argument("--dim", type=int, default=None)
    k.add_argument("--depth", type=int, default=None, help="number of layers")
    k.add_argument("--beta", type=float, default=None, help="inverse temperature of the attention")
    k.add_argument("--seed", type=int, default=None)
    k.add_argument("--frame-seconds", type=float, default=0.5)
    k.add_argument("--out-dir", default="headlens-out/toy-cluster", metavar="DIR")
    k.set_defaults(func=cmd_cluster)
    r = tsub.add_parser("run", help="create, trace and analyse in one go (ov on every head, sphere on the stream)")
    _toy_args(r)
    _trace_args(r)
    r.add_argument("--latent-dim", type=int, default=4)
    r.add_argument("--out-dir", default="headlens-out/toy", metavar="DIR")
    r.set_defaults(func=cmd_run)
    toy.set_defaults(func=_no_action)


def _no_action(args) -> int:
    raise HeadlensError("choose an action: create, trace, cluster or run (see headlens toy --help)")


def _build(args):
    from headlens.toy.stack import ToyConfig, ToyStack, spectrum_profile

    cfg = ToyConfig(d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads,
                    head_dim=args.head_dim, n_layers=args.layers, causal=not args.no_causal, rope=args.rope,
                    pre_norm=not args.no_norm, residual=not args.no_residual)
    cfg.validate()
    model = ToyStack(cfg, seed=args.seed)
    planted = None
    if args.plant:
        planted = spectrum_profile(args.plant, cfg.head_dim, args.plant_rank, args.plant_decay)
        for layer in range(cfg.n_layers):
            for g in range(cfg.n_kv_heads):
                model.plant_ov(layer, g, planted, seed=args.seed * 1000 + layer * 100 + g)
    return model, planted


def cmd_create(args) -> int:
    from headlens.io.files import check_writable_dir
    from headlens.toy.stack import save_toy

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".pt"):
        raise HeadlensError(f"--out {out}: save the toy as .safetensors or .pt")
    check_writable_dir(out.parent)
    model, planted = _build(args)
    save_toy(model, out)
    c = model.cfg
    print(f"toy: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} query heads, {c.n_kv_heads} kv heads, "
          f"head_dim {c.head_dim}, causal={c.causal}, rope={c.rope}, pre_norm={c.pre_norm}, residual={c.residual}")
    if planted is not None:
        print("planted W_OV singular values: " + " ".join(f"{v:.3e}" for v in planted.tolist()))
    print(f"saved toy -> {out} (config: {out}.toy.json); analyse it with: headlens ov --weights {out} "
          f"--num-heads {c.n_heads}")
    return 0


def _inputs(args, d: int):
    from headlens.toy.stack import make_inputs

    if args.tokens < 2:
        raise HeadlensError(f"--tokens must be at least 2, got {args.tokens}")
    emb = None
    if args.inputs == "embeddings":
        if not args.embeddings_from:
            raise HeadlensError("--inputs embeddings needs --embeddings-from DIR (a HuggingFace model directory)")
        from headlens.io.tensors import open_path

        src = open_path(Path(args.embeddings_from))
        names = [k for k in src.keys() if k.endswith("embed_tokens.weight") or k.endswith("word_embeddings.weight")
                 or k.endswith("wte.weight") or k.endswith("embed_in.weight")]
        if not names:
            raise HeadlensError(f"no token embedding matrix found in {args.embeddings_from}")
        emb = src.read(names[0]).float()
        if emb.shape[1] != d:
            raise HeadlensError(f"the embeddings are {emb.shape[1]} wide but the toy's d_model is {d}: create the "
                                f"toy with --d-model {emb.shape[1]}")
    if not 0 < args.input_decay <= 1:
        raise HeadlensError(f"--input-decay must be in (0, 1], got {args.input_decay:g}")
    return make_inputs(args.inputs, args.tokens, d, seed=args.input_seed, decay=args.input_decay, embeddings=emb)


def cmd_trace(args) -> int:
    from headlens.io.files import check_writable_dir
    from headlens.toy.stack import load_toy, save_traces, trace

    if not Path(args.weights).exists():
        raise HeadlensError(f"--weights {args.weights}: no such file")
    check_writable_dir(Path(args.out).parent)
    model = load_toy(Path(args.weights))
    x = _inputs(args, model.cfg.d_model)
    traces = trace(model, x)
    st, js = save_traces(Path(args.out), model, traces, {"inputs": args.inputs, "input_seed": args.input_seed,
                                                          "weights": str(args.weights)})
    print(f"traced {x.shape[0]} {args.inputs} tokens through {len(traces)} layers")
    print(f"saved traces -> {st}\nsaved metadata -> {js}")
    return 0


def cmd_cluster(args) -> int:
    from headlens.io.files import check_writable_dir
    from headlens.toy.cluster import ClusterConfig, cluster_demo

    cfg = ClusterConfig()
    for attr, val in (("tokens", args.tokens), ("dim", args.dim), ("layers", args.depth), ("beta", args.beta),
                      ("seed", args.seed)):
        if val is not None:
            setattr(cfg, attr, val)
    if cfg.tokens < 4 or cfg.dim < 3 or cfg.layers < 1:
        raise HeadlensError("the clustering demo needs --tokens >= 4, --dim >= 3 and --depth >= 1")
    if args.frame_seconds <= 0:
        raise HeadlensError(f"--frame-seconds must be positive, got {args.frame_seconds:g}")
    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    res = cluster_demo(cfg, out_dir, frame_seconds=args.frame_seconds)
    m = res["metrics"]
    print(f"clustering demo: {cfg.tokens} tokens in {cfg.dim} dims, {cfg.layers} shared-weight layers, beta "
          f"{cfg.beta:g}")
    for row in m:
        print(f"layer {row['layer']:3d}: mean cos {row['mean_cos']:.3f}  clusters {row['n_clusters']}  eff. rank "
              f"{row['effective_rank']:.2f}")
    for key, path in res.items():
        if isinstance(path, Path):
            print(f"saved {key} -> {path}")
    print("\n".join(res.get("summary", [])))
    return 0


def cmd_run(args) -> int:
    """create -> trace -> ov on every head with the traced inputs -> sphere on the traced stream."""
    import torch

    from headlens.io.files import check_writable_dir, ensure_dir, write_json
    from headlens.io.checkpoint import open_model
    from headlens.circuits.ov import OVConfig, analyze_ov
    from headlens.residual.capture import PromptCapture
    from headlens.toy.stack import save_toy, save_traces, trace

    out_dir = Path(args.out_dir)
    check_writable_dir(out_dir)
    model, planted = _build(args)
    x = _inputs(args, model.cfg.d_model)
    ensure_dir(out_dir)
    wpath = save_toy(model, out_dir / "toy.safetensors")
    traces = trace(model, x)
    tpath, _ = save_traces(out_dir / "traces", model, traces, {"inputs": args.inputs})
    ck = open_model(weights=wpath, num_heads=model.cfg.n_heads)
    c = model.cfg
    k = min(args.latent_dim, c.head_dim)
    rows = []
    lines = [f"toy: {c.n_layers} layers, {c.n_heads} heads ({c.n_kv_heads} kv), head_dim {c.head_dim}; "
             f"{x.shape[0]} {args.inputs} tokens; latent_dim {k}"]
    for layer in range(c.n_layers):
        X = traces[layer]["attn_in"]
        cap = PromptCapture(input_ids=list(range(len(X))), tokens=[f"t{i}" for i in range(len(X))], attn_input=X,
                            attn_probs=traces[layer]["probs"])
        for head in range(c.n_heads):
            r = analyze_ov(ck, OVConfig(layer=layer, head=head, latent_dim=min(k, c.head_dim), traces=str(tpath)),
                           capture_fn=lambda cap=cap: cap)
            row = {"layer": layer, "head": head, "rank": r.rank, "rel_error": r.rel_error,
                   "cache_error_plain": r.cache_error, "data_aware_error": r.data_aware.whitened_error,
                   "heldout_data_aware": r.data_aware.heldout_whitened_error,
                   "heldout_plain": r.data_aware.heldout_plain_error, "singular_values": r.singular_values}
            if planted is not None:
                row["planted_max_rel_dev"] = float(
                    (torch.tensor(r.singular_values) - planted).abs().max() / planted.abs().max())
            rows.append(row)
            lines.append(f"layer {layer} head {head}: rank {r.rank}  rel_error {r.rel_error:.3e}  plain cache_error "
                         f"{r.cache_error:.3e}  data-aware {r.data_aware.whitened_error:.3e} (held-out "
                         f"{r.data_aware.heldout_whitened_error:.3e} vs plain {r.data_aware.heldout_plain_error:.3e})"
                         + (f"  |sigma - planted| / sigma_1 = {row['planted_max_rel_dev']:.1e}"
                            if planted is not None else ""))
    jpath = write_json(out_dir / "toy_ov.json", {"config": c.__dict__, "planted": None if planted is None
                                                  else planted.tolist(), "heads": rows})
    print("\n".join(lines + [f"saved toy -> {wpath}", f"saved traces -> {tpath}", f"saved json -> {jpath}"]),
          flush=True)
    from headlens.cli.sphere import _run_traces

    sphere_args = argparse.Namespace(traces=str(tpath), layers=None, workers=1, align=True, basis="layer",
                                     drop_first=False, drop_outliers=False, outlier_factor=8.0, cluster_threshold=0.9,
                                     seed=0, frame_seconds=1.0, no_labels=True, json=None, site="resid_pre")
    return _run_traces(sphere_args, out_dir / "sphere")
