"""bench/bench_kv_peers.py's bytes: equal bytes really equal (issue 24). Every latent configuration the bench
measures holds, after a prefill, within 1% of its budget per token (LatentCache.nbytes() at 2 bytes a number, or 1
plus the FP8 scales), and the peers' bytes are those of their stored tensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kv_peers", REPO / "bench" / "bench_kv_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fitted(bench):
    return bench.Fitted("tiny-lm", threads=1)


def _prefill(model, cache, n=40):
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return n


def test_dynamic_cache_counts_two_bytes_a_number(bench, fitted):
    from transformers import DynamicCache

    model = fitted.model
    cache = DynamicCache(config=model.config)
    n = _prefill(model, cache)
    assert bench.held_bytes(cache) == n * bench.original_bytes(model.config) == n * 6 * 2 * 2 * 64 * 2


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125])
def test_latents_hit_the_budget(bench, fitted, ratio):
    model = fitted.model
    budget = ratio * bench.original_bytes(model.config)
    _, factory = bench.uniform_allocation(fitted, budget, bench.NUMBER_BYTES, 0)
    cache = factory()
    n = _prefill(model, cache)
    positions = sum(layer.positions.numel() * 4 for layer in cache.layers if layer.positions is not None)
    numbers = (cache.nbytes() - positions) // 4  # float32 latents
    assert bench.held_bytes(cache) == numbers * 2 + positions
    assert abs(bench.held_bytes(cache) / n - budget) <= 0.01 * budget

    _, factory = bench.uniform_allocation(fitted, budget, 1, 2 * bench.SCALE_BYTES)
    cache, scales = bench.fp8_latents(factory())
    _prefill(model, cache)
    assert scales["n"] == 2 * 6 * n  # one scale per token, layer and slot (keys, values)
    held = bench.held_bytes(cache, {"keys": 1, "values": 1}) + scales["n"] * bench.SCALE_BYTES
    assert abs(held / n - budget) <= 0.01 * budget


def test_fp8_latents_are_fp8_numbers(bench, fitted):
    model = fitted.model
    _, factory = bench.uniform_allocation(fitted, 0.25 * bench.original_bytes(model.config), 1, 4)
    cache, _ = bench.fp8_latents(factory())
    _prefill(model, cache)
    v = cache.layers[0].values[0, 0]  # [tokens, sum_g k_g]: each token's latents are an FP8 grid times its scale
    scale = (v.abs().amax(-1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max)
    q = v / scale
    assert torch.allclose(q.to(torch.float8_e4m3fn).float(), q, rtol=0, atol=1e-3 * q.abs().max())


def test_quantized_fp8_cache_counts_its_stored_tensors(bench, fitted):
    from transformers import QuantizedCache

    model = fitted.model
    cache = QuantizedCache(backend="fp8", config=model.config)
    n = _prefill(model, cache)
    # one byte a number for keys and values, one float32 scale (counted at 2 bytes) per tensor
    assert bench.held_bytes(cache) == n * bench.original_bytes(model.config) // 2 + 6 * 2 * 2
