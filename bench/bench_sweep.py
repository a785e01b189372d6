"""`headlens sweep` on a checkpoint with Qwen3-4B's attention, against reading the weights, the seed's dense SVD
and TransformerLens.

Prints, measured side by side in one run on the same checkpoint (bench/make_qwen3_4b_attention.py: 36 layers,
32 query heads, 8 kv heads, head_dim 128, hidden 2560, bfloat16, ~1.9 GB), with the page cache warmed by
reading every shard once before anything is timed:

(a) the wall time of ``python -m headlens sweep --weights DIR --auto-infer --out-dir TMP`` (a fresh process);
(b) the wall time of a fresh process that merely reads every layer's q/k/v/o with the sweep's reader
    (``ck.tensors.read(name)``, converted to float32 as the sweep does), and the ratio sweep / read
    (target <= 2x);
(b') the floor (issue 13): a fresh process that imports torch, reads every layer's q/k/v/o with safetensors,
    converts them once (float64 for the OV and QK factors, as the sweep does since issue 23), lays them out
    contiguous per head and computes the same Gram products with batched GEMM (``W_O^h^T W_O^h``, ``W_V W_V^T``,
    ``W_Q W_Q^T``, ``W_K W_K^T``) and nothing else; it prints their GFLOP and the rate reached, and the ratio
    sweep / floor (target <= 1.5x);
(c) the seed tool's approach: the dense d x d ``W_O^h @ W_V^g`` in float32 and ``torch.linalg.svdvals``,
    timed on a few heads and extrapolated to all 36 x 32 heads (plus reading the weights, as (b)); the ratio
    baseline / sweep (target >= 100x);
(d) the sweep's peak RSS (target < 1.5 GB);
(e) TransformerLens, when importable (here, in ``--tl-python``, or in a throwaway ``--tl-venv`` that this
    script creates from the package registry): loading the same local directory offline
    (``TransformerBridge.boot_transformers``) and the singular values of every head's OV circuit
    (``model.OV``, a FactoredMatrix, ``.S``); the ratio TransformerLens / sweep (target >= 10x). Otherwise it
    prints why it was not timed.

Every measured program runs in its own child process; its peak RSS is the child's own (``os.wait4``).
This process never imports torch, so it stays small: Linux carries a parent's high-water mark over
fork + exec into the child's ``ru_maxrss``, which would otherwise inflate the children's figures.
The sweep's spectra are checked against the dense SVD's and TransformerLens's largest singular values.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_sweep.py [--checkpoint DIR] [--keep] [--device cuda]
        [--tl-python PATH | --tl-venv DIR] [--no-tl] [--dense-heads 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
GB = 1e9
MB = 1024 * 1024

TARGET_READ_RATIO = 2.0
TARGET_FLOOR_RATIO = 1.5  # issue 13: the sweep against the floor program (b')
TARGET_DENSE_RATIO = 100.0
TARGET_RSS = 1.5 * GB
TARGET_TL_RATIO = 10.0

READ_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from headlens.io.checkpoint import open_model
ck = open_model(weights=sys.argv[1], auto_infer=True)
t1 = time.perf_counter()
nbytes = 0
for layer in range(ck.shape.num_layers):
    keys = ck.layer_keys(layer)
    for name in (keys.q, keys.k, keys.v, keys.o):
        t = ck.tensors.read(name)
        nbytes += t.numel() * t.element_size()
        t = t.to(torch.float32)
        del t
t2 = time.perf_counter()
print("RESULT " + json.dumps({"import_open_s": t1 - t0, "read_s": t2 - t1, "bytes": nbytes,
                              "threads": torch.get_num_threads()}))
"""

FLOOR_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from safetensors import safe_open
from pathlib import Path
cfg = json.loads((Path(sys.argv[1]) / "config.json").read_text())
L, H, G, hd, d = (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                  cfg["hidden_size"])
files = sorted(Path(sys.argv[1]).glob("*.safetensors"))
where = {}
handles = [safe_open(str(f), framework="pt") for f in files]
for h in handles:
    for k in h.keys():
        where[k] = h
