"""`headlens sweep` streams the weights: its peak memory does not grow with the size of the model.

A Qwen3-shaped checkpoint several times larger than the memory bound is written to tmp_path
(bench/make_qwen3_4b_attention.py at a small width, float32). Two fresh child processes report their own
peak RSS (VmHWM from /proc/self/status at exit; see PEAK
for why not ``ru_maxrss``):

- the baseline: imports headlens, torch and the libraries the sweep's output stage imports (matplotlib,
  pyarrow), and opens the checkpoint (``open_model``), i.e. everything the sweep costs before a weight
  is read;
- the sweep: ``headlens.cli.main(["sweep", ...])`` over every layer of the checkpoint.

The difference must stay below a few layers' worth of attention weights in float64. While one layer is
analysed the next is read in a thread: the layer the caller still holds, the layer just handed over, the
one being read (float32 buffers plus float64 copies) and transient copies of the permuted W_O make
up to ~4-5 layers in float64. The bound is 5 such layers plus 96 MB for what does not scale with the model
(torch's thread pools, matplotlib rendering the figures, the tables). A sweep that kept the model, a
memory map of it, or its float64 copies would exceed the bound several times over: the checkpoint on disk is
at least 3x the bound (and its float64 attention weights ~6x).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024

# A small variant of Qwen3 (float32): 58 layers of 10.5 MB of attention weights each (~610 MB on disk).
SHAPE = dict(layers=58, hidden=1024, heads=16, kv_heads=4, head_dim=64)
LAYERS_IN_BOUND = 5
SLACK = 96 * MB


def _generator():
    spec = importlib.util.spec_from_file_location("make_qwen3_4b_attention",
                                                  REPO / "bench" / "make_qwen3_4b_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layer_f64_bytes(hidden: int, heads: int, kv_heads: int, head_dim: int, **_) -> int:
    q = o = heads * head_dim * hidden
    k = v = kv_heads * head_dim * hidden
    return (q + k + v + o) * 8


# The child's own peak: VmHWM of its address space. Not ru_maxrss: Linux carries the parent's peak RSS over
# fork/vfork + exec into the child's ru_maxrss (exec records the old mm's high-water mark), so a child of a
# pytest or bench process that has touched a few hundred MB would report the parent's peak, not its own.
PEAK = r"""
import resource


def peak_kib():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
"""

BASELINE = PEAK + r"""
import sys
import torch
import headlens.cli, headlens.cli.sweep, headlens.circuits.heads, headlens.io.checkpoint, headlens.circuits.sweep
import headlens.io.tables, headlens.report.sweep, headlens.report.sweep_figures, headlens.report.sweep_html
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
try:
    import pyarrow.parquet
except ImportError:
    pass
from headlens.io.checkpoint import open_model
ck = open_model(weights=sys.argv[1], auto_infer=True)
assert ck.shape.num_layers > 0
print("MAXRSS", peak_kib())
"""

SWEEP = PEAK + r"""
import sys
from headlens.cli import main
rc = main(["sweep", "--weights", sys.argv[1], "--auto-infer", "--out-dir", sys.argv[2]])
print("MAXRSS", peak_kib())
sys.exit(rc)
"""


def _child_peak(code: str, *args: str) -> tuple[int, str]:
    """Run ``code`` in a fresh interpreter; return (its peak RSS in bytes, its output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"child failed with exit code {proc.returncode}:\n{out[-3000:]}"
    found = re.findall(r"^MAXRSS (\d+)$", proc.stdout, flags=re.M)
    assert found, f"child did not report its peak RSS:\n{out[-3000:]}"
    return int(found[-1]) * 1024, out


def test_sweep_peak_memory_is_bounded_by_a_few_layers(tmp_path):
    gen = _generator()
    ckpt = gen.make_checkpoint(tmp_path / "qwen3-small", dtype=torch.float32, seed=1, shard_layers=8, **SHAPE)
    disk = gen.checkpoint_bytes(ckpt)
    layer = _layer_f64_bytes(**SHAPE)
    bound = LAYERS_IN_BOUND * layer + SLACK
    assert disk >= 3 * bound, (
        f"the checkpoint ({disk / MB:.0f} MB) must be several times the bound ({bound / MB:.0f} MB) for the "
        "test to tell streaming from loading the model")

    base, _ = _child_peak(BASELINE, str(ckpt))
    out_dir = tmp_path / "sweep-out"
    peak, out = _child_peak(SWEEP, str(ckpt), str(out_dir))

    # The sweep really ran over every layer and head.
    assert f"sweeping {SHAPE['layers']} layer(s)" in out, out[-3000:]
    assert (out_dir / "sweep_summary.json").is_file()
    heads_csv = (out_dir / "sweep_heads.csv").read_text().strip().splitlines()
    assert len(heads_csv) == 1 + SHAPE["layers"] * SHAPE["heads"]

    grew = peak - base
    report = (f"sweep peak {peak / MB:.0f} MB, baseline (imports + open_model) {base / MB:.0f} MB, "
              f"growth {grew / MB:.0f} MB; bound {bound / MB:.0f} MB = {LAYERS_IN_BOUND} x {layer / MB:.1f} MB "
              f"(one layer's q/k/v/o in float64) + {SLACK / MB:.0f} MB; checkpoint {disk / MB:.0f} MB on disk, "
              f"{SHAPE['layers'] * layer / MB:.0f} MB of attention weights in float64")
    print(report)
    assert grew < bound, report
