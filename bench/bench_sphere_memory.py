"""Peak memory of `headlens sphere --dtype bfloat16` on a >= 1 GB bf16 Qwen3-shaped checkpoint (issue 13).

Target: the sphere process's peak RSS, less the interpreter's own footprint (its imports), stays within 1.3x
of the bf16 weights plus the captured residual stream; a float32 copy of the weights alone would be 2x them.

    .venv/bin/python bench/bench_sphere_memory.py [--keep DIR] [--layers 6] [--repeats 1]

- The checkpoint is built here (random weights, created directly in bfloat16, saved with save_pretrained as
  bf16 safetensors): Qwen3-4B's width (hidden 2560, MLP 9728, 32 query / 8 key-value heads of 128, tied
  embeddings) at 6 layers, 1.25 GB (1195 MiB), with the tokenizer of the embedded tiny-lm (or --tokenizer DIR).
  ``--keep DIR`` builds it there once and reuses it on later runs.
- Each measurement is a fresh Python process, one per measurement:
  (a) ``headlens sphere --weights DIR --dtype bfloat16 --out-dir TMP`` (the notebook's prompt, every layer),
      run as the console script runs it; the process writes its own VmHWM (peak RSS) when it exits. Its
      renderer workers (separate spawned processes) are sampled from here every 20 ms and reported apart;
  (b) a baseline that only imports every module (a) had loaded when it finished (torch, transformers, the
      Qwen3 modelling code, headlens, matplotlib, ...) and reports its VmHWM: the interpreter's footprint.
- ``os.wait4`` gives each child's ru_maxrss too (the largest of the process and its waited-for children).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_LM = REPO / "src" / "headlens" / "models" / "tiny-lm"
MiB = 1024**2


# --------------------------------------------------------------------------------------------- checkpoint


def build_checkpoint(out: Path, layers: int, hidden: int, intermediate: int, tokenizer_dir: Path) -> Path:
    """A Qwen3 model of Qwen3-4B's width and ``layers`` layers, random weights, saved as bf16 safetensors.

    The model is created in bfloat16 from the start (default dtype switched while it is built), so no float32
    copy of it exists in this process either."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1_000_000.0)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".txt" or f.name == "vocab.json":
            shutil.copy(f, out / f.name)
    (out / "BUILT").write_text(json.dumps({"layers": layers, "hidden": hidden, "intermediate": intermediate,
                                           "tokenizer": str(tokenizer_dir)}))
    return out


def safetensors_bytes(directory: Path) -> tuple[int, dict[str, int]]:
    """(summed nbytes of every tensor in the directory's safetensors files, {dtype: bytes})."""
    total, by_dtype = 0, {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            size = t["data_offsets"][1] - t["data_offsets"][0]
            total += size
            by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + size
    return total, by_dtype


# ------------------------------------------------------------------------------------------------ children


def _status(pid: int | str = "self") -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, RssFile, ...), in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def _write_report(path: str) -> None:
    st = _status()
    mods = [m for m in list(sys.modules) if m != "__main__" and not m.startswith("_bench")]
    Path(path).write_text(json.dumps({"VmHWM": st["VmHWM"], "VmRSS": st["VmRSS"], "RssAnon": st.get("RssAnon"),
                                      "RssFile": st.get("RssFile"), "modules": mods}))


def child_sphere(report: str, argv: list[str]) -> int:
    """What the ``headlens`` console script does, plus this process's peak RSS written at exit."""
    import atexit

    atexit.register(_write_report, report)
    from headlens.cli import main

    return main(argv)


def child_baseline(report: str, modules_file: str) -> int:
    """Import every module the sphere run had loaded, nothing else, then write the peak RSS."""
    import importlib
    import warnings

    warnings.simplefilter("ignore")
    failed = 0
    for name in json.loads(Path(modules_file).read_text())["modules"]:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # a few entries are aliases or lazy stand-ins that cannot be imported by name
            failed += 1
    _write_report(report)
    print(f"baseline: {len(sys.modules)} modules loaded, {failed} could not be imported by name", file=sys.stderr)
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


