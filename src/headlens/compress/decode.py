"""Greedy decoding through a transformers cache, measured: the tokens, the prefill and decode times, and the bytes
the cache holds (read from its tensors). :mod:`headlens.compress.generate` compares two such runs;
``compress`` checks each configuration's :class:`~headlens.compress.cache.LatentCache` with one (:func:`check_cache`).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

OPENING_TOKENS = 16  # a prompt made from a text: its first this many tokens


@dataclass
class Greedy:
    """One greedy continuation through one cache (:func:`greedy`): its tokens, the prompt's pass (prefill) and the
    one-token steps (decode) timed apart, and what the cache holds at the end."""

    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int  # every tensor the cache holds at the end
    cached_tokens: int  # the tokens it has seen: prompt + N - 1
    bytes_per_value: int  # element size of the cached tensors
    position_bytes: int = 0  # of cache_bytes: the positions rotary key latents keep


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes of every tensor ``cache`` holds, bytes per number): ``nbytes()`` where the cache measures itself
    (LatentCache), else the keys and values of each of transformers' cache layers."""
    total, size = 0, 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                total += t.numel() * t.element_size()
                size = size or t.element_size()
    if hasattr(cache, "nbytes"):
        total = int(cache.nbytes())
    return total, size


def position_bytes(cache) -> int:
    """Bytes of the token positions a cache's rotary key-latent layers keep (0 for any other cache)."""
    return sum(int(t.numel() * t.element_size()) for t in (getattr(layer, "positions", None) for layer in cache.layers)
               if isinstance(t, torch.Tensor))


def _keep(model) -> dict:
    """``logits_to_keep`` where the model's forward takes it (the logits of the last positions only)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy(model, ids: torch.Tensor, cache, n: int) -> Greedy:
    """``n`` greedy tokens after ``ids`` ((1, P) token ids) through ``cache`` (filled as it goes): the prompt's pass,
    then ``n - 1`` one-token steps, timed apart; no end-of-text stop."""
    from headlens.io.placement import input_device

    device = input_device(model)
    keep = _keep(model)
    out = []
    with torch.no_grad():
        t0 = time.perf_counter()
        nxt = model(ids.to(device), past_key_values=cache, use_cache=True, **keep).logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        out.append(nxt)
        for _ in range(n - 1):
            nxt = model(nxt, past_key_values=cache, use_cache=True, **keep).logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
        _sync(device)
        t2 = time.perf_counter()
    total, size = cache_bytes(cache)
    return Greedy(torch.cat(out, dim=1)[0].tolist(), t1 - t0, t2 - t1, total, int(cache.get_seq_length()), size,
                  position_bytes(cache))


def next_token_logits(model, ids: torch.Tensor, cache, n: int) -> torch.Tensor:
    """(n, vocab) float64 next-token logits at the last ``n`` positions of one pass over ``ids`` (1, T) through
    ``cache``."""
    from headlens.io.placement import input_device

    keep = {"logits_to_keep": n} if _keep(model) else {}
    with torch.no_grad():
        logits = model(ids.to(input_device(model)), past_key_values=cache, use_cache=True, **keep).logits
    return logits[0, -n:].to("cpu", torch.float64)


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of two (n, vocab) float64 logit tables, in nats."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


# ------------------------------------------------------------------------------------- compress's check


@dataclass
class CacheCheck:
    """One compress configuration's LatentCache measured in a short greedy generation (``compress --generate``):
    the bytes per token its tensors hold, in the model's dtype, against the plan's at ``kv_bytes`` per number."""

    tokens: int  # generated
    cached_tokens: int  # prompt + tokens - 1
    kv_bytes_per_token: float  # measured: LatentCache.nbytes() / cached tokens
    kv_bytes_per_value: int  # the cached tensors' element size (the model's dtype)
    planned_bytes_per_token: float  # the plan's: full keys + sum_g k_g per layer, at planned_bytes_per_value
    planned_bytes_per_value: float  # compress's kv_bytes
    text: str  # the continuation
    notes: list[str] = field(default_factory=list)  # the cache's own (layers kept full, sliding windows)
    position_bytes_per_token: float = 0.0  # of kv_bytes_per_token: int32 positions of rotary key latents

    @property
    def numbers_per_token(self) -> float:
        """Cached numbers per token, measured: bytes over the element size, the positions (whose bytes do not
        follow the model's dtype) counted at the plan's bytes per number, as the plan counts them."""
        if not self.kv_bytes_per_value:
            return 0.0
        return ((self.kv_bytes_per_token - self.position_bytes_per_token) / self.kv_bytes_per_value
                + self.position_bytes_per_token / self.planned_bytes_per_value)

    @property
    def planned_numbers_per_token(self) -> float:
        return self.planned_bytes_per_token / self.planned_bytes_per_value

    @property
    def agrees(self) -> bool:
        """The measured numbers per token are the planned ones (the bytes differ only by the bytes per number)."""
        return abs(self.numbers_per_token - self.planned_numbers_per_token) <= 1e-9 * max(
            self.planned_numbers_per_token, 1.0)


def check_cache(model, ck, tokenizer, ids: torch.Tensor, plans: Sequence, n: int, planned_bytes_per_token: float,
                bytes_per_value: float, key_plans: dict | None = None) -> CacheCheck:
    """Generate ``n`` greedy tokens after ``ids`` (1, P) with ``LatentCache.from_plans(model, ck, plans)`` (and the
    key latents of ``key_plans``, layer -> KeyLayerPlan) and measure what the cache holds (:class:`CacheCheck`)."""
    from headlens.compress.cache import LatentCache
    from headlens.io.source import quiet_transformers

    if key_plans:
        cache = LatentCache.from_plans(model, ck, plans,
                                       key_latents={layer: p.cache_latents() for layer, p in key_plans.items()})
    else:
        cache = LatentCache.from_plans(model, ck, plans)
    g = greedy(model, ids, cache, n)
    with quiet_transformers():
        text = tokenizer.decode(g.tokens, skip_special_tokens=True)
    return CacheCheck(tokens=n, cached_tokens=g.cached_tokens, kv_bytes_per_token=g.cache_bytes / g.cached_tokens,
                      kv_bytes_per_value=g.bytes_per_value, planned_bytes_per_token=float(planned_bytes_per_token),
                      planned_bytes_per_value=float(bytes_per_value), text=text, notes=list(cache.notes),
                      position_bytes_per_token=g.position_bytes / g.cached_tokens)


def opening(tokenizer, text: str) -> torch.Tensor:
    """(1, P) token ids: the first :data:`OPENING_TOKENS` tokens of ``text``."""
    from headlens.io.source import quiet_transformers

    with quiet_transformers():
        ids = tokenizer(text)["input_ids"][:OPENING_TOKENS]
    return torch.tensor([ids], dtype=torch.long)
