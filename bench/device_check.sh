#!/usr/bin/env bash
# headlens on a machine with a GPU, in a few minutes, offline. Prints, side by side:
#   1. the GPU tests (tests/gpu: every command's numbers on CUDA against the CPU, float32 to 1e-4);
#   2. `headlens sweep --device cuda` on the Qwen3-4B-shaped checkpoint of bench/ against merely reading the
#      same tensors (bench/bench_sweep.py --device cuda; target: at most 2x the read);
#   3. `headlens sphere` on the GPU against the CPU on the 36-layer Qwen3-shaped model of bench/bench_sphere.py.
# Needs python with torch (CUDA), transformers, accelerate, safetensors, tokenizers, matplotlib, plotly and pytest,
# which a GPU machine's image has; headlens itself runs from src/ (no install, no network).
#
#     bash bench/device_check.sh            # PYTHON=python3 by default; OUT=dir keeps the logs
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 MPLBACKEND=Agg
"$PY" - <<'PY' || exit 2
import sys
try:
    import torch, transformers, accelerate  # noqa: F401
except ImportError as exc:
    sys.exit(f"{sys.executable} lacks {exc.name}: set PYTHON to an interpreter with torch (CUDA) and transformers")
ok = torch.cuda.is_available()
if not ok:
    sys.exit("no CUDA device here: this check needs one")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if ok else 'none'}")
sys.exit(0 if ok else 1)
PY

echo "== 1. GPU tests (tests/gpu)"
"$PY" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$LOG/gpu_tests.log" | tail -n 15

echo "== 2. sweep on the GPU vs reading the tensors (Qwen3-4B attention shapes)"
"$PY" bench/bench_sweep.py --no-tl --device cuda --dense-heads 1 2>&1 | tee "$LOG/sweep.log" \
  | grep -E "sweep:|read only|sweep / read|floor|peak RSS|checkpoint:" | head -n 12

echo "== 3. sphere on the GPU vs the CPU (36-layer Qwen3-shaped model)"
"$PY" - "$LOG" <<'PY' 2>&1 | tee "$LOG/sphere.log"
import subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "bench")
from bench_sphere import build_qwen3_like
from headlens.io.embedded import embedded_dir
from headlens.prompts import NOTEBOOK_PROMPT

work = Path(tempfile.mkdtemp())
model = build_qwen3_like(work / "qwen3-36", 36, embedded_dir("tiny-lm"))
times = {}
for dev in ("cpu", "cuda", "cpu", "cuda"):  # interleaved, the second of each counts (the first warms caches)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "headlens", "sphere", "--weights", str(model), "--device", dev,
                        "--dtype", "float32", "--out-dir", str(work / f"out-{dev}")], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"sphere --device {dev} failed: {r.stderr[-1500:]}")
    times[dev] = time.perf_counter() - t
import json
a = json.loads((work / "out-cpu" / "sphere.json").read_text())["metrics"]
b = json.loads((work / "out-cuda" / "sphere.json").read_text())["metrics"]
worst = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in x
            if isinstance(x[k], float))
print(f"sphere, whole command: cpu {times['cpu']:.1f} s, cuda {times['cuda']:.1f} s, "
      f"cpu / cuda {times['cpu'] / times['cuda']:.2f}x; metrics agree to {worst:.1e} (relative)")
PY
echo "logs: $LOG"
