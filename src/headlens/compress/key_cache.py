"""Key latents in a :class:`~headlens.compress.cache.LatentCache` layer.

A layer with key latents stores in its ``keys`` slot ``[batch, 1, tokens, sum_g k^K_g]`` latents ``c = E^K_g (k - b)``
(so transformers' own growing, windowing, cropping, beam reordering and batch selection apply to it, as to the value
latents in the ``values`` slot) and returns the keys rebuilt, ``U^K_g c + b``. Linear keys (GPT-2, OPT, BLOOM, MPT,
GPTBigCode, Falcon with ALiBi, NoPE layers) are encoded as the cache receives them. Rotary keys (``rotary=True``)
are un-rotated first and re-rotated on read at each cached token's position (:mod:`headlens.compress.rotary_keys`),
so the layer also holds the positions, int32 ``[batch, tokens]`` (per layer: a sliding-window layer keeps fewer), and
applies every operation on the token and batch axes to them too.

The keys come back rebuilt also under absorbed attention (which reads only the value latents).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from headlens.compress.cache_layers import (DynamicLayer, DynamicSlidingWindowLayer, LayerLatents,
                                            LatentLayer, SlidingLatentLayer, _LatentValues)
from headlens.errors import HeadlensError


@dataclass
class KeyLatents(LayerLatents):
    """What one layer's cache needs to store its keys as latents: per kv group the encoder ``E^K_g`` (k_g, hd), the
    up-projection ``U^K_g`` (hd, k_g) with ``E U = I``, the key bias ``b_K`` (hd,) or None; ``rotary``: True where
    E and U act on pre-rotary keys (the cache un-rotates, encodes, and re-rotates on read)."""

    rotary: bool

    what = "key"
    form = "per_group"  # one latent per kv group; "across": CrossKeyLatents (headlens.compress.cross_keys)

    @property
    def unrotates(self) -> bool:
        """Whether the cache un-rotates the keys before encoding (and so keeps their positions)."""
        return bool(self.rotary) and self.form == "per_group"


class _Codec(_LatentValues):
    """The encode/decode arithmetic of the value latents, on key factors (nothing else of a cache layer)."""


class _LatentKeys:
    """Mixin for a transformers cache layer (before :class:`_LatentValues` where the values are latent too): store the
    keys' latents (and positions for rotary keys), return the keys rebuilt."""

    def __init__(self, key_latents: KeyLatents, rotary=None, **kwargs):
        super().__init__(**kwargs)  # type: ignore[call-arg]
        if key_latents.form == "across":
            from headlens.compress.cross_keys import CrossCodec

            self.codec = CrossCodec(key_latents)  # type: ignore[arg-type]
        else:
            self.codec = _Codec(key_latents)
        self.rotary = rotary  # RotaryKeys of the model, where the keys are rotary
        self.positions: torch.Tensor | None = None  # int32 [batch, tokens]: the stored keys' positions
        self.pending = None  # (position_embeddings, position_ids) handed by the attention module's hook

    @property
    def key_latents(self) -> KeyLatents:
        return self.codec.latents

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens' key latents (and positions); return (keys rebuilt for every cached token, what the
        layer returns for the values)."""
        B, _, T, _ = key_states.shape
        new_pos = None
        k = key_states
        if self.rotary is not None:
            handed, self.pending = self.pending, None
            layer = self.key_latents.layer
            new_pos, pe = self.rotary.positions(layer, handed, self.get_seq_length(), B, T,  # type: ignore[attr-defined]
                                                key_states.device)
            work = torch.float64 if key_states.dtype == torch.float64 else torch.float32
            k = self.rotary.unrotate(key_states.to(work), pe)
        latents, values = super().update(self.codec.encode(k).to(key_states.dtype), value_states,  # type: ignore[misc]
                                         *args, **kwargs)
        keys = self.codec.decode(latents, torch.float64 if key_states.dtype == torch.float64 else torch.float32)
        if self.rotary is not None:
            old = self.positions if self.positions is not None else new_pos[:, :0]
            every = torch.cat([old, new_pos], dim=1)
            self.positions = every[:, every.shape[1] - self.keys.shape[-2]:]  # type: ignore[attr-defined]
            shown = every[:, every.shape[1] - latents.shape[-2]:]
            keys = self.rotary.rotate(keys, self.rotary.embeddings(self.key_latents.layer, shown, keys.device))
        return keys.to(key_states.dtype), values

    # the positions follow every operation on the token and batch axes
    def crop(self, tokens_to_remove: int) -> None:
        before = self.keys.shape[-2] if self.is_initialized else 0  # type: ignore[attr-defined]
        super().crop(tokens_to_remove)  # type: ignore[misc]
        if self.positions is not None:
            end = before - abs(tokens_to_remove)  # what is kept ends here (the sliding window keeps a block)
            self.positions = self.positions[:, max(end - self.keys.shape[-2], 0):end]  # type: ignore[attr-defined]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # type: ignore[misc]
        if self.positions is not None and self.positions.shape[1]:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)  # type: ignore[misc]
        if self.positions is not None and self.positions.shape[1]:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)  # type: ignore[misc]
        if self.positions is not None and self.positions.shape[1]:
            self.positions = self.positions[indices]

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.positions, self.pending = None, None

    def offload(self):
        super().offload()  # type: ignore[misc]
        if self.positions is not None:
            self.positions = self.positions.to("cpu", non_blocking=True)

    def prefetch(self):
        super().prefetch()  # type: ignore[misc]
        if self.positions is not None and self.positions.device != self.device:  # type: ignore[attr-defined]
            self.positions = self.positions.to(self.device, non_blocking=True)  # type: ignore[attr-defined]


class KeyLatentLayer(_LatentKeys, DynamicLayer):
    """A growing cache layer whose keys are stored as latents (values full)."""


class SlidingKeyLatentLayer(_LatentKeys, DynamicSlidingWindowLayer):
    """A sliding-window cache layer whose keys are stored as latents (values full)."""


class KeyValueLatentLayer(_LatentKeys, LatentLayer):
    """A growing cache layer whose keys and values are stored as latents."""


class SlidingKeyValueLatentLayer(_LatentKeys, SlidingLatentLayer):
    """A sliding-window cache layer whose keys and values are stored as latents."""


# (transformers' layer class, values latent too) -> the layer class with key latents
KEY_LAYERS = {(DynamicLayer, False): KeyLatentLayer, (DynamicSlidingWindowLayer, False): SlidingKeyLatentLayer,
              (DynamicLayer, True): KeyValueLatentLayer, (DynamicSlidingWindowLayer, True): SlidingKeyValueLatentLayer}


def check_key_latents(key_latents: dict[int, KeyLatents], value_latents: dict[int, LayerLatents]) -> None:
    """Refuse key factors that cannot be stored: E U != I, shapes that disagree, all-zero k, kv groups other than
    the value factors' of the same layer."""
    for layer, lat in key_latents.items():
        if not isinstance(lat, KeyLatents):
            raise HeadlensError(f"`key_latents`[{layer}] must be a KeyLatents, not {type(lat).__name__}")
        if lat.layer != layer:
            raise HeadlensError(f"`key_latents`[{layer}] holds the factors of layer {lat.layer}")
        if not lat.encode or len(lat.up) != len(lat.encode) or (lat.bias is not None and len(lat.bias) != len(lat.encode)):
            raise HeadlensError(f"layer {layer}: key latents need one encoder, up-projection (and bias) per kv group")
        if lat.form == "across":
            from headlens.compress.cross_keys import check_cross

            check_cross(lat, layer)  # type: ignore[arg-type]
        elif sum(lat.ks) == 0:
            raise HeadlensError(f"layer {layer}: key latents of k = 0 in every kv group store no key: leave the "
                                "layer's keys out instead")
        hd = lat.head_dim
        for g, (E, U) in enumerate(zip(lat.encode, lat.up) if lat.form == "per_group" else ()):
            k = int(E.shape[0])
            if E.dim() != 2 or U.dim() != 2 or tuple(E.shape) != (k, hd) or tuple(U.shape) != (hd, k):
                raise HeadlensError(f"layer {layer}, kv group {g}: key encoder {tuple(E.shape)} and up-projection "
                                    f"{tuple(U.shape)} are not (k, {hd}) and ({hd}, k)")
            err = float(torch.linalg.norm(E.double() @ U.double() - torch.eye(k, dtype=torch.float64)))
            if k and err > 1e-3 * math.sqrt(k):
                raise HeadlensError(f"layer {layer}, kv group {g}: the key encoder does not invert its "
                                    f"up-projection (|E U - I| = {err:.2e})")
            if lat.bias is not None and tuple(lat.bias[g].shape) != (hd,):
                raise HeadlensError(f"layer {layer}, kv group {g}: key bias of shape {tuple(lat.bias[g].shape)}")
        vals = value_latents.get(layer)
        if vals is not None and (vals.num_groups != lat.num_groups or vals.head_dim != hd):
            raise HeadlensError(f"layer {layer}: key factors for {lat.num_groups} kv groups of {hd}, value factors "
                                f"for {len(vals.encode)} of {vals.head_dim}")


