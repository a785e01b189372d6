"""The cache layers of a :class:`~headlens.compress.cache.LatentCache` that store value latents: transformers' own
``DynamicLayer`` / ``DynamicSlidingWindowLayer`` whose ``values`` slot holds ``[batch, 1, tokens, sum_g k_g]`` latents
(:mod:`headlens.compress.cache` says what they are; :mod:`headlens.compress.key_cache` adds key latents)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlens.compress.absorbed import LatentValues, absorbing
from headlens.errors import HeadlensError


@dataclass
class LayerLatents:
    """What one compressed layer's cache needs: per kv group the encoder ``E_g`` (k_g, hd), the up-projection ``U_g``
    (hd, k_g) and the value bias ``b_g`` (hd,) or None. float32 (the factors file's precision) or float64."""

    layer: int
    encode: list[torch.Tensor]
    up: list[torch.Tensor]
    bias: list[torch.Tensor] | None

    what = "value"  # what the factors encode, for messages

    @property
    def ks(self) -> list[int]:
        return [int(e.shape[0]) for e in self.encode]

    @property
    def head_dim(self) -> int:
        return int(self.up[0].shape[0])

    @property
    def num_groups(self) -> int:
        """The kv groups the factors are for."""
        return len(self.encode)

    def repeats(self, value_states: torch.Tensor) -> int:
        """How many times each kv head's values come repeated (1; Falcon's new decoder architecture hands the cache
        every query head's copy, ``repeat_interleave`` order), checked; HeadlensError for values whose kv groups or
        head_dim are not the factors' (a model other than the one they fit)."""
        G, what = self.num_groups, self.what
        heads = value_states.shape[1] if value_states.dim() == 4 else -1
        if heads <= 0 or heads % G or value_states.shape[-1] != self.head_dim:
            raise HeadlensError(f"layer {self.layer}: the model's {what}s have shape {tuple(value_states.shape)} "
                                f"([batch, kv heads, tokens, head_dim]), but the {what} latent factors are for "
                                f"{G} kv heads of {self.head_dim}: they belong to another model")
        r = heads // G
        if r > 1 and not torch.equal(value_states, value_states[:, ::r].repeat_interleave(r, dim=1)):
            raise HeadlensError(f"layer {self.layer}: the model hands the cache {heads} {what} heads that are not "
                                f"{G} kv heads repeated: the latent factors are for {G} kv heads")
        return r


def _working(*dtypes: torch.dtype) -> torch.dtype:
    """The type latents are encoded and decoded in: float64 where a float64 tensor is involved, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class _LatentValues:
    """Mixin for a transformers cache layer: store the values' latents, return the values rebuilt from them."""

    def __init__(self, latents: LayerLatents, **kwargs):
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.latents = latents
        self._ready: dict = {}

    def _factors(self, device: torch.device, dtype: torch.dtype = torch.float32):
        """(E list, U list, bias (G, hd) or None, E stacked (G, k, hd) and U^T stacked (G, k, hd) where every group
        has the same k, else None) on ``device`` in ``dtype`` (float32; float64 for a float64 model)."""
        if (device, dtype) not in self._ready:
            lat = self.latents
            enc = [e.to(device, dtype) for e in lat.encode]
            up = [u.to(device, dtype) for u in lat.up]
            bias = torch.stack([b.to(device, dtype) for b in lat.bias]) if lat.bias is not None else None
            uniform = len(set(lat.ks)) == 1
            self._ready[(device, dtype)] = (enc, up, bias, torch.stack(enc) if uniform else None,
                                            torch.stack(up).transpose(1, 2).contiguous() if uniform else None)
        return self._ready[(device, dtype)]

    def encode(self, value_states: torch.Tensor) -> torch.Tensor:
        """``[batch, G, tokens, hd]`` values -> ``[batch, 1, tokens, sum_g k_g]`` latents ``c_g = E_g (v_g - b_g)``,
        in the values' dtype."""
        self.repeat = self.latents.repeats(value_states)
        work = _working(value_states.dtype)
        enc, _, bias, E, _ = self._factors(value_states.device, work)
        v = value_states[:, ::self.repeat] if self.repeat > 1 else value_states
        v = v.to(work)
        if bias is not None:
            v = v - bias[:, None, :]
        B, G, T, _ = v.shape
        if E is not None:  # every group the same k: one batched product
            c = torch.matmul(v, E.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1)  # (B, T, G k)
        else:
            c = torch.cat([v[:, g] @ enc[g].T for g in range(G)], dim=-1)
        return c.unsqueeze(1).to(value_states.dtype)

    def decode(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[batch, 1, tokens, sum_g k_g]`` latents -> ``[batch, G, tokens, hd]`` values ``U_g c_g + b_g``."""
        work = _working(latents.dtype, dtype)
        _, up, bias, _, Ut = self._factors(latents.device, work)
        c = latents[:, 0].to(work)  # (B, T, K)
        if Ut is not None:
            B, T, _ = c.shape
            v = torch.matmul(c.view(B, T, len(up), -1).transpose(1, 2), Ut)  # (B, G, T, hd)
        else:
            parts = torch.split(c, self.latents.ks, dim=-1)
            v = torch.stack([p @ u.T for p, u in zip(parts, up)], dim=1)
        if bias is not None:
            v = v + bias[None, :, None, :]
        if getattr(self, "repeat", 1) > 1:
            v = v.repeat_interleave(self.repeat, dim=1)
        return v.to(dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens' latents; return (keys, values rebuilt from every cached latent), or under absorbed
        attention (keys, the latents as :class:`~headlens.compress.absorbed.LatentValues`)."""
        keys, latents = super().update(key_states, self.encode(value_states), *args, **kwargs)  # type: ignore[misc]
        if self._hand_latents():
            return keys, LatentValues.wrap(latents, self)
        return keys, self.decode(latents, value_states.dtype)

    absorbed: bool | str = "auto"
    owner = None  # the config of the model the cache was built for (None: not known)

    def _hand_latents(self) -> bool:
        if self.absorbed is False:
            return False
        inside = absorbing(self.owner)
        if self.absorbed is True and not inside:
            raise HeadlensError("the LatentCache was built with `absorbed`=True, but the model is not running "
                                "absorbed attention: run it inside headlens.compress.absorbed.absorbed_attention(model)"
                                " (or build the cache with `absorbed`='auto' or False)")
        return inside


def _transformers_cache():
    """transformers' layered Cache API (5.x), or a one-line refusal naming the installed version."""
    import transformers

    try:
        from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer,
                                              DynamicSlidingWindowLayer, get_layer_types_and_kwargs)
    except ImportError:
        raise HeadlensError(f"LatentCache needs transformers' layered Cache API (transformers 5.x; this is "
                            f"{transformers.__version__}): install the version constraints.txt pins") from None
    return DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs


_MAPPING, Cache, DynamicLayer, DynamicSlidingWindowLayer, _layer_types = _transformers_cache()


class LatentLayer(_LatentValues, DynamicLayer):
    """A growing cache layer whose values are stored as latents (see the module docstring)."""


class SlidingLatentLayer(_LatentValues, DynamicSlidingWindowLayer):
    """A sliding-window cache layer whose values are stored as latents: the last ``sliding_window - 1`` tokens'."""


LATENT_LAYERS = {DynamicLayer: LatentLayer, DynamicSlidingWindowLayer: SlidingLatentLayer}


def layer_plan(config) -> list[tuple[type, dict]]:
    """[(transformers' dynamic cache layer class, its kwargs)] per decoder layer, as ``DynamicCache(config=...)``
    builds them (sliding-window and chunked layers from ``layer_types`` / ``sliding_window``)."""
    decoder = config.get_text_config(decoder=True)
    types, kwargs = _layer_types(decoder)
    return [(_MAPPING[t], kw) for t, kw in zip(types, kwargs)]