t1 = time.perf_counter()
read_s = gram_s = 0.0
flops = 0
for layer in range(L):
    p = f"model.layers.{layer}.self_attn."
    a = time.perf_counter()
    q = where[p + "q_proj.weight"].get_tensor(p + "q_proj.weight")
    k = where[p + "k_proj.weight"].get_tensor(p + "k_proj.weight")
    v = where[p + "v_proj.weight"].get_tensor(p + "v_proj.weight")
    o = where[p + "o_proj.weight"].get_tensor(p + "o_proj.weight")
    # converted once, laid out contiguous per head: what the Gram products read
    WO = o.to(torch.float64).reshape(d, H, hd).permute(1, 2, 0).contiguous()  # (H, hd, d)
    WV = v.to(torch.float64).reshape(G, hd, d).contiguous()
    WQ = q.to(torch.float64).reshape(H, hd, d).contiguous()
    WK = k.to(torch.float64).reshape(G, hd, d).contiguous()
    b = time.perf_counter()
    GA = torch.bmm(WO, WO.mT)  # W_O^h^T W_O^h, float64, (H, hd, hd)
    GB = torch.bmm(WV, WV.mT)  # W_V^g W_V^g^T, float64, (G, hd, hd)
    GQ = torch.bmm(WQ, WQ.mT)  # QK Grams in float64, as the sweep computes them (issue 23: its key budget)
    GK = torch.bmm(WK, WK.mT)
    c = time.perf_counter()
    read_s += b - a
    gram_s += c - b
    flops += 2 * hd * hd * d * (2 * H + 2 * G)
print("RESULT " + json.dumps({"import_open_s": t1 - t0, "read_convert_s": read_s, "gram_s": gram_s,
                              "gram_flops": flops, "threads": torch.get_num_threads()}))
"""

DENSE_CHILD = r"""
import json, sys, time
import torch
from headlens.io.checkpoint import open_model
ck = open_model(weights=sys.argv[1], auto_infer=True)
s = ck.shape
H, G, hd = s.num_heads, s.num_kv_heads, s.head_dim
n = int(sys.argv[2])
picks = sorted({(round(i * (s.num_layers - 1) / max(n - 1, 1)), round(i * (H - 1) / max(n - 1, 1))) for i in range(n)})
torch.linalg.svdvals(torch.randn(256, 256))  # LAPACK warm-up
rows = []
for layer, h in picks:
    keys = ck.layer_keys(layer)
    o = ck.tensors.read(keys.o).to(torch.float32)  # (d, H*hd)
    v = ck.tensors.read(keys.v).to(torch.float32)  # (G*hd, d)
    g = h // (H // G)
    t0 = time.perf_counter()
    W = o[:, h * hd:(h + 1) * hd] @ v[g * hd:(g + 1) * hd]  # dense d x d W_OV, as the seed tool
    S = torch.linalg.svdvals(W)
    dt = time.perf_counter() - t0
    rows.append({"layer": layer, "head": h, "seconds": dt, "sigma_max": float(S[0]), "d": W.shape[0]})
print("RESULT " + json.dumps({"heads": rows}))
"""

TL_CHILD = r"""
import importlib.metadata, json, sys, time
t0 = time.perf_counter()
import torch
import transformer_lens
from transformer_lens import TransformerBridge
t1 = time.perf_counter()
model = TransformerBridge.boot_transformers(sys.argv[1], device="cpu", dtype=torch.float32)
t2 = time.perf_counter()
ov = model.OV  # FactoredMatrix: A (layers, heads, d, hd) @ B (layers, heads, hd, d)
t3 = time.perf_counter()
S = ov.S  # singular values of every head's OV circuit
t4 = time.perf_counter()
print("RESULT " + json.dumps({
    "version": importlib.metadata.version("transformer-lens"),
    "import_s": t1 - t0, "boot_s": t2 - t1, "ov_s": t3 - t2, "svd_s": t4 - t3,
    "shape": list(S.shape), "sigma_max": S[..., 0].reshape(-1).tolist()}))
"""


# ------------------------------------------------------------------------------------------------ helpers


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_program(code: str, argv: list[str], log: Path, what: str) -> dict | None:
    """:func:`run_child` of ``python -c code argv``; None (after printing its output's tail) when it failed."""
    r = run_child([sys.executable, "-c", code, *argv], log)
    if r["rc"] != 0 or not r["result"]:
        print(f"{what} failed:\n{r['out'][-3000:]}")
        return None
    return r


def run_child(cmd: list[str], log: Path, timeout: float | None = None) -> dict:
    """Run ``cmd``; return its wall time, exit code, output and its own peak RSS (wait4)."""
    t0 = time.perf_counter()
    with open(log, "w+") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env())
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fh.seek(0)
        out = fh.read()
    result = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    return {"wall": wall, "rc": p.returncode, "out": out, "maxrss": ru.ru_maxrss * 1024, "result": result}