def run_child(args: list[str], log: Path) -> dict:
    """Run this script as a child with ``args``; returns its report plus wait4's ru_maxrss, the wall time and
    the sampled peaks of the child's own descendants (the renderer workers)."""
    report = log.with_suffix(".json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(report), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    workers: dict[int, tuple[str, int]] = {}  # pid -> (what it runs, its VmHWM at the last sample)
    main_samples: list[tuple[int, int, int]] = []  # (VmRSS, RssAnon, RssFile) of the main process
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                st = _status(proc.pid)
                main_samples.append((st["VmRSS"], st.get("RssAnon", 0), st.get("RssFile", 0)))
            except (OSError, KeyError):
                pass
            for kid in _descendants(proc.pid):
                try:  # the last sample, not the largest: one taken between fork and exec shows the parent's pages
                    with open(f"/proc/{kid}/cmdline", "rb") as fh:
                        cmd = fh.read().decode(errors="replace")
                    kind = "tracker" if "resource_tracker" in cmd else "worker" if "multiprocessing" in cmd else "?"
                    workers[kid] = (kind, _status(kid)["VmHWM"])
                except (OSError, KeyError):
                    pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"child {' '.join(args)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    rep = json.loads(report.read_text())
    rep["ru_maxrss"] = rusage.ru_maxrss * 1024  # kB on Linux
    rep["wall_s"] = wall
    rep["workers"] = workers
    if main_samples:
        peak = max(main_samples)
        rep["sampled_peak"] = {"VmRSS": peak[0], "RssAnon": peak[1], "RssFile": peak[2]}
    return rep


# ---------------------------------------------------------------------------------------------------- main


def _mb(b: float) -> str:
    return f"{b / MiB:8.1f} MiB"


def measure(model_dir: Path, tmp: Path, repeats: int) -> None:
    weights, by_dtype = safetensors_bytes(model_dir)
    built = json.loads((model_dir / "BUILT").read_text()) if (model_dir / "BUILT").exists() else {}
    hidden = built.get("hidden") or json.loads((model_dir / "config.json").read_text())["hidden_size"]
    runs = []
    for i in range(repeats):
        out_dir = tmp / f"sphere-out-{i}"
        runs.append(run_child(["sphere", "--weights", str(model_dir), "--dtype", "bfloat16", "--out-dir",
                               str(out_dir)], tmp / f"sphere-{i}.log"))
    sphere_json = json.loads((tmp / "sphere-out-0" / "sphere.json").read_text())
    n_tokens, n_layers = len(sphere_json["tokens"]), len(sphere_json["layers"])
    stream = n_layers * n_tokens * hidden * 2  # bf16, as captured (no --half)
    mods = tmp / "modules.json"
    mods.write_text(json.dumps({"modules": runs[0]["modules"]}))
    bases = [run_child(["baseline", str(mods)], tmp / f"baseline-{i}.log") for i in range(repeats)]

    peak = max(r["VmHWM"] for r in runs)  # the worst run (each is listed below)
    base = min(b["VmHWM"] for b in bases)
    budget = weights + stream
    each_peak = ", ".join(f"{r['VmHWM'] / MiB:.1f}" for r in runs)
    each_ratio = ", ".join(f"{(r['VmHWM'] - base) / budget:.3f}" for r in runs)
    worker_peaks = sorted(v for r in runs for kind, v in r["workers"].values() if kind == "worker")
    trackers = sorted(v for r in runs for kind, v in r["workers"].values() if kind != "worker")
    sp = max(runs, key=lambda r: r["VmHWM"]).get("sampled_peak", {})
    bp = min(bases, key=lambda b: b["VmHWM"])

    print(f"checkpoint: {model_dir} ({built or 'config.json'}); tensors by dtype: "
          + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in by_dtype.items()))
    print(f"prompt: the notebook's, {n_tokens} tokens; {n_layers} layers captured at resid_pre; "
          f"sphere wall {min(r['wall_s'] for r in runs):.1f} s; {len(runs)} run(s)")
    rows = [
        ("bf16 weights (safetensors tensor bytes)", _mb(weights)),
        (f"captured stream ({n_layers} x {n_tokens} x {hidden} x 2 B)", _mb(stream)),
        ("weights + stream", _mb(budget)),
        ("a float32 copy of the weights (2x weights)", _mb(2 * weights)),
        ("baseline: interpreter + imports, peak RSS", _mb(base)),
        ("sphere main process, peak RSS (VmHWM)", _mb(peak)
         + (f"   (runs: {each_peak} MiB)" if len(runs) > 1 else "")),
        ("sphere peak - baseline", _mb(peak - base)),
        ("(peak - baseline) / (weights + stream)", f"{(peak - base) / budget:8.3f}   (target <= 1.3)"
         + (f"   (runs: {each_ratio})" if len(runs) > 1 else "")),
        ("peak / (weights + stream), raw", f"{peak / budget:8.3f}"),
        ("a float32 copy alone / (weights + stream)", f"{2 * weights / budget:8.3f}"),
        ("sphere ru_maxrss via wait4 (max of main and workers)", _mb(max(r["ru_maxrss"] for r in runs))),
        ("main process at its sampled peak: anon / file-backed",
         f"{sp.get('RssAnon', 0) / MiB:.1f} / {sp.get('RssFile', 0) / MiB:.1f} MiB"),
        ("baseline at exit: anon / file-backed", f"{bp['RssAnon'] / MiB:.1f} / {bp['RssFile'] / MiB:.1f} MiB"),
        (f"renderer workers ({len(worker_peaks)} over {len(runs)} run(s)), each peak RSS",
         ", ".join(f"{w / MiB:.0f}" for w in worker_peaks) + " MiB" if worker_peaks else "none"),
        ("multiprocessing resource tracker, peak RSS", ", ".join(f"{w / MiB:.0f}" for w in trackers) + " MiB"
         if trackers else "none"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"| {a:<{width}} | {b} |" for a, b in rows))
    ratio = (peak - base) / budget
    print(f"{'PASS' if ratio <= 1.3 else 'FAIL'}: (peak - baseline) / (weights + stream) = {ratio:.3f} (target <= 1.3)")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        report, kind, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
        sys.exit(child_sphere(report, [kind, *rest]) if kind == "sphere" else child_baseline(report, rest[0]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=Path, default=None, help="build the checkpoint here (reused when already built)")
    p.add_argument("--weights", type=Path, default=None, help="measure this bf16 HF directory instead of building")
    p.add_argument("--layers", type=int, default=6, help="decoder layers (default 6: 1.25 GB at Qwen3-4B's width)")
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--intermediate", type=int, default=9728)
    p.add_argument("--tokenizer", type=Path, default=TINY_LM, help="tokenizer directory (default: tiny-lm's)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each child (the largest sphere peak and least baseline are reported)")
    args = p.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.weights:
            model_dir = args.weights
        else:
            model_dir = args.keep or tmp / "qwen3-shaped"
            if not (model_dir / "BUILT").exists():
                t0 = time.perf_counter()
                build_checkpoint(model_dir, args.layers, args.hidden, args.intermediate, args.tokenizer)
                print(f"built {model_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
        weights, _ = safetensors_bytes(model_dir)
        if weights < 10**9:
            print(f"warning: {weights / 1e9:.2f} GB of weights, under the 1 GB the issue asks for", file=sys.stderr)
        measure(model_dir, tmp, args.repeats)


if __name__ == "__main__":
    main()
