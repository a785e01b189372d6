"""The output side of ``headlens generate``: the lines it prints and ``generate.json`` (``GenerateResult.to_json()``)."""

from __future__ import annotations

from pathlib import Path

from headlens.compress.generate import GenerateResult
from headlens.io.files import write_json

GENERATE_JSON = "generate.json"


def _speed(value: float | None) -> str:
    return "n/a (one token: no decode step)" if value is None else f"{value:.1f}"


def generate_lines(result: GenerateResult) -> list[str]:
    """The header, each prompt with its two continuations, then per side the cache bytes per token and the decode
    speed, and the agreement and KL (each number as ``generate.json`` holds it)."""
    data = result.to_json()
    n = result.max_new_tokens
    lines = [f"original:   {result.original.model} with DynamicCache",
             f"compressed: {result.compressed.model} with LatentCache (sum of k = {result.latents['latent_dims']} over "
             f"{len(result.latents['ks'])} layer(s))",
             f"{len(result.continuations)} prompt(s) x {n} greedy token(s)"]
    for i, c in enumerate(data["prompts"], 1):
        first = c["first_divergence"]
        lines += [f"prompt {i}: {c['prompt']!r}",
                  f"  original:   {c['original']!r}",
                  f"  compressed: {c['compressed']!r}",
                  "  " + ("the same tokens" if first is None else f"first differs at token {first + 1} of {n}")
                  + f"; KL {c['kl_mean']:.4g} nats, top-1 {100 * c['top1_agreement']:.1f}% along the original"]
    o, z = data["original"], data["compressed"]
    width = 10
    for name, side in (("original", o), ("compressed", z)):
        numbers = side["kv_bytes_per_token"] / side["kv_bytes_per_value"]
        lines.append(f"{name:<{width}}  KV cache {side['kv_bytes_per_token']:.0f} B/token ({numbers:g} numbers x "
                     f"{side['kv_bytes_per_value']} B, measured from the cache's tensors); decode "
                     f"{_speed(side['tokens_per_second'])} tokens/s")
    lines += [f"cache bytes per token: compressed / original = {data['kv_bytes_ratio']:.4f}",
              f"greedy agreement {data['greedy_agreement']:.3f} (the fraction of the {n} tokens before the first "
              "difference, mean over prompts)",
              f"KL {data['kl_mean']:.4g} nats, top-1 agreement {100 * data['top1_agreement']:.1f}% (teacher-forced "
              "along the original's continuation, mean over positions)"]
    return lines


def write_generate(result: GenerateResult, path: Path) -> Path:
    """``generate.json`` at ``path``; returns the path."""
    return write_json(path, result.to_json())