def rotary_for(model, key_latents: dict[int, KeyLatents]):
    """The model's :class:`~headlens.compress.rotary_keys.RotaryKeys` where some key latents are rotary (None where
    none is), each layer's ``rotary`` flag checked against what the model does; the position hook installed."""
    from headlens.compress import rotary_keys

    rotary = [layer for layer, lat in key_latents.items() if lat.unrotates]  # cross-head latents: no turning
    if model is None:
        if rotary:
            raise HeadlensError(f"layer {rotary[0]} has rotary key latents: the cache un-rotates and re-rotates keys "
                                "with the model's rotary embedding, so build it with `model` (the model it runs with)")
        return None
    attn = rotary_keys.attention_modules(model)
    for layer, lat in key_latents.items():
        if layer in attn and rotary_keys.rotates_keys(model, attn[layer]) != lat.rotary:
            does = "rotates" if lat.rotary is False else "does not rotate"
            raise HeadlensError(f"layer {layer}: key latents with rotary={lat.rotary}, but the model {does} this "
                                "layer's keys: the factors are for another model or were fitted on the wrong keys")
    if not rotary:
        return None
    out = rotary_keys.RotaryKeys(model)
    rotary_keys.install(model)
    return out


# ------------------------------------------------------------------------------------------- saved factors


