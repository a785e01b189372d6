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
and returns another. Keys are kept as they are, or stored as key latents in the ``keys`` slot where ``key_latents``
gives them (:mod:`headlens.compress.key_cache`). Inside ``absorbed_attention(model)`` (:mod:`headlens.compress.absorbed`)
``update`` hands attention the latents themselves instead of rebuilt values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from headlens.compress.cache_layers import (LATENT_LAYERS, DynamicSlidingWindowLayer, LatentLayer,  # noqa: F401
                                            LayerLatents, SlidingLatentLayer, _LatentValues, _transformers_cache,
                                            layer_plan)
from headlens.compress.key_cache import KEY_LAYERS, KeyLatents, check_key_latents, read_key_latents, rotary_for
from headlens.errors import HeadlensError

# transformers' Cache, checked again here (an import of this module says in one line when transformers lacks it)
Cache = _transformers_cache()[1]

# How far E_g W_V^g may be from P_g (relative, in float64) before the layer is refused.
ROW_SPACE_TOL = 1e-6


class LatentCache(Cache):
    """transformers ``Cache`` whose compressed layers store value latents, key latents or both (the module docstring
    and :mod:`headlens.compress.key_cache` say how).

    Build it with :meth:`from_pretrained` (a ``compress --save-model`` directory), :meth:`from_plans` (a model and
    compress plans in memory) or ``CompressResult.latent_cache(name)``, and pass it to a forward pass or to
    ``model.generate(ids, past_key_values=cache)``. :meth:`nbytes` is what the cache holds, measured from its
    tensors. A layer the plan leaves out, and a layer type without a latent form, keep full values (``notes``).

    ``key_latents``: {layer: :class:`~headlens.compress.key_cache.KeyLatents`}, layers whose keys are stored as
    latents too (or alone). Rotary ones need ``model``, the model the cache runs with: the cache re-rotates keys with
    its rotary embedding and hooks its attention modules once to learn each call's positions
    (:mod:`headlens.compress.rotary_keys`).

    ``absorbed``: how attention reads the latents (:mod:`headlens.compress.absorbed`). ``"auto"`` (default): as
    latents, without rebuilding a value, while the model runs inside ``absorbed_attention(model)``, and as values
    rebuilt from them (``U_g c + b_g`` for every cached token at every step) otherwise; ``True``: always as latents
    (a forward outside ``absorbed_attention`` is refused); ``False``: always rebuilt. "The model" is the one whose
    ``config`` the cache was built with (``owner``: another config, or None for any model inside a block, as
    ``from_pretrained`` without a model builds it). Keys always come back rebuilt."""

    def __init__(self, latents: dict[int, LayerLatents], config, notes: list[str] | None = None,
                 absorbed: bool | str = "auto", owner=..., key_latents: dict[int, KeyLatents] | None = None,
                 model=None):
        if not isinstance(absorbed, (bool, str)) or absorbed not in (True, False, "auto"):
            raise HeadlensError(f"`absorbed` must be True, False or 'auto', not {absorbed!r}")
        self.absorbed = absorbed
        owner = config if owner is ... else owner
        key_latents = dict(key_latents or {})
        plan = layer_plan(config)
        bad = [layer for layer in (*latents, *key_latents) if not 0 <= layer < len(plan)]
        if bad:
            raise HeadlensError(f"the latent factors name layer {bad[0]}, but the model has {len(plan)} layers")
        check_key_latents(key_latents, latents)
        _check_model(config, key_latents, {}, "the given `key_latents`")
        rotary = rotary_for(model, key_latents)
        layers, kept = [], []
        for i, (base, kw) in enumerate(plan):
            vcls = LATENT_LAYERS.get(base) if i in latents else None
            kcls = KEY_LAYERS.get((base, vcls is not None)) if i in key_latents else None
            if (i in latents and vcls is None) or (i in key_latents and kcls is None):
                kept.append(i)
                vcls = kcls = None
            if kcls is not None:
                extra = {"latents": latents[i]} if vcls is not None else {}
                layer = kcls(key_latents[i], rotary if key_latents[i].unrotates else None, **extra, **kw)
            else:
                layer = vcls(latents[i], **kw) if vcls is not None else base(**kw)
            if vcls is not None:
                layer.absorbed, layer.owner = absorbed, owner
            layers.append(layer)
        self.notes = list(notes or [])
        if kept:
            self.notes.append(f"layers {', '.join(map(str, kept))} keep full keys and values: their cache layer "
                              f"type ({plan[kept[0]][0].__name__}) has no latent form")
        sliding = [i for i, (base, _) in enumerate(plan) if base is DynamicSlidingWindowLayer and i not in kept
                   and (i in latents or i in key_latents)]
        if sliding:
            self.notes.append(f"layers {', '.join(map(str, sliding))} are sliding-window layers: their latents are "
                              "kept for the window only, as their keys and values would be")
        self.latents = {i: lat for i, lat in latents.items() if i not in kept}
        self.key_latents = {i: lat for i, lat in key_latents.items() if i not in kept}
        super().__init__(layers=layers)

    @classmethod
    def from_pretrained(cls, directory: str | Path, model=None, absorbed: bool | str = "auto") -> "LatentCache":
        """The cache for a ``compress --save-model`` directory: ``headlens_latent.json`` (the plan),
        ``latent_factors.safetensors`` (P_g, U_g, E_g, b_g; key factors where the plan gives ``key_k``) and
        ``config.json`` (the layer types). It works with the exported model in that directory and with the original
        checkpoint it was made from. ``model``: the model it will run with, whose config is then checked against the
        factors (layers, kv heads, head_dim, hidden size); needed where keys are rotary latents. ``absorbed``: see
        the class."""
        latents, config, notes, keys = read_latents(Path(directory), model, with_keys=True)
        return cls(latents, config, notes, absorbed, owner=model.config if model is not None else None,
                   key_latents=keys, model=model)

    @classmethod
    def from_plans(cls, model, ck, plans: Sequence, absorbed: bool | str = "auto",
                   key_latents: dict[int, KeyLatents] | None = None) -> "LatentCache":
        """The cache for compress ``plans`` (:class:`~headlens.compress.plan.LayerPlan`) on ``model``, loaded from
        ``ck`` with its original value weights, and ``key_latents`` (see the class). ``absorbed``: see the class."""
        return cls(encoders(model, ck, plans), model.config, absorbed=absorbed, key_latents=key_latents,
                   model=model)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (keys or key latents, values or value latents, and the positions
        of rotary key latents, of every layer), read from the tensors themselves."""
        total = 0
        for layer in self.layers:
            for name in ("keys", "values", "positions"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def __repr__(self) -> str:
        ks = sum(sum(lat.ks) for lat in self.latents.values())
        kk = sum(sum(lat.ks) for lat in self.key_latents.values())
        return (f"LatentCache({len(self.layers)} layers, {len(self.latents)} storing value latents "
                f"(sum of k = {ks}), {len(self.key_latents)} key latents (sum of k = {kk}), "
                f"{self.get_seq_length()} tokens, {self.nbytes()} bytes, absorbed={self.absorbed!r})")


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
    from headlens.compress.projections import value_tensor

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


def read_latents(directory: Path, model=None, with_keys: bool = False):
    """(latents per layer, the model config, notes) of a ``compress --save-model`` directory, checked; with
    ``with_keys`` also the key latents per layer (:class:`~headlens.compress.key_cache.KeyLatents`) last. A layer
    entry without ``k`` has no value latents (key latents only)."""
    from headlens.compress.apply import FACTORS_FILE, LATENT_PLAN_FILE

    plan_path, factors_path = directory / LATENT_PLAN_FILE, directory / FACTORS_FILE
    if not directory.is_dir():
        raise HeadlensError(f"`compressed` {directory}: no such directory")
    if not plan_path.is_file():
        raise HeadlensError(f"`compressed` {directory} has no {LATENT_PLAN_FILE}: it is not a directory "
                            "`compress --save-model` wrote")
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        entries = plan["layers"]
        layers = {int(entry["layer"]): [int(k) for k in entry["k"]] for entry in entries
                  if "k" in entry or "key_k" not in entry}
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
    keys = read_key_latents(entries, tensors, factors_path)
    _check_model(config, latents, meta, directory)
    _check_model(config, keys, meta, directory)
    return (latents, config, [], keys) if with_keys else (latents, config, [])


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
    text = config.get_text_config(decoder=True)
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv = 1  # GPTBigCode, Falcon-7B: one kv head (Falcon's config still says num_kv_heads = heads)
    kv = kv or heads
    for layer, lat in latents.items():
        if n_layers is not None and layer >= n_layers:
            raise HeadlensError(f"the latent factors of {directory} name layer {layer}, but the model has "
                                f"{n_layers} layers: they belong to another model")
        if kv is not None and lat.num_groups != kv:
            raise HeadlensError(f"the latent factors of {directory} have {lat.num_groups} kv groups in layer "
                                f"{layer}, but the model has {kv} kv heads: they belong to another model")
        if hd is not None and lat.head_dim != hd:
            raise HeadlensError(f"the latent factors of {directory} have head_dim {lat.head_dim}, but the model has "
                                f"{hd}: they belong to another model")
    if meta.get("hidden_size") and d is not None and int(meta["hidden_size"]) != d:
        raise HeadlensError(f"the latent factors of {directory} are for hidden size {meta['hidden_size']}, the model "
                            f"has {d}: they belong to another model")