def last_error(out: str) -> str:
    lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "(no output)"


def mem_available() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def warm_page_cache(ckpt: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    buf = bytearray(16 * MB)
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(buf)
                if not got:
                    break
                n += got
    return n, time.perf_counter() - t0


def sweep_sigma_max(out_dir: Path) -> dict[tuple[int, int], float]:
    with open(out_dir / "sweep_heads.csv", newline="") as fh:
        return {(int(r["layer"]), int(r["head"])): float(r["ov_sigma_max"]) for r in csv.DictReader(fh)}


def fmt_s(x: float) -> str:
    return f"{x:.1f} s" if x < 600 else f"{x:.0f} s ({x / 60:.1f} min)"


# -------------------------------------------------------------------------------------- TransformerLens


def _has_tl(py: str) -> tuple[bool, str]:
    try:
        r = subprocess.run([py, "-c", "import transformer_lens"], capture_output=True, text=True, env=child_env(),
                           timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return r.returncode == 0, last_error(r.stderr)


def tl_python(args) -> tuple[str | None, str]:
    """(interpreter with transformer_lens, how it was found) or (None, why not)."""
    if args.tl_python:
        ok, why = _has_tl(args.tl_python)
        if ok:
            return args.tl_python, f"importable in {args.tl_python}"
        return None, f"transformer_lens is not importable in --tl-python {args.tl_python}: {why}"
    ok, why = _has_tl(sys.executable)
    if ok:
        return sys.executable, f"importable in {sys.executable}"
    if not args.tl_venv:
        return None, (f"transformer_lens is not importable in {sys.executable} ({why}); pass --tl-venv DIR to "
                      "install it from the package registry into a throwaway venv (~1 min), or --tl-python PATH")
    venv = Path(args.tl_venv)
    py = venv / "bin" / "python"
    if py.exists() and _has_tl(str(py))[0]:
        return str(py), f"importable in the throwaway venv {venv}"
    # A venv on this interpreter that sees this environment's packages (torch, transformers, headlens) through
    # a .pth, with transformer-lens and its other dependencies installed on top; torch and transformers are
    # pinned to the versions here so pip does not pull another torch.
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        here = sysconfig.get_paths()["purelib"]
        Path(site, "_bench_parent_env.pth").write_text(f"import site; site.addsitedir({here!r})\n")
        pins = venv / "pins.txt"
        pins.write_text("".join(f"{p}=={metadata.version(p)}\n" for p in ("torch", "transformers")))
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(pins), "transformer-lens"],
                           capture_output=True, text=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return None, f"could not create the throwaway venv {venv}: {exc}"
    if r.returncode != 0:
        return None, f"pip install transformer-lens failed in {venv}: {last_error(r.stdout + r.stderr)}"
    ok, why = _has_tl(str(py))
    if not ok:
        return None, f"transformer_lens installed in {venv} but not importable: {why}"
    return str(py), f"installed into the throwaway venv {venv} in {time.perf_counter() - t0:.0f} s"


# ------------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", metavar="DIR",
                   help="use this checkpoint directory (generated there first if it has no config.json)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint and the sweep's outputs")
    p.add_argument("--device", default="cpu", help="where the sweep's Gram products run (default cpu; "
                   "bench/device_check.sh passes cuda)")
    p.add_argument("--dense-heads", type=int, default=3, help="heads timed with the dense SVD (default 3)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tl-python", metavar="PATH", help="interpreter that has transformer_lens installed")
    g.add_argument("--tl-venv", metavar="DIR",
                   help="throwaway venv for transformer_lens: used if it has it, created from PyPI otherwise")
    g.add_argument("--no-tl", action="store_true", help="do not time TransformerLens")
    p.add_argument("--tl-min-free-gb", type=float, default=16.0,
                   help="skip TransformerLens when less memory than this is available (it peaks at ~13 GB)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    logs = work / "logs"
    logs.mkdir()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"python {sys.version.split()[0]}, torch {metadata.version('torch')}; logs in {logs}")

    # Checkpoint.
    if args.checkpoint and (Path(args.checkpoint) / "config.json").exists():
        ckpt = Path(args.checkpoint)
        print(f"checkpoint: reusing {ckpt}")
        t_gen = None
    else:
        ckpt = Path(args.checkpoint) if args.checkpoint else work / "qwen3-4b-attention"
        r = run_child([sys.executable, str(HERE / "make_qwen3_4b_attention.py"), str(ckpt)], logs / "make.log")
        if r["rc"] != 0:
            print(f"generating the checkpoint failed:\n{r['out'][-2000:]}")
            return 1
        t_gen = r["wall"]
        print(f"checkpoint: generated {ckpt} in {fmt_s(t_gen)} (bench/make_qwen3_4b_attention.py)")
    cfg = json.loads((ckpt / "config.json").read_text())
    L, H, G = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    print(f"  {L} layers, {H} query heads, {G} kv heads, head_dim {cfg['head_dim']}, hidden {cfg['hidden_size']}, "
          f"{cfg.get('torch_dtype')}")
    nbytes, t_warm = warm_page_cache(ckpt)
    print(f"page cache warmed: read all {nbytes / GB:.2f} GB of shards once in {t_warm:.1f} s before timing; "
          "every timing below reads from the page cache")

    # (a) + (d): the sweep, first, as a user runs it.
    sweep_out = work / "sweep-out"
    cmd = [sys.executable, "-m", "headlens", "sweep", "--weights", str(ckpt), "--auto-infer", "--out-dir",
           str(sweep_out), "--device", args.device]
    print("running: " + " ".join(cmd[1:]))
    sw = run_child(cmd, logs / "sweep.log")
    if sw["rc"] != 0:
        print(f"headlens sweep failed (exit {sw['rc']}):\n{sw['out'][-3000:]}")
        return 1
    sig = sweep_sigma_max(sweep_out)
    print(f"  sweep: {fmt_s(sw['wall'])}, peak RSS {sw['maxrss'] / GB:.2f} GB, {len(sig)} heads in sweep_heads.csv")

    # (b) reading only.
    rd = run_program(READ_CHILD, [str(ckpt)], logs / "read.log", "the read-only pass")
    if rd is None:
        return 1
    rr = rd["result"]
    print(f"  read only: {fmt_s(rd['wall'])} for the process (imports + open_model {rr['import_open_s']:.1f} s, "
          f"reading {rr['bytes'] / GB:.2f} GB of q/k/v/o and converting to float32 {rr['read_s']:.1f} s), "
          f"peak RSS {rd['maxrss'] / GB:.2f} GB")

    # (b') the floor: read, convert once, the same Gram products as contiguous batched GEMMs, nothing else.
    fl = run_program(FLOOR_CHILD, [str(ckpt)], logs / "floor.log", "the floor program")
    if fl is None:
        return 1
    fr = fl["result"]
    print(f"  floor: {fmt_s(fl['wall'])} for the process (imports + open {fr['import_open_s']:.1f} s, read and "
          f"convert {fr['read_convert_s']:.1f} s, {fr['gram_flops'] / 1e9:.0f} GFLOP of Gram products in "
          f"{fr['gram_s']:.1f} s = {fr['gram_flops'] / 1e9 / max(fr['gram_s'], 1e-9):.1f} GFLOP/s), "
          f"peak RSS {fl['maxrss'] / GB:.2f} GB")

    # (c) the dense per-head SVD.
    dn = run_program(DENSE_CHILD, [str(ckpt), str(args.dense_heads)], logs / "dense.log", "the dense SVD baseline")
    if dn is None:
        return 1
    heads = dn["result"]["heads"]
    per_head = sum(h["seconds"] for h in heads) / len(heads)
    n_heads = L * H
    dense_total = rr["import_open_s"] + rr["read_s"] + n_heads * per_head
    picked = ", ".join(f"L{h['layer']}H{h['head']}" for h in heads)
    dense_err = max(abs(h["sigma_max"] - sig[(h["layer"], h["head"])]) / sig[(h["layer"], h["head"])] for h in heads)
    print(f"  dense SVD: {per_head * 1e3:.0f} ms/head over {len(heads)} heads "
          f"({picked}; {heads[0]['d']}x{heads[0]['d']} float32); "
          f"all {n_heads} heads + reading = {fmt_s(dense_total)} (extrapolated); "
          f"sigma_max agrees with the sweep to {dense_err:.1e} (relative)")

    # (e) TransformerLens.
    tl = None
    if args.no_tl:
        tl_why = "not timed: --no-tl"
    else:
        py, how = tl_python(args)
        avail = mem_available()
        if py is None:
            tl_why = f"not timed: {how}"
        elif avail is not None and avail < args.tl_min_free_gb * GB:
            tl_why = (f"not timed: {avail / GB:.1f} GB available, below --tl-min-free-gb {args.tl_min_free_gb:g} "
                      "(TransformerLens holds the model in float32 plus stacked, kv-expanded copies of every W_V "
                      "and W_O: ~13 GB peak here)")
        else:
            print(f"  TransformerLens: {how}")
            tl = run_child([py, "-c", TL_CHILD, str(ckpt)], logs / "transformer_lens.log", timeout=1800)
            if tl["rc"] != 0 or not tl["result"]:
                tl_why = (f"not timed: TransformerLens failed on the local checkpoint (exit {tl['rc']}): "
                          f"{last_error(tl['out'])} (log: {logs / 'transformer_lens.log'})")
                tl = None
            else:
                t = tl["result"]
                tl_sig = t["sigma_max"]
                tl_err = max(abs(tl_sig[lyr * H + h] - s) / s for (lyr, h), s in sig.items())
                tl_why = (f"TransformerLens {t['version']}: {fmt_s(tl['wall'])} for the process (import "
                          f"{t['import_s']:.1f} s, boot_transformers(local dir, offline) {t['boot_s']:.1f} s, "
                          f"model.OV {t['ov_s']:.1f} s, .S of {t['shape']} {t['svd_s']:.1f} s), peak RSS "
                          f"{tl['maxrss'] / GB:.2f} GB; sigma_max agrees with the sweep to {tl_err:.1e} (relative)")
    print(f"  {tl_why}")

    # Table.
    read_ratio = sw["wall"] / rd["wall"]
    dense_ratio = dense_total / sw["wall"]
    rows = [
        ("(a) headlens sweep, wall (fresh process)", fmt_s(sw["wall"]), "", ""),
        ("(b) read q/k/v/o to float32, wall (fresh process)", fmt_s(rd["wall"]), "", ""),
        ("    sweep / read", f"{read_ratio:.1f}x", f"<= {TARGET_READ_RATIO:g}x",
         "PASS" if read_ratio <= TARGET_READ_RATIO else "FAIL"),
        ("(b') floor: read, convert, the same Gram products (fresh process)", fmt_s(fl["wall"]), "", ""),
        ("    sweep / floor", f"{sw['wall'] / fl['wall']:.2f}x", f"<= {TARGET_FLOOR_RATIO:g}x",
         "PASS" if sw["wall"] / fl["wall"] <= TARGET_FLOOR_RATIO else "FAIL"),
        (f"(c) dense float32 SVD, {n_heads} heads (extrapolated)", fmt_s(dense_total), "", ""),
        ("    dense / sweep", f"{dense_ratio:.0f}x", f">= {TARGET_DENSE_RATIO:g}x",
         "PASS" if dense_ratio >= TARGET_DENSE_RATIO else "FAIL"),
        ("(d) sweep peak RSS", f"{sw['maxrss'] / GB:.2f} GB", f"< {TARGET_RSS / GB:g} GB",
         "PASS" if sw["maxrss"] < TARGET_RSS else "FAIL"),
    ]
    if tl is not None:
        tl_ratio = tl["wall"] / sw["wall"]
        rows += [("(e) TransformerLens load + OV spectra, wall", fmt_s(tl["wall"]), "", ""),
                 ("    TransformerLens / sweep", f"{tl_ratio:.1f}x", f">= {TARGET_TL_RATIO:g}x",
                  "PASS" if tl_ratio >= TARGET_TL_RATIO else "FAIL")]
    else:
        rows += [("(e) TransformerLens / sweep", "not timed", f">= {TARGET_TL_RATIO:g}x", "NOT RUN")]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print()
    print(f"{'measurement':<{w0}}  {'value':>{w1}}  {'target':<9}  result")
    for name, val, tgt, res in rows:
        print(f"{name:<{w0}}  {val:>{w1}}  {tgt:<9}  {res}")
    print()
    if t_gen is not None:
        print(f"checkpoint generation: {fmt_s(t_gen)}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end (2-core machine: other load skews the timings); "
          f"this process's own peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
