"""`headlens trajectory` on 8 checkpoints of a Qwen3-shaped model: serial against Ray with 2 local workers.

Prints, measured side by side in one run (each command a fresh process, serial and Ray alternated, the minimum of
``--repeats`` runs each, the page cache warmed by one untimed serial run):

(a) Ray's start-up alone: a fresh process that imports ray, starts a local 2-CPU Ray, runs one task per CPU that
    imports torch (the workers' start), and shuts it down; the init, first-task and shutdown times;
(b) ``headlens trajectory --weights DIR --no-resume`` (serial, weight-only, with the QK side) and the same with
    ``--executor ray --workers 2``, and their ratio; the Ray run minus (a) (its compute and gathering) against the
    serial run;
(c) the serial run with one torch thread (``OMP_NUM_THREADS=1``): the serial run on 2 threads already uses the
    second core for the Gram products, so two one-thread Ray workers can at best halve *that* run; the overhead
    of Ray beyond that ideal (start-up excluded);
(d) the serial run's time per (checkpoint, layer), the tables' equality (the parquet files bit for bit).

The checkpoints (``--checkpoints`` 8, ``--layers`` 8 by default) have Qwen3-0.6B's attention (hidden 1024, 16
query heads, 8 kv heads, head_dim 128, q/k norms) with random bf16 weights (a different seed each, so no file is
read from another's cache), a 64-wide MLP and a 256-token vocabulary: the weight-only sweep reads only the
attention tensors. ``trainer_state.json`` gives each its step. The machine this was written for has 2 cores: two
Ray workers can at best halve the compute; each Ray task opens its checkpoint again, and the processes start once.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_trajectory.py [--checkpoints 8] [--layers 8] [--repeats 2]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLENS = [sys.executable, "-m", "headlens"]

RAY_START = r"""
import time, json
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
t2 = time.perf_counter()
@ray.remote(num_cpus=1)
def warm():
    import torch
    return torch.get_num_threads()
ray.get([warm.remote() for _ in range(2)])
t3 = time.perf_counter()
ray.shutdown()
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "init": t2 - t1, "first_tasks": t3 - t2, "shutdown": t4 - t3,
                  "total": t4 - t0}))
"""


def build(root: Path, n: int, layers: int) -> Path:
    """``n`` Qwen3-shaped checkpoints as a Trainer output directory (checkpoint-<step>/ with trainer_state.json)."""
    code = f"""
import json, torch
from pathlib import Path
from transformers import Qwen3Config, Qwen3ForCausalLM
root = Path({str(root)!r})
for i in range({n}):
    torch.manual_seed(1000 + i)
    cfg = Qwen3Config(vocab_size=256, hidden_size=1024, num_hidden_layers={layers}, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, intermediate_size=64, max_position_embeddings=512,
                      tie_word_embeddings=True)
    m = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    d = root / f"checkpoint-{{100 * i}}"
    m.save_pretrained(d)
    (d / "trainer_state.json").write_text(json.dumps({{"global_step": 100 * i}}))
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    return root


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def timed(argv: list[str], **env: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, env={**_env(), **env})
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(argv)}\n{out.stderr[-3000:]}")
    return dt, out.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="build (or reuse) the checkpoints here and keep them")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="headlens-bench-trajectory-"))
    try:
        run = args.keep or tmp / "run"
        if not (run / f"checkpoint-{100 * (args.checkpoints - 1)}" / "model.safetensors").exists():
            t0 = time.perf_counter()
            build(run, args.checkpoints, args.layers)
            print(f"built {args.checkpoints} checkpoints x {args.layers} layers in {time.perf_counter() - t0:.1f} s")
        size = sum(f.stat().st_size for f in run.rglob("*.safetensors"))
        print(f"checkpoints: {run} ({size / 1e6:.0f} MB of safetensors)")
        base = [*HEADLENS, "trajectory", "--weights", str(run), "--no-resume"]
        timed([*base, "--out-dir", str(tmp / "warm")])  # page cache and imports warmed, untimed
        starts, serial, serial1, ray = [], [], [], []
        for i in range(args.repeats):
            dt, out = timed([sys.executable, "-c", RAY_START])
            starts.append(json.loads(out.strip().splitlines()[-1]))
            serial.append(timed([*base, "--out-dir", str(tmp / f"serial{i}")])[0])
            serial1.append(timed([*base, "--out-dir", str(tmp / f"one{i}")], OMP_NUM_THREADS="1")[0])
            ray.append(timed([*base, "--out-dir", str(tmp / f"ray{i}"), "--executor", "ray", "--workers", "2"])[0])
        same = all((tmp / f"serial{i}" / "trajectory.parquet").read_bytes()
                   == (tmp / f"ray{i}" / "trajectory.parquet").read_bytes() for i in range(args.repeats))
        best = min(starts, key=lambda s: s["total"])
        s, r, s1 = min(serial), min(ray), min(serial1)
        cells = args.checkpoints * args.layers
        print(f"\nRay start-up alone (min of {args.repeats}): {best['total']:.1f} s = import {best['import']:.1f} + "
              f"init {best['init']:.1f} + first task per worker (spawn, import torch) {best['first_tasks']:.1f} + "
              f"shutdown {best['shutdown']:.1f}")
        print(f"serial: {s:.1f} s (runs {', '.join(f'{x:.1f}' for x in serial)}); "
              f"{1000 * s / cells:.0f} ms per (checkpoint, layer) including start-up and writing")
        print(f"serial on 1 torch thread: {s1:.1f} s (runs {', '.join(f'{x:.1f}' for x in serial1)}): the serial "
              f"run on 2 threads already uses the second core for {s1 / s:.2f}x")
        print(f"ray, 2 local workers: {r:.1f} s (runs {', '.join(f'{x:.1f}' for x in ray)})")
        print(f"speed-up serial / ray: {s / r:.2f}x; without Ray's start-up: serial / (ray - start-up) = "
              f"{s / max(1e-9, r - best['total']):.2f}x")
        ideal = s1 / 2
        print(f"ideal on 2 one-thread workers: serial(1 thread) / 2 = {ideal:.1f} s; Ray's tasks and gathering took "
              f"{r - best['total']:.1f} s (overhead {r - best['total'] - ideal:+.1f} s beyond the ideal, "
              f"{(r - best['total'] - ideal) / max(1, len(list(run.glob('checkpoint-*')))):.2f} s per checkpoint)")
        print(f"tables identical (parquet bytes): {same}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
