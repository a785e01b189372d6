"""`headlens compress` on the embedded tiny-lm: the trade-off table, and the command's wall time against the
bare forward passes it must do.

Prints, measured side by side in one run:

(a) the trade-off table of ``headlens compress --model tiny-lm --target-error 0.1,0.2,0.4`` (plain and
    data-aware latents, each next to the uniform allocation of the same KV bytes): KV saving, mean and p95 KL,
    top-1 agreement, perplexity before and after, on ``--eval-texts`` held-out paragraphs of the training
    corpus (``tools/train/heldout.txt``, never trained on, disjoint from the shipped calibration texts);
(b) the command's wall time (a fresh process: start-up, imports, loading, calibration, fitting, every eval
    pass, figures and page) and its own breakdown (``seconds`` in ``compress_summary.json``);
(c) the bare forward passes the command must do, timed in a fresh process on the same model and texts: one
    pass over the calibration texts (up to the command's 2048-token cap) plus one pass over the eval texts per
    configuration (batch 1, no grad, float32, the default attention); and the ratio command / passes
    (target <= 2x). The command also runs the unmodified model once per text, re-runs each compressed layer's
    attention block per configuration (the isolated error) and computes float64 log-softmaxes for KL: what it
    does beyond the bare passes is in the ratio.

    .venv/bin/python bench/bench_compress.py [--eval-texts 96] [--repeats 3] [--keep DIR]

The command and the bare passes run in interleaved pairs (the machine's speed drifts by tens of percent between
minutes on a shared 2-core machine); each pair's ratio is printed and the median is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = "0.1,0.2,0.4"
TARGET_RATIO = 2.0

BARE_CHILD = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from headlens.io.embedded import default_texts, embedded_dir
path = embedded_dir("tiny-lm")
model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(str(path))
calib = default_texts("tiny-lm").calib
evals = [t for t in open(sys.argv[1]).read().splitlines() if t.strip()]
n_configs = int(sys.argv[2])
def ids_of(texts, cap=None):
    out, n = [], 0
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        if cap is not None:
            ids = ids[:, : cap - n]
            if ids.shape[1] == 0:
                break
            n += ids.shape[1]
        out.append(ids)
    return out
c_ids, e_ids = ids_of(calib, 2048), ids_of(evals)
with torch.no_grad():
    model(input_ids=e_ids[0])  # warm-up, not timed
    t0 = time.perf_counter()
    for ids in c_ids:
        model(input_ids=ids)
    t_calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_configs):
        for ids in e_ids:
            model(input_ids=ids)
    t_eval = time.perf_counter() - t0
print(json.dumps({"calib_s": t_calib, "eval_s": t_eval, "calib_tokens": sum(i.shape[1] for i in c_ids),
                  "eval_tokens": sum(i.shape[1] for i in e_ids), "threads": torch.get_num_threads()}))
"""


def eval_texts(n: int) -> list[str]:
    """Held-out paragraphs (200..600 characters, each once) that are not among the shipped calibration texts."""
    sys.path.insert(0, str(ROOT / "src"))
    from headlens.io.embedded import default_texts

    calib = set(default_texts("tiny-lm").calib)
    lines = (ROOT / "tools" / "train" / "heldout.txt").read_text(encoding="utf-8").splitlines()
    paras = list(dict.fromkeys(ln.strip() for ln in lines if 200 <= len(ln.strip()) <= 600))
    return [p for p in paras if p not in calib][:n]


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-texts", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved (command, bare passes) pairs; the median pair ratio is the result")
    ap.add_argument("--keep", metavar="DIR", help="keep the command's outputs here")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = eval_texts(args.eval_texts)
        eval_file = tmp / "eval.txt"
        eval_file.write_text("\n".join(texts) + "\n")
        out_dir = Path(args.keep) if args.keep else tmp / "out"
        walls, bares, summary = [], [], None
        n_configs = None
        for i in range(args.repeats):  # interleaved, so that both programs see the machine in the same state
            d = out_dir if i == 0 else tmp / f"out{i}"
            if d.exists():
                import shutil

                shutil.rmtree(d)
            wall, _ = run([py, "-m", "headlens", "compress", "--model", "tiny-lm", "--target-error", TARGETS,
                           "--eval", str(eval_file), "--out-dir", str(d)], env)
            walls.append(wall)
            summary = summary or json.loads((d / "compress_summary.json").read_text())
            n_configs = len(summary["configurations"])
            _, out = run([py, "-c", BARE_CHILD, str(eval_file), str(n_configs)], env)
            bares.append(json.loads(out.strip().splitlines()[-1]))
    pair_ratios = [w / (b["calib_s"] + b["eval_s"]) for w, b in zip(walls, bares)]
    bare = min(bares, key=lambda b: b["calib_s"] + b["eval_s"])
    wall = min(walls)
    passes = bare["calib_s"] + bare["eval_s"]
    print(f"tiny-lm, {summary['eval_texts']} eval texts ({summary['eval_tokens']} tokens), "
          f"{summary['calibration_tokens']} calibration tokens, {n_configs} configurations, "
          f"torch threads {bare['threads']}")
    print()
    print(f"{'configuration':42s} {'saving':>7s} {'KL mean':>8s} {'KL p95':>8s} {'top-1':>6s} {'ppl':>16s}")
    for r in summary["configurations"]:
        print(f"{r['name']:42s} {100 * r['saving']:6.1f}% {r['kl_mean']:8.4f} {r['kl_p95']:8.4f} "
              f"{100 * r['top1_agreement']:5.1f}% {r['ppl_before']:7.2f} -> {r['ppl_after']:6.2f}")
    print()
    for c in summary["comparisons"]:
        if c["better"] is not None:
            print(f"at {100 * c['saving']:.1f}% saved: {c['a']} {c['a_value']:.4f} vs {c['b']} {c['b_value']:.4f}"
                  f" -> {c['better']} is better")
    print()
    sec = summary["seconds"]
    print(f"command wall (fresh process, min of {args.repeats}): {wall:.2f} s   "
          f"[inside the first run: load {sec.get('load', 0):.2f}, calibration {sec.get('calibration', 0):.2f}, fit "
          f"{sec.get('fit', 0):.2f}, eval {sec.get('eval', 0):.2f}; the rest is start-up, imports and the report]")
    print(f"bare passes: calibration {bare['calib_s']:.2f} s ({bare['calib_tokens']} tokens) + {n_configs} eval "
          f"passes {bare['eval_s']:.2f} s = {passes:.2f} s")
    ratio = wall / passes
    inner = (sec.get("calibration", 0) + sec.get("eval", 0)) / passes
    import statistics

    med = statistics.median(pair_ratios)
    print(f"ratio command / bare passes, min over min: {ratio:.2f}x; per interleaved pair: "
          f"{', '.join(f'{r:.2f}x' for r in pair_ratios)} (median {med:.2f}x; target <= {TARGET_RATIO:g}x: "
          f"{'met' if med <= TARGET_RATIO else 'NOT met'}); calibration + eval sections alone / bare passes: "
          f"{inner:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
