"""Allocation on the end metric (issue 24's acceptance): at 50/60/70% of the whole KV cache saved, each way of
spending the bytes (error, fisher, greedy) against the uniform allocation of the same bytes, measured by compress on
tiny-lm and tiny-moe (next-token KL) and MiniLM (1 - embedding cosine), in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_allocate.py [--models tiny-lm,tiny-moe,minilm]
        [--savings 0.5,0.6,0.7] [--methods error,fisher,greedy] [--max-calib-tokens 2048] [--eval-texts N]
        [--eval-fold I/F] [--lambda-depths K[,K...]] [--json PATH] [--out DIR]

Per model and method one ``run_compress`` (``CompressConfig(savings=..., allocate=method, latents="data-aware",
keys="data-aware")``) on the embedded model's shipped eval and calibration texts: data-aware value and key latents
fitted on the calibration texts, every value and key latent sized by the method out of one byte budget (keys and
values compete for the same bytes; rotary key layers' int32 positions are a fixed cost), and beside each the uniform
allocation of exactly the same bytes (its ``matches``), all measured on the eval texts (one forward pass per text,
every position). The greedy allocation's per-layer sensitivities are probed on the calibration texts (each layer's
keys or values alone cut to half), the Fisher scores are squared gradients of the calibration loss: nothing is
chosen on the eval texts. ``allocation s`` is ``result.seconds["allocation"]`` (the probes, or the Fisher pass; the
error and uniform rules are arithmetic on the spectra, not timed apart).

The uniform twin comes with every run: it is printed once per model and saving, and the runs' uniform numbers are
checked to agree (same plans, same texts: they must be identical up to float noise). Each row: the method's end
metric, the uniform's at the same bytes, their ratio (below 0.90: the method beats uniform by >= 10%, the issue's
goal at the tightest saving), the measured saving (KV bytes per token read from the plans, positions counted), the
split of the latent numbers between values and keys, and the allocation's wall time. The figure (``--out``): saving
against the end metric, one line per method and uniform, log y, one panel per model. For the greedy runs the
rule's own model is printed beside the measurement (``sum lambda * predicted squared error`` of the greedy sizes and
of the uniform's) with the lambdas, and with ``--lambda-depths`` each lambda probed again at other cut depths.

Nothing is tuned: the savings are the issue's, the texts the shipped ones, every method runs with its defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("tiny-lm", "tiny-moe", "minilm")
METHODS = ("error", "fisher", "greedy")
GOAL = 0.9  # the goal: >= 10% below uniform at the tightest saving


def _csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def _sizes(c) -> dict:
    """Per layer the value and key latent sizes (numbers per token, summed over kv groups) and per kv group."""
    return {"values": {str(layer): list(v) for layer, v in c.ks.items()},
            "keys": {str(layer): list(v) for layer, v in (c.key_ks or {}).items()}}


@contextlib.contextmanager
def _recorded():
    """Records, without changing them, what the greedy allocation was given: the slots (their spectra) and the
    sensitivities probed on the calibration texts (``allocation.slots_of`` and ``probe_sensitivities``, which
    ``run_compress`` looks up at call time)."""
    from headlens.compress import allocation

    seen: dict = {}
    slots_of, probe = allocation.slots_of, allocation.probe_sensitivities

    def slots_rec(*a, **k):
        out = slots_of(*a, **k)
        seen.setdefault("slots", out)
        return out

    def probe_rec(*a, **k):
        out = probe(*a, **k)
        seen["sensitivity"], seen["probe_args"] = out, a
        return out

    allocation.slots_of, allocation.probe_sensitivities = slots_rec, probe_rec
    try:
        yield seen
    finally:
        allocation.slots_of, allocation.probe_sensitivities = slots_of, probe


def lambda_at_depths(args: tuple, depths: list[int]) -> dict[str, dict[int, float]]:
    """The greedy rule's lambda of each (layer, part) probed again with that part cut to each of ``depths`` instead
    of head_dim / 2 (the same probe as ``allocation.probe_sensitivities``, on the same calibration texts), relative
    to the lambda at head_dim / 2: how far the quadratic model holds away from the point it was fitted at."""
    from headlens.compress.allocate import cut
    from headlens.compress.allocation import end_metric, slots_of
    from headlens.compress.keys import cut_keys
    from headlens.compress.measure import measure_many

    model, ck, tok, texts, values_full, keys_full, kv_bytes = args[:7]
    hd = ck.shape.head_dim
    half = hd // 2
    slots = slots_of(values_full, keys_full)
    probes = sorted({(s.layer, s.part) for s in slots})
    lam: dict[tuple[int, str], dict[int, float]] = {}
    for k0 in sorted({k for k in depths if 1 <= k < hd} | {half}):  # depths outside 1..head_dim-1 skipped
        plan_sets, key_sets = [], []
        for layer, part in probes:
            p = (values_full if part == "values" else keys_full)[layer]
            plan_sets.append({layer: cut(p, [k0] * len(p.groups))} if part == "values" else {})
            key_sets.append({layer: cut_keys(p, [k0] * len(p.groups))} if part == "keys" else {})
        measured = measure_many(model, ck, tok, plan_sets, texts, bytes_per_value=kv_bytes, disable=True,
                                key_plans=key_sets)
        for (layer, part), m in zip(probes, measured):
            err = sum(s.tail2(k0) for s in slots if (s.layer, s.part) == (layer, part))
            lam.setdefault((layer, part), {})[k0] = end_metric(m) / err if err > 0 else float("nan")
    return {f"{layer} {part}": {k: v / d[half] if d[half] > 0 else float("nan") for k, v in d.items()}
            for (layer, part), d in lam.items()}


def run_one(model: str, method: str, savings: list[float], evals: list[str], calib: list[str], max_calib: int,
            depths: list[int] | None = None) -> dict:
    import headlens as hl
    from headlens.compress.allocation import end_metric
    from headlens.compress.run import run_compress

    cfg = hl.CompressConfig(savings=savings, allocate=method, latents="data-aware", keys="data-aware",
                            max_calib_tokens=max_calib)
    t0 = time.perf_counter()
    with _recorded() as seen:
        r = run_compress(hl.ModelSource(embedded=model), cfg, evals, calib, disable=True)
    wall = time.perf_counter() - t0
    lam = seen.get("sensitivity")
    by_depth = lambda_at_depths(seen["probe_args"], depths) if depths and "probe_args" in seen else None
    slots = seen.get("slots")
    rows = []
    for c, m in r.pairs():
        predicted = None
        if lam is not None and slots is not None:  # the greedy rule's model of this configuration's metric
            sizes = {**{(layer, g, "values"): k for layer, v in c.ks.items() for g, k in enumerate(v)},
                     **{(layer, g, "keys"): k for layer, v in (c.key_ks or {}).items() for g, k in enumerate(v)}}
            predicted = sum(lam[(s.layer, s.part)] * s.tail2(sizes[s.key]) for s in slots)
        rows.append({"name": c.name, "allocation": c.allocation, "matches": c.matches, "saving_target": c.target,
                     "saving": m.kv.saving, "kv_bytes_after": m.kv.total_after, "kv_bytes_before": m.kv.total_before,
                     "metric": end_metric(m), "kl_mean": m.kl_mean, "cosine": m.embedding_cosine_mean,
                     "top1_agreement": m.top1_agreement, "ppl_before": m.ppl_before, "ppl_after": m.ppl_after,
                     "value_dims": c.latent_dims, "key_dims": c.key_dims, "sizes": _sizes(c),
                     "predicted": predicted})
    return {"model": model, "method": method, "task": r.task, "wall_s": wall, "seconds": dict(r.seconds),
            "lambda_by_depth": by_depth,
            "sensitivity": None if lam is None else {f"{layer} {part}": v for (layer, part), v in sorted(lam.items())},
            "calibration_tokens": r.calibration_tokens, "eval_texts": len(evals), "notes": list(r.notes),
            "rows": rows}


def table(model: str, runs: list[dict], savings: list[float]) -> tuple[list[str], dict]:
    """The markdown table of one model, and per saving the uniform spread across runs and the verdicts."""
    metric = "KL (nats)" if runs[0]["task"] != "embedding" else "1 - cosine"
    lines = [f"| saving | method | {metric} | uniform, same bytes | ratio | KV saved (measured) | values + keys numbers "
             "| allocation s |", "|---|---|---|---|---|---|---|---|"]
    verdict = {}
    for v in savings:
        unis = []
        for run in runs:
            for row in run["rows"]:
                if row["allocation"] == "uniform" and abs(row["saving_target"] - v) < 1e-9:
                    unis.append(row)
        if not unis:
            continue
        u = unis[0]
        spread = max(r["metric"] for r in unis) / min(r["metric"] for r in unis) - 1 if min(
            r["metric"] for r in unis) > 0 else 0.0
        verdict[v] = {"uniform": u["metric"], "uniform_spread": spread, "methods": {}}
        lines.append(f"| {100 * v:g}% | uniform | {u['metric']:.3g} | | 1 | {100 * u['saving']:.2f}% | "
                     f"{u['value_dims']} + {u['key_dims']} | |")
        for run in runs:
            for row in run["rows"]:
                if row["allocation"] != run["method"] or abs(row["saving_target"] - v) > 1e-9:
                    continue
                twin = next(r for r in run["rows"] if r["matches"] == row["name"])
                ratio = row["metric"] / twin["metric"] if twin["metric"] > 0 else float("nan")
                alloc = run["seconds"].get("allocation")
                verdict[v]["methods"][run["method"]] = {"metric": row["metric"], "uniform": twin["metric"],
                                                        "ratio": ratio}
                lines.append(f"| {100 * v:g}% | {run['method']} | {row['metric']:.3g} | {twin['metric']:.3g} | "
                             f"{ratio:.2f} | {100 * row['saving']:.2f}% | {row['value_dims']} + {row['key_dims']} | "
                             f"{'' if alloc is None else f'{alloc:.0f}'} |")
    return lines, verdict


def figure(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure", file=sys.stderr)
        return None
    models = [m for m in results if results[m]]
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        runs = results[model]
        lines: dict[str, dict[float, float]] = {}
        for run in runs:
            for row in run["rows"]:
                how = row["allocation"]
                if how == "uniform" and "uniform" in lines and row["saving_target"] in lines["uniform"]:
                    continue
                lines.setdefault(how, {})[row["saving"]] = row["metric"]
        for how, pts in sorted(lines.items(), key=lambda x: x[0] != "uniform"):
            xs = sorted(pts)
            ax.plot([100 * x for x in xs], [pts[x] for x in xs], marker="o", label=how,
                    linestyle="--" if how == "uniform" else "-", color="black" if how == "uniform" else None)
        ax.set_yscale("log")
        ax.set_xlabel("KV cache saved (%)")
        ax.set_ylabel("next-token KL (nats)" if runs[0]["task"] != "embedding" else "1 - embedding cosine")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_allocate.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    from headlens.io.embedded import default_texts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"embedded models (default {','.join(MODELS)})")
    ap.add_argument("--savings", default="0.5,0.6,0.7", help="savings of the whole KV cache (default 0.5,0.6,0.7)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"allocations measured against uniform (default {','.join(METHODS)})")
    ap.add_argument("--max-calib-tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    ap.add_argument("--eval-texts", type=int, default=None, help="the first N shipped eval texts (default all)")
    ap.add_argument("--eval-fold", default=None, metavar="I/F",
                    help="only eval texts I, I+F, I+2F, ... (after --eval-texts): a noise check on disjoint folds")
    ap.add_argument("--lambda-depths", default=None, metavar="K[,K...]",
                    help="also probe the greedy rule's lambdas with each part cut to these k (a diagnostic: 2 x "
                         "layers passes over the calibration texts per k)")
    ap.add_argument("--json", type=Path, help="write everything measured here (after every run)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="the figure's folder (default bench/out/)")
    args = ap.parse_args(argv)
    models, methods = _csv(args.models), _csv(args.methods)
    savings = _csv(args.savings, float)
    results: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    for model in models:
        texts = default_texts(model)
        evals = list(texts.eval)[: args.eval_texts] if args.eval_texts else list(texts.eval)
        if args.eval_fold:
            i, f = (int(x) for x in args.eval_fold.split("/"))
            evals = evals[i::f]
        results[model] = []
        for method in methods:
            run = run_one(model, method, savings, evals, list(texts.calib), args.max_calib_tokens,
                          _csv(args.lambda_depths, int) if args.lambda_depths and method == "greedy" else None)
            results[model].append(run)
            secs = ", ".join(f"{k} {v:.0f} s" for k, v in run["seconds"].items())
            print(f"{model} {method}: {run['wall_s']:.0f} s ({secs})", file=sys.stderr, flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "out": str(args.out)},
                                                 "results": results}, indent=1, default=str) + "\n")
    verdicts = {}
    for model in models:
        runs = results[model]
        run0 = runs[0]
        print(f"\n### {model}: {run0['eval_texts']} eval texts, {run0['calibration_tokens']} calibration tokens, "
              f"data-aware value and key latents")
        lines, verdicts[model] = table(model, runs, savings)
        print("\n".join(lines))
        spread = max((v["uniform_spread"] for v in verdicts[model].values()), default=0.0)
        print(f"\nthe uniform twins of the {len(runs)} runs agree within {100 * spread:.2g}%")
        tight = max(savings)
        g = verdicts[model].get(tight, {}).get("methods", {}).get("greedy")
        if g is not None:
            beats = g["ratio"] <= GOAL
            print(f"greedy at {100 * tight:g}%: {g['metric']:.3g} vs uniform {g['uniform']:.3g} (ratio "
                  f"{g['ratio']:.2f}): {'beats' if beats else 'does not beat'} uniform by >= 10%")
    for model in models:
        g = next((run for run in results[model] if run["method"] == "greedy"), None)
        if g is None or g["sensitivity"] is None:
            continue
        print(f"\n{model}: the greedy rule's model, sum over latents of lambda * predicted squared error, against "
              "the measurement")
        print("| saving | predicted greedy | predicted uniform | predicted ratio | measured greedy | measured uniform "
              "| measured ratio |")
        print("|---|---|---|---|---|---|---|")
        for row in g["rows"]:
            if row["allocation"] != "greedy":
                continue
            twin = next(r for r in g["rows"] if r["matches"] == row["name"])
            print(f"| {100 * row['saving_target']:g}% | {row['predicted']:.3g} | {twin['predicted']:.3g} | "
                  f"{row['predicted'] / twin['predicted']:.2f} | {row['metric']:.3g} | {twin['metric']:.3g} | "
                  f"{row['metric'] / twin['metric']:.2f} |")
        lam = g["sensitivity"]
        for part in ("values", "keys"):
            per = [(k.split()[0], v) for k, v in lam.items() if k.endswith(part)]
            print(f"lambda {part} by layer: " + " ".join(f"{layer}:{v:.3g}" for layer, v in per))
        if g.get("lambda_by_depth"):
            print("lambda probed with the part cut to k, over lambda at head_dim / 2 (the greedy rule's), per layer:")
            for name, d in g["lambda_by_depth"].items():
                print(f"  layer {name:9s} " + " ".join(f"k={k}: {v:.2f}" for k, v in sorted(d.items(), key=lambda x: int(x[0]))))
    path = figure(results, args.out)
    if path:
        print(f"\nfigure: {path}", file=sys.stderr)
    print(f"total: {time.perf_counter() - t_all:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "out": str(args.out)},
                                         "results": results, "verdicts": {m: {str(k): v for k, v in d.items()}
                                                                          for m, d in verdicts.items()}},
                                        indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
