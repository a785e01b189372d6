"""KV cache bytes, decode speed and peak memory: DynamicCache, LatentCache (rebuilding and absorbed) and transformers'
FP8 cache, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_cache.py [--models tiny-lm,wide] [--prompt 2048] [--new 256]
        [--ks 8,4,2] [--repeats 1] [--threads 1] [--keep DIR]

Models: the embedded tiny-lm (Qwen3, 6 layers, d 256, 8 query / 2 kv heads, head_dim 64; float32) and ``wide``, a
random Qwen3-shaped model built here (d 1024, 8 layers, 16 query / 4 kv heads, head_dim 128, MLP 3072, vocabulary
32,000, tied embeddings: 150.0M parameters, 600 MB in float32), saved with ``save_pretrained`` to a temporary
directory. Latents: ``plan_layers`` (plain) on the saved checkpoint, at k = head_dim / 8, / 4, / 2 (``--ks``) in
every layer and kv group.

Each configuration runs in its own process (the model loaded, the cache built, one greedy ``generate`` of ``--new``
tokens after a ``--prompt``-token prompt of random token ids, seeded). Measured there:

- cache bytes: every tensor the cache layers hold after generate (keys, values or latents, FP8 states and their
  scales; not LatentCache's factors), summed from the tensors; against the bytes planned for that many tokens;
- prefill: the time to the first new token; decode tokens/s: the new tokens after the first over the time they took
  (a stopping criterion timestamps each step), the model's default attention (sdpa) unless absorbed;
- peak RSS of the generate call (after a 16-token warm-up generate that pages in the memory-mapped weights), in two
  phases: the process's peak resident set is reset (``/proc/self/clear_refs``)
  just before generate and again when the first new token is out, and read (VmHWM) at that token and at the end;
  printed as the prefill's peak above the RSS before generate (the model and the code are already resident) and the
  decoding's peak above the RSS at the first token (memory freed after the prefill stays with the process and is
  reused, so the decoding's growth is what it needs beyond that).

Configurations per model: DynamicCache; transformers' ``QuantizedCache(backend="fp8")`` (``Fp8QuantizedLayer``, the
quantized cache layer that runs here: quanto and HQQ need the optimum-quanto / hqq packages, not installed); per k,
LatentCache with ``absorbed=False`` (values rebuilt from every cached latent at every step) and LatentCache under
``absorbed_attention(model)`` (attention reads the latents). With ``--repeats R`` the whole set runs R times in turn
and medians are printed. The target: absorbed decode throughput >= 1.0x DynamicCache's at k = head_dim / 4 on the
2,048-token context.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WIDE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
            intermediate_size=3072, vocab_size=32000, max_position_embeddings=8192, tie_word_embeddings=True)
TARGET = 1.0


# ------------------------------------------------------------------------------------------------ the worker


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _held_bytes(cache) -> int:
    """Bytes of the distinct tensors held by the cache layers' attributes (tuples followed), LatentCache's factors
    (``latents``, ``_ready``) left out."""
    import torch

    seen, total = set(), 0
    stack = [v for layer in cache.layers for key, v in vars(layer).items() if key not in ("latents", "_ready")]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.numel() and (x.data_ptr(), x.numel()) not in seen:
                seen.add((x.data_ptr(), x.numel()))
                total += x.numel() * x.element_size()
        elif isinstance(x, (tuple, list)):
            stack.extend(x)
    return total


def worker(spec: dict) -> dict:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, StoppingCriteria, StoppingCriteriaList
    from transformers.cache_utils import QuantizedCache

    from headlens.compress.absorbed import absorbed_attention
    from headlens.compress.cache import LatentCache
    from headlens.compress.plan import plan_layers
    from headlens.io.source import ModelSource

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32).eval()
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (1, spec["prompt"]), generator=torch.Generator().manual_seed(1))
    kind, k = spec["cache"], spec.get("k")
    if kind in ("rebuild", "absorbed"):
        ck = ModelSource(weights=spec["dir"]).checkpoint()
        plans = plan_layers(ck, {layer: k for layer in range(cfg.num_hidden_layers)}, "plain")

    def make():
        if kind == "dynamic":
            return DynamicCache(config=cfg)
        if kind == "fp8":
            return QuantizedCache(backend="fp8", config=cfg)
        return LatentCache.from_plans(model, ck, plans, absorbed=kind == "absorbed")

    def context():
        return absorbed_attention(model) if kind == "absorbed" else contextlib.nullcontext()

    # a short warm-up generate: the weights (memory-mapped by from_pretrained) are paged in on their first use, which
    # would otherwise count as the prefill's memory and time
    with context(), torch.no_grad():
        model.generate(ids[:, :16], past_key_values=make(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    cache = make()

    stamps: list[float] = []

    at_first: list[int] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            if len(stamps) == 1:  # the prefill is done: from here the peak is the decoding's
                st = _status()
                at_first.extend([st["VmRSS"], st["VmHWM"]])
                Path("/proc/self/clear_refs").write_text("5")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    new = spec["new"]
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the RSS now
    before = _status()["VmRSS"]
    t0 = time.perf_counter()
    with context(), torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([Clock()]), pad_token_id=0)
    decode_peak = _status()["VmHWM"]
    prefill_peak = at_first[1]
    G, hd, L = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    T = spec["prompt"] + new - 1  # the last new token is never cached
    per_token = {"dynamic": 2 * G * hd * 4, "fp8": 2 * G * hd * 1}.get(kind, (G * hd + G * (k or 0)) * 4)
    planned = L * T * per_token + (L * 2 * 4 if kind == "fp8" else 0)  # fp8: one float32 scale per tensor
    held = _held_bytes(cache)
    if kind in ("rebuild", "absorbed"):
        assert held == cache.nbytes(), (held, cache.nbytes())
    return {"cache": kind, "k": k, "bytes": held, "planned": planned, "prefill_s": stamps[0] - t0,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "rss_before": before,
            "prefill_peak": prefill_peak, "rss_first": at_first[0], "decode_peak": decode_peak,
            "tokens": out[0, spec["prompt"]:].tolist()}


# ------------------------------------------------------------------------------------------------ the driver


def build_wide(directory: Path) -> int:
    """The random Qwen3-shaped model, saved to ``directory``; its parameter count."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(**WIDE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    assert 140e6 < n < 160e6, n  # the size the docstring states
    model.save_pretrained(directory)
    return n


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        sys.exit(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(name: str, hd: int, rows: list[list[dict]], prompt: int) -> list[str]:
    """Markdown lines: one row per configuration (medians over the repeats), ratios against DynamicCache."""
    med = [{**r[0], "decode_tok_s": statistics.median(x["decode_tok_s"] for x in r),
            "prefill_s": statistics.median(x["prefill_s"] for x in r),
            "grow": statistics.median(x["prefill_peak"] - x["rss_before"] for x in r),
            "grow_decode": statistics.median(x["decode_peak"] - x["rss_first"] for x in r)} for r in rows]
    dyn = next(m for m in med if m["cache"] == "dynamic")
    rebuild = {m["k"]: m for m in med if m["cache"] == "rebuild"}
    lines = [f"### {name} (head_dim {hd}), {prompt}-token prompt, {len(rows[0][0]['tokens'])} new tokens, "
             f"{len(rows[0])} run(s) each", "",
             "| cache | k | bytes | / planned | / DynamicCache | prefill s | decode tok/s | / DynamicCache | "
             "peak RSS growth MiB: prefill, decode | tokens = rebuilding |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in med:
        same = "" if m["cache"] != "absorbed" else ("yes" if m["tokens"] == rebuild[m["k"]]["tokens"] else "NO")
        label = {"dynamic": "DynamicCache", "fp8": "QuantizedCache fp8", "rebuild": "LatentCache rebuilding",
                 "absorbed": "LatentCache absorbed"}[m["cache"]]
        lines.append(f"| {label} | {m['k'] if m['k'] is not None else hd} | {m['bytes']:,} | "
                     f"{m['bytes'] / m['planned']:.4f} | {m['bytes'] / dyn['bytes']:.3f} | {m['prefill_s']:.2f} | "
                     f"{m['decode_tok_s']:.1f} | {m['decode_tok_s'] / dyn['decode_tok_s']:.2f}x | "
                     f"{max(m['grow'], 0) / 2**20:.0f}, {max(m['grow_decode'], 0) / 2**20:.0f} | {same} |")
    quarter = next((m for m in med if m["cache"] == "absorbed" and m["k"] == hd // 4), None)
    if quarter is not None:
        ratio = quarter["decode_tok_s"] / dyn["decode_tok_s"]
        per_run = [a["decode_tok_s"] / d["decode_tok_s"] for a, d in
                   zip(rows[med.index(quarter)], rows[med.index(dyn)])]
        lines += ["", f"absorbed at k = {hd // 4} vs DynamicCache, decode throughput: {ratio:.2f}x (per run: "
                  f"{', '.join(f'{r:.2f}x' for r in per_run)}; target >= {TARGET:.1f}x: "
                  f"{'met' if ratio >= TARGET else 'MISSED'})"]
    off = [m for m in med if abs(m["bytes"] / m["planned"] - 1) > 0.01]
    lines.append(f"bytes within 1% of planned: {'all' if not off else 'NOT ' + ', '.join(m['cache'] for m in off)}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-lm,wide", help="comma-separated: tiny-lm, wide")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens (default 2048)")
    ap.add_argument("--new", type=int, default=256, help="new tokens (default 256)")
    ap.add_argument("--ks", default="8,4,2", help="latent sizes as head_dim / x (default 8,4,2)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of the whole set, medians printed (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each run (default 1: steady on a shared machine; 0: torch's default)")
    ap.add_argument("--keep", type=Path, help="a directory for the wide model (kept; reused if it holds one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    from headlens.io.embedded import embedded_dir

    tmp = tempfile.TemporaryDirectory(prefix="bench-cache-")
    out = [f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_cache.py --models {args.models} --prompt "
           f"{args.prompt} --new {args.new} --ks {args.ks} --repeats {args.repeats} --threads {args.threads}`", ""]
    for name in args.models.split(","):
        if name == "tiny-lm":
            directory, hd = embedded_dir("tiny-lm"), 64
        elif name == "wide":
            directory, hd = args.keep or Path(tmp.name) / "wide", WIDE["head_dim"]
            if not (directory / "config.json").is_file():
                print(f"wide: {build_wide(directory) / 1e6:.1f}M parameters, saved to {directory}", flush=True)
        else:
            sys.exit(f"unknown model {name!r}: tiny-lm or wide")
        specs = [{"cache": "dynamic"}, {"cache": "fp8"}]
        for x in args.ks.split(","):
            specs += [{"cache": "rebuild", "k": hd // int(x)}, {"cache": "absorbed", "k": hd // int(x)}]
        rows: list[list[dict]] = [[] for _ in specs]
        for r in range(args.repeats):
            for i, spec in enumerate(specs):
                res = run_worker({**spec, "dir": str(directory), "prompt": args.prompt, "new": args.new,
                                  "threads": args.threads})
                rows[i].append(res)
                print(f"[{name} run {r + 1}] {spec['cache']:8s} k={spec.get('k')}: {res['decode_tok_s']:.1f} tok/s, "
                      f"prefill {res['prefill_s']:.1f} s, {res['bytes']:,} bytes", flush=True)
        out += table(name, hd, rows, args.prompt) + [""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
