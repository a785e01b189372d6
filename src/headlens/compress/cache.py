"""A KV cache that really holds less: value latents inside transformers' own ``Cache``.

The cache sees the values the model computed, ``v = W_V^g x (+ b)``, never ``x``. It still stores exactly the plan's
latent ``c = P_g x`` (:mod:`headlens.compress.plan`): the rows of ``P_g`` lie in the row space of ``W_V^g`` (plain:
right singular vectors of ``M_g = [W_O^h W_V^g]``; data-aware: ``P_g = V_k^T S^{-1}`` with ``V_k`` in the row space
of ``W_V^g S``), so ``P_g = E_g W_V^g`` with the encoder ``E_g = P_g (W_V^g)^+`` (k x hd) and
``c = E_g (v - b)``. Values come back as ``v' = U_g c + b`` with ``U_g = W_V^g B_g``: the compressed model's values.
Since ``E_g U_g = P_g B_g = I``, the same encoder reads the values of the exported (weight-replaced) model too. The
condition ``E_g W_V^g = P_g`` is checked where the encoder is made (:func:`encoders`); a layer where it fails is
refused.

Each compressed layer of a :class:`LatentCache` is one of transformers' cache layers (``DynamicLayer``, or
``DynamicSlidingWindowLayer`` for a sliding-window layer) whose ``values`` slot holds the latents of all kv groups,
``[batch, 1, tokens, sum_g k_g]``: the layer's own growing, windowing, cropping, beam reordering and batch selection
apply to it unchanged (they work on the batch and token axes), as transformers' ``QuantizedLayer`` stores one form
and returns another. Keys are kept as they are. Inside ``absorbed_attention(model)`` (:mod:`headlens.compress.absorbed`)
``update`` hands attention the latents themselves instead of rebuilt values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from headlens.compress.absorbed import LatentValues, absorbing
from headlens.errors import HeadlensError

# How far E_g W_V^g may be from P_g (relative, in float64) before the layer is refused.
ROW_SPACE_TOL = 1e-6


@dataclass
class LayerLatents:
    """What one compressed layer's cache needs: per kv group the encoder ``E_g`` (k_g, hd), the up-projection ``U_g``
    (hd, k_g) and the value bias ``b_g`` (hd,) or None. float32 (the factors file's precision) or float64."""

    layer: int
    encode: list[torch.Tensor]
    up: list[torch.Tensor]
    bias: list[torch.Tensor] | None

    @property
    def ks(self) -> list[int]:
        return [int(e.shape[0]) for e in self.encode]

    @property
    def head_dim(self) -> int:
        return int(self.up[0].shape[0])

    def repeats(self, value_states: torch.Tensor) -> int:
        """How many times each kv head's values come repeated (1; Falcon's new decoder architecture hands the cache
        every query head's copy, ``repeat_interleave`` order), checked; HeadlensError for values whose kv groups or
        head_dim are not the factors' (a model other than the one they fit)."""
        G = len(self.encode)
        heads = value_states.shape[1] if value_states.dim() == 4 else -1
        if heads <= 0 or heads % G or value_states.shape[-1] != self.head_dim:
            raise HeadlensError(f"layer {self.layer}: the model's values have shape {tuple(value_states.shape)} "
                                f"([batch, kv heads, tokens, head_dim]), but the latent factors are for "
                                f"{G} kv heads of {self.head_dim}: they belong to another model")
        r = heads // G
        if r > 1 and not torch.equal(value_states, value_states[:, ::r].repeat_interleave(r, dim=1)):
            raise HeadlensError(f"layer {self.layer}: the model hands the cache {heads} value heads that are not "
                                f"{G} kv heads repeated: the latent factors are for {G} kv heads")
        return r


class _LatentValues:
    """Mixin for a transformers cache layer: store the values' latents, return the values rebuilt from them."""

    def __init__(self, latents: LayerLatents, **kwargs):
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.latents = latents
        self._ready: dict = {}

    def _factors(self, device: torch.device):
        """(E list, U list, bias (G, hd) or None, E stacked (G, k, hd) and U^T stacked (G, k, hd) where every group
        has the same k, else None) on ``device`` in float32."""
        if device not in self._ready:
            lat = self.latents
            enc = [e.to(device, torch.float32) for e in lat.encode]
            up = [u.to(device, torch.float32) for u in lat.up]
            bias = torch.stack([b.to(device, torch.float32) for b in lat.bias]) if lat.bias is not None else None
            uniform = len(set(lat.ks)) == 1
            self._ready[device] = (enc, up, bias, torch.stack(enc) if uniform else None,
                                   torch.stack(up).transpose(1, 2).contiguous() if uniform else None)
        return self._ready[device]

    def encode(self, value_states: torch.Tensor) -> torch.Tensor:
        """``[batch, G, tokens, hd]`` values -> ``[batch, 1, tokens, sum_g k_g]`` latents ``c_g = E_g (v_g - b_g)``,
        in the values' dtype."""
        self.repeat = self.latents.repeats(value_states)
        enc, _, bias, E, _ = self._factors(value_states.device)
        v = value_states[:, ::self.repeat] if self.repeat > 1 else value_states
        v = v.to(torch.float32)
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
        _, up, bias, _, Ut = self._factors(latents.device)
        c = latents[:, 0].to(torch.float32)  # (B, T, K)
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


class LatentCache(Cache):
    """transformers ``Cache`` whose compressed layers store value latents (the module docstring says how).

    Build it with :meth:`from_pretrained` (a ``compress --save-model`` directory), :meth:`from_plans` (a model and
    compress plans in memory) or ``CompressResult.latent_cache(name)``, and pass it to a forward pass or to
    ``model.generate(ids, past_key_values=cache)``. :meth:`nbytes` is what the cache holds, measured from its
    tensors. A layer the plan leaves out, and a layer type without a latent form, keep full values (``notes``).

    ``absorbed``: how attention reads the latents (:mod:`headlens.compress.absorbed`). ``"auto"`` (default): as
    latents, without rebuilding a value, while the model runs inside ``absorbed_attention(model)``, and as values
    rebuilt from them (``U_g c + b_g`` for every cached token at every step) otherwise; ``True``: always as latents
    (a forward outside ``absorbed_attention`` is refused); ``False``: always rebuilt. "The model" is the one whose
    ``config`` the cache was built with (``owner``: another config, or None for any model inside a block, as
    ``from_pretrained`` without a model builds it)."""

    def __init__(self, latents: dict[int, LayerLatents], config, notes: list[str] | None = None,
                 absorbed: bool | str = "auto", owner=...):
        if not isinstance(absorbed, (bool, str)) or absorbed not in (True, False, "auto"):
            raise HeadlensError(f"`absorbed` must be True, False or 'auto', not {absorbed!r}")
        self.absorbed = absorbed
        owner = config if owner is ... else owner
        plan = layer_plan(config)
        bad = [layer for layer in latents if not 0 <= layer < len(plan)]
        if bad:
            raise HeadlensError(f"the latent factors name layer {bad[0]}, but the model has {len(plan)} layers")
        layers, kept = [], []
        for i, (base, kw) in enumerate(plan):
            cls = LATENT_LAYERS.get(base) if i in latents else None
            if i in latents and cls is None:
                kept.append(i)
            layers.append(cls(latents[i], **kw) if cls is not None else base(**kw))
            if cls is not None:
                layers[-1].absorbed, layers[-1].owner = absorbed, owner
        self.notes = list(notes or [])
        if kept:
            self.notes.append(f"layers {', '.join(map(str, kept))} keep full values: their cache layer type "
                              f"({plan[kept[0]][0].__name__}) has no latent form")
        sliding = [i for i, layer in enumerate(layers) if isinstance(layer, SlidingLatentLayer)]
        if sliding:
            self.notes.append(f"layers {', '.join(map(str, sliding))} are sliding-window layers: their latents are "
                              "kept for the window only, as their values would be")
        self.latents = {i: lat for i, lat in latents.items() if i not in kept}
        super().__init__(layers=layers)

    @classmethod
    def from_pretrained(cls, directory: str | Path, model=None, absorbed: bool | str = "auto") -> "LatentCache":
        """The cache for a ``compress --save-model`` directory: ``headlens_latent.json`` (the plan),
        ``latent_factors.safetensors`` (P_g, U_g, E_g, b_g) and ``config.json`` (the layer types). It works with the
        exported model in that directory and with the original checkpoint it was made from. ``model``: the model it
        will run with, whose config is then checked against the factors (layers, kv heads, head_dim, hidden size).
        ``absorbed``: see the class."""
        latents, config, notes = read_latents(Path(directory), model)
        return cls(latents, config, notes, absorbed, owner=model.config if model is not None else None)

    @classmethod
    def from_plans(cls, model, ck, plans: Sequence, absorbed: bool | str = "auto") -> "LatentCache":
        """The cache for compress ``plans`` (:class:`~headlens.compress.plan.LayerPlan`) on ``model``, loaded from
        ``ck`` with its original value weights. ``absorbed``: see the class."""
        return cls(encoders(model, ck, plans), model.config, absorbed=absorbed)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (keys and latents or values of every layer), read from the
        tensors themselves."""
        total = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def __repr__(self) -> str:
        ks = sum(sum(lat.ks) for lat in self.latents.values())
        return (f"LatentCache({len(self.layers)} layers, {len(self.latents)} storing value latents "
                f"(sum of k = {ks}), {self.get_seq_length()} tokens, {self.nbytes()} bytes, "
                f"absorbed={self.absorbed!r})")


# ------------------------------------------------------------------------------------------------ encoders


def encoder(P: torch.Tensor, W_V: torch.Tensor, where: str) -> torch.Tensor:
    """``E = P W_V^+`` (k, hd) in float64 such that ``E W_V = P``; HeadlensError naming ``where`` when the rows of
    ``P`` (k, d) do not lie in the row space of ``W_V`` (hd, d) (the rank condition of the construction)."""
    P, W = P.to(torch.float64), W_V.to(torch.float64)
    if P.shape[0] == 0:
        return torch.zeros(0, W.shape[0], dtype=torch.float64)
    E = P @ torch.linalg.pinv(W)
    err = float(torch.linalg.norm(E @ W - P)) / max(float(torch.linalg.norm(P)), 1e-300)
    if not math.isfinite(err) or err > ROW_SPACE_TOL:
        rank = int(torch.linalg.matrix_rank(W))
        raise HeadlensError(f"{where}: the latent's down-projection does not lie in the row space of the value "
                            f"weights (W_V has rank {rank} of {W.shape[0]}; E W_V - P is {err:.2e} of P): the cache "
                            "cannot store this latent from the values it sees")
    return E


def encoders(model, ck, plans: Sequence) -> dict[int, LayerLatents]:
    """{layer: LayerLatents} for compress ``plans`` on ``model`` (its original value weights), each encoder checked
    (:func:`encoder`); the value bias read from the model."""
    from headlens.compress.apply import value_tensor

    out = {}
    for plan in plans:
        vt = value_tensor(model, ck, plan.layer)
        bias = getattr(vt.module, "bias", None)
        enc, up, biases = [], [], []
        for lat in plan.groups:
            block = vt.blocks[lat.kv_head]
            W = vt.param.detach()[block.index]
            W = (W.T if block.transposed else W).to("cpu", torch.float64)  # (hd, d)
            enc.append(encoder(lat.down, W, f"layer {plan.layer}, kv group {lat.kv_head}"))
            up.append(lat.up.to(torch.float64))
            if isinstance(bias, torch.Tensor):
                biases.append(_bias_block(bias, block))
        out[plan.layer] = LayerLatents(plan.layer, enc, up, biases if biases else None)
    return out


def _bias_block(bias: torch.Tensor, block) -> torch.Tensor:
    """The value bias of one kv group: the entries of the (fused) projection's bias its rows (Linear) or columns
    (Conv1D) take."""
    index = block.index
    if isinstance(index, tuple):
        sel = index[1] if block.transposed else index[0]
    else:
        sel = index
    return bias.detach()[sel].to("cpu", torch.float64)


# ------------------------------------------------------------------------------------------- from a directory


def read_latents(directory: Path, model=None) -> tuple[dict[int, LayerLatents], object, list[str]]:
    """(latents per layer, the model config, notes) of a ``compress --save-model`` directory, checked."""
    from headlens.compress.apply import FACTORS_FILE, LATENT_PLAN_FILE

    plan_path, factors_path = directory / LATENT_PLAN_FILE, directory / FACTORS_FILE
    if not directory.is_dir():
        raise HeadlensError(f"`compressed` {directory}: no such directory")
    if not plan_path.is_file():
        raise HeadlensError(f"`compressed` {directory} has no {LATENT_PLAN_FILE}: it is not a directory "
                            "`compress --save-model` wrote")
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        layers = {int(entry["layer"]): [int(k) for k in entry["k"]] for entry in plan["layers"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadlensError(f"{plan_path} is not a latent plan ({exc})") from None
    if not factors_path.is_file():
        raise HeadlensError(f"`compressed` {directory} has no {FACTORS_FILE}: the latent factors are missing")
    tensors, meta = _read_factors(factors_path)
    config = _config(directory, model)
    d = _config_int(config, ("hidden_size", "n_embd", "d_model"))
    heads = _config_int(config, ("num_attention_heads", "n_head"))
    hd = _config_int(config, ("head_dim",)) or (d // heads if d and heads else None)
    latents = {}
    for layer, ks in sorted(layers.items()):
        enc, up, bias = [], [], []
        for g, k in enumerate(ks):
            name = f"layer{layer}.group{g}"
            try:
                U, P = tensors[f"{name}.up"], tensors[f"{name}.down"]
            except KeyError as exc:
                raise HeadlensError(f"{factors_path} lacks {exc.args[0]}: the factors do not match "
                                    f"{LATENT_PLAN_FILE}") from None
            if U.dim() != 2 or P.dim() != 2 or U.shape[1] != k or P.shape[0] != k or \
                    (d is not None and P.shape[1] != d):
                raise HeadlensError(f"{factors_path}: {name} has up {tuple(U.shape)} and down {tuple(P.shape)}, but "
                                    f"the plan gives k = {k}" + (f" and the model hidden size {d}" if d else ""))
            E = tensors.get(f"{name}.encode")
            if E is None:
                raise HeadlensError(f"{factors_path} has no encoders (written by a headlens before LatentCache): "
                                    "save the compressed model again (`compress` with `save_model`)")
            if hd is not None and U.shape[0] != hd:
                raise HeadlensError(f"the latent factors of {directory} have head_dim {U.shape[0]}, but the model "
                                    f"has {hd}: they belong to another model")
            if tuple(E.shape) != (k, U.shape[0]):
                raise HeadlensError(f"{factors_path}: {name}.encode has shape {tuple(E.shape)}, expected {(k, U.shape[0])}")
            check = E.to(torch.float64) @ U.to(torch.float64)
            if k and float(torch.linalg.norm(check - torch.eye(k, dtype=torch.float64))) > 1e-3 * math.sqrt(k):
                raise HeadlensError(f"{factors_path}: {name}'s encoder does not invert its up-projection (E U != I): "
                                    "the factors are corrupt")
            enc.append(E)
            up.append(U)
            if f"{name}.bias" in tensors:
                bias.append(tensors[f"{name}.bias"])
        if bias and len(bias) != len(ks):
            raise HeadlensError(f"{factors_path}: layer {layer} has value biases for some kv groups only")
        latents[layer] = LayerLatents(layer, enc, up, bias or None)
    _check_model(config, latents, meta, directory)
    return latents, config, []


def _read_factors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeadlensError(f"{path} is not a readable latent factors file ({first})") from None


def _config(directory: Path, model):
    if model is not None:
        return model.config
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeadlensError(f"cannot read the model config of {directory} ({first})") from None


def _config_int(config, names: tuple[str, ...]) -> int | None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for n in names:
        v = getattr(text, n, None)
        if isinstance(v, int):
            return v
    return None


def _check_model(config, latents: dict[int, LayerLatents], meta: dict, directory: Path) -> None:
    """Refuse factors for another model: layers beyond the model's, kv heads, head_dim or hidden size that differ."""
    n_layers = _config_int(config, ("num_hidden_layers", "n_layer", "num_layers"))
    kv = _config_int(config, ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"))
    heads = _config_int(config, ("num_attention_heads", "n_head"))
    d = _config_int(config, ("hidden_size", "n_embd", "d_model"))
    hd = _config_int(config, ("head_dim",)) or (d // heads if d and heads else None)
    if kv is None and getattr(config.get_text_config(decoder=True), "multi_query", False):
        kv = 1
    kv = kv or heads
    for layer, lat in latents.items():
        if n_layers is not None and layer >= n_layers:
            raise HeadlensError(f"the latent factors of {directory} name layer {layer}, but the model has "
                                f"{n_layers} layers: they belong to another model")
        if kv is not None and len(lat.encode) != kv:
            raise HeadlensError(f"the latent factors of {directory} have {len(lat.encode)} kv groups in layer "
                                f"{layer}, but the model has {kv} kv heads: they belong to another model")
        if hd is not None and lat.head_dim != hd:
            raise HeadlensError(f"the latent factors of {directory} have head_dim {lat.head_dim}, but the model has "
                                f"{hd}: they belong to another model")
    if meta.get("hidden_size") and d is not None and int(meta["hidden_size"]) != d:
        raise HeadlensError(f"the latent factors of {directory} are for hidden size {meta['hidden_size']}, the model "
                            f"has {d}: they belong to another model")
