"""Factored OV spectrum (QR of the thin factors + hd x hd SVD) versus the seed tool's dense d x d SVD.

Runs both on the same random heads of a Qwen3-4B-shaped layer (d=2560, head_dim=128) in one process
and prints the wall-time ratio and the agreement of the singular values.

    .venv/bin/python bench/bench_ov_factored.py [--hidden 2560] [--head-dim 128] [--heads 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from headlens.circuits.spectrum import factored_svd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4, help="heads timed with each method")
    args = p.parse_args()
    d, hd = args.hidden, args.head_dim
    gen = torch.Generator().manual_seed(0)
    heads = [(torch.randn(d, hd, generator=gen) / d**0.5, torch.randn(hd, d, generator=gen) / d**0.5)
             for _ in range(args.heads)]
    torch.set_num_threads(torch.get_num_threads())

    factored_svd(*heads[0])  # warm-up
    t0 = time.perf_counter()
    fac = [factored_svd(A, B).S for A, B in heads]
    t_fac = (time.perf_counter() - t0) / len(heads)

    results = {}
    for dtype in (torch.float32, torch.float64):
        t0 = time.perf_counter()
        dense = [torch.linalg.svdvals((A.to(dtype) @ B.to(dtype)))[:hd] for A, B in heads]
        results[dtype] = ((time.perf_counter() - t0) / len(heads), dense)

    print(f"d={d} head_dim={hd} heads={len(heads)} threads={torch.get_num_threads()}")
    print(f"factored QR+SVD (float64): {t_fac * 1e3:9.1f} ms/head")
    for dtype, (t, dense) in results.items():
        err = max(float(((f - s.double()).abs() / f[0]).max()) for f, s in zip(fac, dense))
        name = str(dtype).replace("torch.", "")
        print(f"dense d x d SVD ({name}):  {t * 1e3:9.1f} ms/head   ratio dense/factored = {t / t_fac:7.1f}x   "
              f"max |sigma diff| / sigma_1 = {err:.1e}")


if __name__ == "__main__":
    main()
