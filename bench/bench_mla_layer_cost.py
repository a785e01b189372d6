"""What a weight-only `headlens sweep` of DeepSeek-V3 costs, from a few layers with its real attention shapes.

DeepSeek-V3 (model_type deepseek_v3): 61 layers, hidden 7168, 128 heads, multi-head latent attention (q_lora_rank
1536, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head_dim 128), every projection stored float8_e4m3fn with one
float32 ``weight_scale_inv`` per 128x128 block (``quantization_config: {quant_method: fp8, fmt: e4m3,
weight_block_size: [128, 128], activation_scheme: dynamic}``). The latent-attention sweep
(``headlens.circuits.mla.run_mla_sweep``) reads four tensors a layer: ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
``kv_b_proj`` and ``o_proj``; never the MoE experts (~95% of the 671B parameters) nor the query projections.

This script:

1. builds, in a temporary directory deleted at the end, a checkpoint of ``--layers`` decoder layers with the real
   attention shapes in the real FP8 block format (one shard per layer plus one for the embeddings, an index, a
   DeepSeek-V3 config.json with that quantization_config; the MLP dense and tiny, vocabulary 256) and checks that
   a layer's attention bytes equal the real model's (computed from the shapes);
2. measures this disk's sequential read rate (every shard, fsync'd and dropped from the page cache with
   ``POSIX_FADV_DONTNEED``, read in 16 MiB pieces), then per layer: reading the sweep's stored tensors with
   headlens's reader, cold (the shard dropped first) and warm; dequantising them with headlens's own
   ``dequant.scaled`` (float64, what the sweep uses) and, for comparison, a blockwise float32 product written here;
   ``read_mla_layer`` on headlens's ``DequantizingSource`` (warm: read + dequantise + finiteness check + per-head
   layout, what ``run_mla_sweep`` does per layer before the analysis); ``analyze_mla_layer`` (the per-head factored
   SVDs, the latent map's SVD, the r x r Gram and its eigensolve), with a breakdown on the first layer from a
   sample of heads; and the peak RSS of read_mla_layer + analyze_mla_layer (``VmHWM``, reset through
   ``/proc/self/clear_refs``);
3. tries ``run_mla_sweep`` itself on the checkpoint and prints one line saying where and why when it fails
   (otherwise it times it on 1 and 2 layers and takes the difference);
4. prints the estimate for all 61 layers: serial (read + compute per layer, and with the read overlapped), and on
   N workers (one task per block of ceil(61 / N) layers, each reading only its own tensors) from a shared network
   filesystem of ``--net-gb-s`` aggregate GB/s or from local copies on disks like this one:
   ``max(ceil(61 / N) x compute per layer, bytes / aggregate bandwidth) + --ray-startup-s`` (Ray is not measured
   here).

    .venv/bin/python bench/bench_mla_layer_cost.py [--layers 3] [--tmp-dir DIR] [--net-gb-s 1.25]
        [--ray-startup-s 0] [--workers 1,2,8,32] [--sample-heads 16] [--threads 1]

The compute steps are timed in this process's CPU seconds (``time.process_time``), with one torch thread by
default: the machine is shared, so its wall times depend on other work, while one thread's CPU time is the wall
time the step takes on a core of its own (a worker = one core). With two threads on the loaded 2-core machine the
OpenMP threads spin waiting for each other: analyze_mla_layer took 337 s of wall and CPU against 25 s with one
thread. The weights are random (the timings of QR, SVD and eigensolves do not depend on the values).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# ----------------------------------------------------------------------------------------- the real model

DSV3 = {"num_hidden_layers": 61, "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128}
REAL_LAYERS = DSV3["num_hidden_layers"]
FULL_CHECKPOINT_GB = 689.0  # deepseek-ai/DeepSeek-V3 on the hub: 163 shards, ~690 GB (with the MTP layer 61)
QCFG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SWEEP_READS = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")  # mla.MLA_KEYS
MB, GB = 1e6, 1e9


def attention_shapes(c: dict = DSV3) -> dict[str, tuple[tuple[int, ...], str]]:
    """One layer's attention tensors (relative names) -> (shape, "fp8" | "bf16"), as DeepSeek-V3 stores them."""
    d, H, r = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
    nope, rope, v, q = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["q_lora_rank"]
    return {"q_a_proj": ((q, d), "fp8"), "q_a_layernorm": ((q,), "bf16"), "q_b_proj": ((H * (nope + rope), q), "fp8"),
            "kv_a_proj_with_mqa": ((r + rope, d), "fp8"), "kv_a_layernorm": ((r,), "bf16"),
            "kv_b_proj": ((H * (nope + v), r), "fp8"), "o_proj": ((d, H * v), "fp8")}


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)


