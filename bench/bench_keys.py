"""Keys too: the trade-off from 40% to 80% of the KV cache saved (values alone, keys alone, both), and headlens's best
latent at 50% against transformers' FP8 cache, measured in one run on tiny-lm.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_keys.py [--ks 0,6,13,19,26,32,38] [--texts 32] [--prompt 8]
        [--json PATH]

1. ``run_compress`` on the embedded tiny-lm (its shipped eval and calibration texts), data-aware value and key
   latents at every ``--ks`` (uniform k per kv group): per k the values alone, the keys alone and both, each
   measured by compress (one forward pass per text, every position: KL, top-1, perplexity), at 2 bytes per number
   (KV saving: values or keys alone ``(hd - k) / 2hd``, both ``1 - k / hd``; rotary keys add 4 bytes a token and
   layer for positions).
2. The same texts decoded teacher-forced through each cache, which is how a cache is used: a ``--prompt``-token
   prefill, then one token a step, logits at every later position compared (KL, top-1) with DynamicCache's:
   transformers' ``QuantizedCache(backend="fp8")`` (``Fp8QuantizedLayer``: float8_e4m3 keys and values with one
   scale per tensor, frozen at the prefill; 50% of a 2-byte cache) and the LatentCache of every configuration within
   2 points of 50% saved. The FP8 cache keeps the prefill at full precision (its first update returns the states
   as they came); a LatentCache compresses the prefill too, so the comparison favours FP8 there if anywhere.

Nothing is tuned for the comparison: the sizes are fixed above, the latents data-aware on the shipped calibration
texts, the texts the shipped eval texts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def teacher_forced(model, ids: torch.Tensor, cache, prompt: int) -> torch.Tensor:
    """Log-probabilities (N - prompt, vocab) at positions prompt-1 .. N-2 (each predicting the next token): a prefill
    of ``prompt`` tokens, then one token a step through ``cache``."""
    out = []
    with torch.no_grad():
        logits = model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits[0, -1:]
        out.append(logits)
        for t in range(prompt, ids.shape[1] - 1):
            out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1:])
    return torch.log_softmax(torch.cat(out).double(), dim=-1)


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    kl, top, n = 0.0, 0, 0
    for a, b in zip(ref, got):
        kl += float((a.exp() * (a - b)).sum())
        top += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return {"kl_mean": kl / n, "top1_agreement": top / n, "positions": n}


def main(argv=None) -> int:
    import headlens as hl
    from headlens.io.embedded import default_texts
    from transformers import DynamicCache, QuantizedCache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="0,6,13,19,26,32,38", help="uniform latent sizes (default 0,6,13,19,26,32,38)")
    ap.add_argument("--texts", type=int, default=32, help="eval texts (default all 32 shipped)")
    ap.add_argument("--prompt", type=int, default=8, help="prefill tokens of the teacher-forced decode (default 8)")
    ap.add_argument("--json", type=Path, help="write everything measured here")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    texts = default_texts("tiny-lm")
    evals = texts.eval[: args.texts]
    t0 = time.perf_counter()
    cfg = hl.CompressConfig(ks=ks, latents="data-aware", keys="data-aware")
    r = hl.run_compress(hl.ModelSource(embedded="tiny-lm"), cfg, evals, texts.calib, keep_model=True)
    print(f"compress: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for c, m in r.pairs():
        rows.append({"name": c.name, "part": c.part, "k": c.target, "saving": m.kv.saving, "kl_mean": m.kl_mean,
                     "top1_agreement": m.top1_agreement, "ppl_before": m.ppl_before, "ppl_after": m.ppl_after})
    print("| configuration | part | KV saved | KL (nats) | top-1 | perplexity |")
    print("|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda x: (-x["saving"], x["part"])):
        if 0.39 <= row["saving"] <= 0.81:
            print(f"| {row['name']} | {row['part']} | {100 * row['saving']:.1f}% | {row['kl_mean']:.4f} | "
                  f"{100 * row['top1_agreement']:.1f}% | {row['ppl_before']:.2f} -> {row['ppl_after']:.2f} |")
    model, _, tok = r.kept[0], r.kept[1], r.kept[2]
    ids = [tok(t, return_tensors="pt")["input_ids"] for t in evals]
    ids = [i for i in ids if i.shape[1] > args.prompt + 1]
    t1 = time.perf_counter()
    ref = [teacher_forced(model, i, DynamicCache(config=model.config), args.prompt) for i in ids]
    decode = {"fp8 (transformers QuantizedCache)": compare(
        ref, [teacher_forced(model, i, QuantizedCache(backend="fp8", config=model.config), args.prompt) for i in ids])}
    decode["fp8 (transformers QuantizedCache)"]["saving"] = 0.5
    for row in rows:
        if abs(row["saving"] - 0.5) <= 0.02:
            got = [teacher_forced(model, i, r.latent_cache(row["name"]), args.prompt) for i in ids]
            decode[row["name"]] = {**compare(ref, got), "saving": row["saving"]}
    print(f"teacher-forced decode: {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    print(f"\nteacher-forced decode after a {args.prompt}-token prefill, against DynamicCache "
          f"({decode[next(iter(decode))]['positions']} positions):")
    print("| cache | KV saved | KL (nats) | top-1 |")
    print("|---|---|---|---|")
    for name, d in sorted(decode.items(), key=lambda x: x[1]["kl_mean"]):
        print(f"| {name} | {100 * d['saving']:.1f}% | {d['kl_mean']:.4f} | {100 * d['top1_agreement']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps({"compress": rows, "decode": decode, "ks": ks, "prompt": args.prompt},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