def key_name(layer: int, group: int, which: str) -> str:
    """The factors file's name of one key factor: ``layer{L}.group{g}.key_{which}`` (encode, up, bias)."""
    return f"layer{layer}.group{group}.key_{which}"


def key_factor_tensors(key_latents: dict[int, KeyLatents]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: float32 tensor}, metadata) that ``latent_factors.safetensors`` holds for ``key_latents``: per layer and
    kv group ``key_encode`` (k, hd), ``key_up`` (hd, k) and ``key_bias`` (hd,) where there is one; metadata ``key_k``
    and ``key_rotary`` (JSON: layer -> k per group, layer -> bool), none where there are no key latents."""
    tensors = {}
    for layer, lat in key_latents.items():
        if lat.form == "across":
            from headlens.compress.cross_keys import cross_tensors

            tensors.update(cross_tensors(lat))  # type: ignore[arg-type]
            continue
        for g, (E, U) in enumerate(zip(lat.encode, lat.up)):
            tensors[key_name(layer, g, "encode")] = E.to(torch.float32).contiguous()
            tensors[key_name(layer, g, "up")] = U.to(torch.float32).contiguous()
            if lat.bias is not None:
                tensors[key_name(layer, g, "bias")] = lat.bias[g].to(torch.float32).contiguous()
    if not key_latents:
        return tensors, {}
    meta = {"key_k": json.dumps({str(layer): lat.ks for layer, lat in key_latents.items()}),
            "key_rotary": json.dumps({str(layer): bool(lat.rotary) for layer, lat in key_latents.items()}),
            "key_form": json.dumps({str(layer): lat.form for layer, lat in key_latents.items()})}
    return tensors, meta


def key_plan_entry(lat: KeyLatents) -> dict:
    """What a layer's entry in ``headlens_latent.json`` says of its key latents: ``key_k`` (k per kv group, or [K]
    for a cross-head latent), ``key_rotary`` and ``key_form`` (``per_group`` or ``across``, with ``key_kv_heads``).
    A layer with key latents only has an entry without ``k``."""
    entry = {"key_k": list(lat.ks), "key_rotary": bool(lat.rotary), "key_form": lat.form}
    if lat.form == "across":
        entry["key_kv_heads"] = lat.num_groups
    return entry


def read_key_latents(entries: list[dict], tensors: dict[str, torch.Tensor], where) -> dict[int, KeyLatents]:
    """{layer: KeyLatents} of the plan's layer ``entries`` that have ``key_k``, from the factors file's ``tensors``
    (``where``: its path, for messages); HeadlensError where a factor is missing or its shape is not the plan's."""
    out = {}
    for entry in entries:
        if "key_k" not in entry:
            continue
        try:
            layer, ks, rotary = int(entry["layer"]), [int(k) for k in entry["key_k"]], entry.get("key_rotary")
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadlensError(f"{where}: a layer entry's key_k is not a list of ints ({exc})") from None
        if not isinstance(rotary, bool):
            raise HeadlensError(f"{where}: layer {layer} has key_k but no key_rotary (true or false)")
        form = entry.get("key_form", "per_group")
        if form == "across":
            from headlens.compress.cross_keys import read_cross

            out[layer] = read_cross(entry, layer, rotary, tensors, where)
            continue
        if form != "per_group":
            raise HeadlensError(f"{where}: layer {layer} has key_form {form!r}: per_group or across")
        enc, up, bias = [], [], []
        for g, k in enumerate(ks):
            try:
                E, U = tensors[key_name(layer, g, "encode")], tensors[key_name(layer, g, "up")]
            except KeyError as exc:
                raise HeadlensError(f"{where} lacks {exc.args[0]}: the key factors do not match the plan") from None
            if E.dim() != 2 or U.dim() != 2 or E.shape[0] != k or U.shape[1] != k:
                raise HeadlensError(f"{where}: layer {layer} group {g} has key_encode {tuple(E.shape)} and key_up "
                                    f"{tuple(U.shape)}, but the plan gives key k = {k}")
            enc.append(E)
            up.append(U)
            if key_name(layer, g, "bias") in tensors:
                bias.append(tensors[key_name(layer, g, "bias")])
        if bias and len(bias) != len(ks):
            raise HeadlensError(f"{where}: layer {layer} has key biases for some kv groups only")
        out[layer] = KeyLatents(layer, enc, up, bias or None, rotary)
    return out