def stored_bytes(modules: tuple[str, ...] | None = None) -> tuple[int, int]:
    """(parameters, stored bytes with the float32 block scales) of one real layer's attention, or of ``modules``."""
    params = nbytes = 0
    for mod, (shape, kind) in attention_shapes().items():
        if modules is not None and mod not in modules:
            continue
        n = math.prod(shape)
        params += n
        nbytes += n if kind == "fp8" else 2 * n
        if kind == "fp8":
            nbytes += 4 * math.prod(scale_shape(shape))  # type: ignore[arg-type]
    return params, nbytes


# --------------------------------------------------------------------------------------- the checkpoint


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn, weight_scale_inv float32 per 128x128 block, the last ones partial): block absmax / 448."""
    R, C = w.shape
    gr, gc_ = scale_shape((R, C))
    if (gr * BLOCK, gc_ * BLOCK) != (R, C):
        wp = torch.zeros(gr * BLOCK, gc_ * BLOCK, dtype=torch.float32)
        wp[:R, :C] = w
    else:
        wp = w
    blocks = wp.view(gr, BLOCK, gc_, BLOCK)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    codes = (blocks / scale[:, None, :, None]).view(gr * BLOCK, gc_ * BLOCK)[:R, :C].to(FP8)
    return codes.contiguous(), scale


def build(out: Path, layers: int) -> tuple[dict, list[Path]]:
    """Write a DeepSeek-V3-shaped FP8 checkpoint of ``layers`` layers to ``out``; returns (config, layer shards)."""
    import transformers

    cfg = transformers.DeepseekV3Config(**{**DSV3, "num_hidden_layers": layers}, vocab_size=256, intermediate_size=128,
                                        first_k_dense_replace=layers, max_position_embeddings=4096).to_dict()
    cfg["quantization_config"] = QCFG
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(0)
    d, inter = DSV3["hidden_size"], 128
    n_files = layers + 1
    weight_map, shards = {}, []

    def linear(shape: tuple[int, int]) -> torch.Tensor:
        return torch.randn(shape, generator=g) / math.sqrt(shape[1])

    def put(sd: dict, name: str, w: torch.Tensor) -> None:
        sd[name + ".weight"], sd[name + ".weight_scale_inv"] = fp8_blocks(w)

    for layer in range(layers):
        sd: dict[str, torch.Tensor] = {}
        base = f"model.layers.{layer}."
        for mod, (shape, kind) in attention_shapes().items():
            if kind == "fp8":
                put(sd, base + "self_attn." + mod, linear(shape))  # type: ignore[arg-type]
            else:
                sd[base + "self_attn." + mod + ".weight"] = (0.5 + torch.rand(shape, generator=g)).to(torch.bfloat16)
        for mod, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
            put(sd, base + "mlp." + mod, linear(shape))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[base + norm + ".weight"] = torch.ones(d, dtype=torch.bfloat16)
        path = out / f"model-{layer + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(sd, str(path), metadata={"format": "pt"})
        weight_map.update({k: path.name for k in sd})
        shards.append(path)
        del sd
        gc.collect()
    rest = {"model.embed_tokens.weight": (torch.randn(256, d, generator=g) * 0.02).to(torch.bfloat16),
            "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
            "lm_head.weight": (torch.randn(256, d, generator=g) * 0.02).to(torch.bfloat16)}
    path = out / f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file(rest, str(path), metadata={"format": "pt"})
    weight_map.update({k: path.name for k in rest})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return cfg, shards


# ------------------------------------------------------------------------------------------- measuring


def drop(path: Path) -> None:
    """Write back and drop ``path`` from the page cache (what a cold read starts from, as far as a user can)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read(paths: list[Path], chunk: int = 16 << 20) -> tuple[int, float]:
    buf = bytearray(chunk)
    total, t = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while (n := fh.readinto(buf)) > 0:
                total += n
    return total, time.perf_counter() - t


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def dequant_f32(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same block product in float32, blockwise (no full-size scale matrix): the cheaper alternative."""
    R, C = codes.shape
    gr, gc_ = scale.shape
    w = torch.zeros(gr * BLOCK, gc_ * BLOCK, dtype=torch.float32)
    w[:R, :C] = codes.to(torch.float32)
    w.view(gr, BLOCK, gc_, BLOCK).mul_(scale[:, None, :, None])
    return w[:R, :C]


def clock(fn):
    """(fn(), wall seconds, this process's CPU seconds): on a shared machine the CPU time is what the step costs."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def analysis_breakdown(f, sample: int) -> dict[str, float]:
    """analyze_mla_layer's parts in CPU seconds, timed with the same calls (per-head parts from ``sample`` heads,
    scaled to H)."""
    from headlens.circuits.mla import head_ov_factors
    from headlens.circuits.spectrum import factored_svd

    H = f.W_O.shape[0]
    readouts = f.W_UV * f.gamma[None, None, :]
    heads = range(min(sample, H))
    _, _, ov = clock(lambda: [factored_svd(*head_ov_factors(f, h)) for h in heads])
    _, _, use = clock(lambda: [factored_svd(f.W_O[h], readouts[h]) for h in heads])
    _, _, latent = clock(lambda: torch.linalg.svdvals(f.gamma[:, None] * f.W_DKV))
    G, _, gram = clock(lambda: torch.einsum("hvr,hvw,hws->rs", readouts, f.W_O.transpose(1, 2) @ f.W_O, readouts))
    _, _, eig = clock(lambda: torch.linalg.eigvalsh(G))
    return {"per-head OV factored SVDs (B = W_UV diag(g) W_DKV; QR of d x v twice; v x v SVD)": ov * H / len(heads),
            "per-head latent read-out factored SVDs (QR of W_O^h again, of r x v)": use * H / len(heads),
            "latent map SVD (r x d)": latent, "stacked read-out Gram (einsum)": gram, "Gram eigensolve (r x r)": eig}


def try_run_mla_sweep(directory: Path) -> tuple[str, float | None]:
    """(one line, CPU seconds per layer from run_mla_sweep on 2 layers minus 1, or None when it fails)."""
    from headlens.circuits.mla import run_mla_sweep
    from headlens.io.source import ModelSource

    try:
        _, _, one = clock(lambda: run_mla_sweep(ModelSource(weights=directory), layers="0"))
    except Exception as exc:  # reported in one line, not handled
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = Path(tb.filename).relative_to(ROOT) if ROOT in Path(tb.filename).parents else tb.filename
        return (f"run_mla_sweep refuses the FP8 checkpoint: {where}:{tb.lineno} ({tb.name}): "
                f"{type(exc).__name__}: {exc}"), None
    _, _, two = clock(lambda: run_mla_sweep(ModelSource(weights=directory), layers="0:2"))
    return f"run_mla_sweep ran: 1 layer {one:.1f} s CPU, 2 layers {two:.1f} s CPU", two - one


# -------------------------------------------------------------------------------------------- estimate


def estimate(layer_bytes: int, read_s: float, compute_s: float, disk_bs: float, net_bs: float, startup: float,
             workers: list[int]) -> list[dict]:
    total = REAL_LAYERS * layer_bytes
    rows = [{"N": "serial", "layers": REAL_LAYERS, "no_overlap": REAL_LAYERS * (read_s + compute_s),
             "overlap": read_s + REAL_LAYERS * max(read_s, compute_s),
             "bound": "compute" if compute_s >= read_s else "disk read"}]
    for n in workers:
        k = math.ceil(REAL_LAYERS / n)
        compute = k * compute_s
        net, local = total / net_bs, total / (n * disk_bs)
        rows.append({"N": n, "layers": k, "compute": compute, "net_read": net, "local_read": local,
                     "net": max(compute, net) + startup, "local": max(compute, local) + startup,
                     "net_bound": "compute" if compute >= net else "network",
                     "local_bound": "compute" if compute >= local else "disk read",
                     "net_no_overlap": k * (layer_bytes / (net_bs / n) + compute_s) + startup,
                     "break_even_mb_s": total / compute / MB})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3, help="layers to build and time (default 3)")
    ap.add_argument("--tmp-dir", default=None, help="where the checkpoint is written (the disk measured)")
    ap.add_argument("--net-gb-s", type=float, default=1.25, help="shared filesystem's aggregate GB/s (10 GbE: 1.25)")
    ap.add_argument("--ray-startup-s", type=float, default=0.0, help="Ray start-up added to every N (not measured)")
    ap.add_argument("--workers", default="1,2,8,32")
    ap.add_argument("--sample-heads", type=int, default=16, help="heads timed for the analysis breakdown (0: none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: one worker per core; 2 threads on a loaded 2-core machine spin)")
    args = ap.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    workers = [int(x) for x in args.workers.split(",")]

    from headlens.circuits.mla import analyze_mla_layer, mla_shape, read_mla_layer
    from headlens.io import dequant
    from headlens.io.quantized import DequantizingSource
    from headlens.io.tensors import open_path

    t_start = time.perf_counter()
    load0 = f"{os.getloadavg()[0]:.2f}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    att_params, att_bytes = stored_bytes()
    sw_params, sw_bytes = stored_bytes(SWEEP_READS)
    print(f"DeepSeek-V3 attention per layer: {att_params:,} parameters, {att_bytes / MB:.1f} MB stored (FP8 + scales, "
          f"bf16 norms); x{REAL_LAYERS} = {REAL_LAYERS * att_bytes / GB:.2f} GB")
    print(f"the sweep reads per layer ({', '.join(SWEEP_READS)}): {sw_params:,} parameters, {sw_bytes / MB:.2f} MB; "
          f"x{REAL_LAYERS} = {REAL_LAYERS * sw_bytes / GB:.2f} GB of the ~{FULL_CHECKPOINT_GB:.0f} GB checkpoint "
          f"({100 * REAL_LAYERS * sw_bytes / GB / FULL_CHECKPOINT_GB:.1f}%)")

    with tempfile.TemporaryDirectory(prefix="dsv3-fp8-", dir=args.tmp_dir) as tmp:
        directory = Path(tmp)
        (config, shards), t_build, _ = clock(lambda: build(directory, args.layers))
        stored = open_path(directory)
        # the built layer's bytes against the real model's
        prefix = "model.layers.0.self_attn."
        built = sum(math.prod(stored.shape(n)) * stored.dtype(n).itemsize for n in stored.keys()
                    if n.startswith(prefix))
        assert built == att_bytes, f"built attention {built} bytes, the real layer {att_bytes}"
        src = DequantizingSource(stored, config, directory)
        shape = mla_shape(config)
        size = sum(p.stat().st_size for p in shards) / GB
        print(f"built {args.layers} layers in {t_build:.1f} s at {directory} ({size:.2f} GB); model_type "
              f"{config['model_type']}, headlens reads: {src.quantization.label}; attention bytes of a built layer = "
              f"the real layer's ({built:,})")

        # the disk's sequential rate, cold then warm
        files = sorted(directory.glob("*.safetensors"))
        for p in files:
            drop(p)
        n, t = sequential_read(files)
        disk_cold = n / t
        n, t = sequential_read(files)
        print(f"sequential read of {n / GB:.2f} GB, 16 MiB pieces: cold {disk_cold / MB:.0f} MB/s, "
              f"warm {n / t / MB:.0f} MB/s")

        line, sweep_layer_s = try_run_mla_sweep(directory)
        print(line)

        rows = []
        breakdown = None
        for layer in range(args.layers):
            base = f"model.layers.{layer}.self_attn."
            names = [n for n in stored.keys() if n.startswith(base) and n.split(".")[4] in SWEEP_READS]
            drop(shards[layer])
            raw, cold, _ = clock(lambda names=names: {n: stored.read(n) for n in names})
            nbytes = sum(t.numel() * t.element_size() for t in raw.values())
            assert nbytes == sw_bytes, f"layer {layer}: read {nbytes} bytes, the real layer's sweep reads {sw_bytes}"
            raw, warm, _ = clock(lambda names=names: {n: stored.read(n) for n in names})
            fp8 = [n[: -len(".weight")] for n in names if n.endswith(".weight") and raw[n].dtype == FP8]
            dq64, w64, c64 = clock(lambda fp8=fp8, raw=raw: [
                dequant.scaled(raw[m + ".weight"], raw[m + ".weight_scale_inv"], block=(BLOCK, BLOCK)) for m in fp8])
            dq32, w32, c32 = clock(lambda fp8=fp8, raw=raw: [
                dequant_f32(raw[m + ".weight"], raw[m + ".weight_scale_inv"]) for m in fp8])
            err = max(float((a - b.double()).abs().max() / a.abs().max()) for a, b in zip(dq64, dq32))
            del raw, dq64, dq32
            gc.collect()
            fresh = DequantizingSource(stored, config, directory)  # an empty dequantization cache
            rss0 = rss_kb("VmRSS")
            exact = reset_peak()
            f, wprep, cprep = clock(lambda fresh=fresh, layer=layer: read_mla_layer(fresh, "model.layers.", layer, shape))
            res, wana, cana = clock(lambda f=f: analyze_mla_layer(f))
            peak = rss_kb("VmHWM")
            if layer == 0 and args.sample_heads > 0:
                breakdown = analysis_breakdown(f, args.sample_heads)
            del f, res, fresh
            gc.collect()
            r = {"layer": layer, "cold": cold, "warm": warm, "w64": w64, "c64": c64, "w32": w32, "c32": c32,
                 "err": err, "wprep": wprep, "cprep": cprep, "wana": wana, "cana": cana, "peak_gb": peak / 1e6,
                 "peak_add_gb": (peak - rss0) / 1e6}
            rows.append(r)
            print(f"layer {layer}: {nbytes / MB:.2f} MB read cold {cold:.3f} s ({nbytes / cold / MB:.0f} MB/s), warm "
                  f"{warm:.3f} s ({nbytes / warm / MB:.0f} MB/s); dequantise float64 {c64:.2f} s CPU ({w64:.2f} wall), "
                  f"float32 {c32:.2f} s CPU (rel. diff {err:.1e}); read_mla_layer (warm) {cprep:.2f} s CPU "
                  f"({wprep:.2f} wall); analyze_mla_layer {cana:.2f} s CPU ({wana:.2f} wall); peak RSS "
                  f"{r['peak_gb']:.2f} GB (+{r['peak_add_gb']:.2f} GB over {rss0 / 1e6:.2f})"
                  + ("" if exact else " [VmHWM not reset: the process's peak]"))

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "layer"}
    lo = {k: min(r[k] for r in rows) for k in rows[0] if k != "layer"}
    print(f"\nper layer over {len(rows)} layers, {threads} torch thread(s); load average {load0} at the start, "
          f"{os.getloadavg()[0]:.2f} now:")
    print("| step | CPU s, median | wall s, median (best) | note |\n| --- | ---: | ---: | --- |")
    print(f"| read, cold | | {med['cold']:.3f} ({lo['cold']:.3f}) | {sw_bytes / med['cold'] / MB:.0f} MB/s, "
          f"{sw_bytes / MB:.1f} MB, headlens's reader after POSIX_FADV_DONTNEED |")
    print(f"| read, warm | | {med['warm']:.3f} ({lo['warm']:.3f}) | {sw_bytes / med['warm'] / MB:.0f} MB/s |")
    for label, k, note in (("dequantise FP8 -> float64 (headlens dequant.scaled)", "64", "3 tensors, 138M weights"),
                           ("dequantise FP8 -> float32 (blockwise, here)", "32", "for comparison"),
                           ("read_mla_layer on DequantizingSource, warm", "prep",
                            "read + dequantise float64 + finiteness + per-head layout"),
                           ("analyze_mla_layer", "ana", "128 heads x 2 factored SVDs, latent SVD, Gram + eigh")):
        print(f"| {label} | {med['c' + k]:.2f} | {med['w' + k]:.2f} ({lo['w' + k]:.2f}) | {note} |")
    if sweep_layer_s is not None:
        print(f"| run_mla_sweep, 2 layers - 1 layer | {sweep_layer_s:.2f} | | |")
    print(f"| peak RSS of read_mla_layer + analyze_mla_layer | | | {med['peak_gb']:.2f} GB "
          f"(+{med['peak_add_gb']:.2f} GB over the process before) |")
    if breakdown:
        print(f"\nanalyze_mla_layer's parts, CPU s (layer 0; per-head parts from {args.sample_heads} heads x 128 / "
              f"{args.sample_heads}):")
        for k, v in breakdown.items():
            print(f"  {k}: {v:.2f}")
        print(f"  sum {sum(breakdown.values()):.2f} against analyze_mla_layer {rows[0]['cana']:.2f}")

    read_s = med["cold"]  # per layer, headlens's reader from a dropped page cache
    compute = med["cprep"] + med["cana"]
    print(f"\nestimate for {REAL_LAYERS} layers: {REAL_LAYERS * sw_bytes / GB:.2f} GB read; per layer read "
          f"{read_s:.3f} s (cold, median) and compute {compute:.1f} CPU s (read_mla_layer warm {med['cprep']:.1f} + "
          f"analysis {med['cana']:.1f}; {threads} thread(s), i.e. the wall time on a core of its own); shared "
          f"filesystem {args.net_gb_s:.2f} GB/s aggregate; local disks {disk_cold / MB:.0f} MB/s each (this one, "
          f"cold); Ray start-up {args.ray_startup_s:.0f} s (--ray-startup-s, not measured here)")
    est = estimate(sw_bytes, read_s, compute, disk_cold, args.net_gb_s * GB, args.ray_startup_s, workers)
    s = est[0]
    print(f"serial: {s['no_overlap'] / 60:.1f} min (read then compute, as run_mla_sweep's loop); "
          f"{s['overlap'] / 60:.1f} min with the next layer read in a thread; bound: {s['bound']}")
    print("| workers N | layers / worker | compute s | shared FS: read s | shared FS: total s (bound) | "
          "local copies: read s | local copies: total s (bound) | shared FS, no overlap s | read-bound below MB/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in est[1:]:
        print(f"| {r['N']} | {r['layers']} | {r['compute']:.0f} | {r['net_read']:.1f} | {r['net']:.0f} "
              f"({r['net_bound']}) | {r['local_read']:.1f} | {r['local']:.0f} ({r['local_bound']}) | "
              f"{r['net_no_overlap']:.0f} | {r['break_even_mb_s']:.0f} |")
    print(f"\nbench wall {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
