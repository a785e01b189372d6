"""Rotary keys in a latent cache: un-rotate the keys the cache receives, re-rotate the keys it returns.

A rotary family hands the cache ``k = R(p) k_pre`` (after ``k_norm`` where the family has one), where ``R(p)`` is the
rotation of the token's position ``p``; the key latents live on ``k_pre`` (:class:`~headlens.compress.key_cache.KeyLatents`
with ``rotary=True``). transformers passes the cache no positions (``past_key_values.update(k, v, layer_idx)``), so a
forward pre-hook on each attention module (:func:`install`, once per model) hands the cache layer the
``position_embeddings`` (cos, sin) the module was given for its new tokens and their ``position_ids``. The layer

- un-rotates the new keys with the family's own rotate function (the modeling module's ``apply_rotary_pos_emb``) at
  ``(cos / s2, -sin / s2)``, ``s2 = cos^2 + sin^2``: ``R(cos, sin) = c I + s J`` per rotated pair with ``J^2 = -I``,
  so that is its exact inverse, also where ``attention_scaling`` scales cos and sin;
- stores the latents of ``k_pre`` and the positions (int32 ``[batch, tokens]``);
- rebuilds ``k_pre`` for every cached token and rotates it at the stored positions, with cos/sin from the model's own
  rotary embedding module (``rotary_emb(x, position_ids)``, per layer type where the module takes one, as Gemma 3's).

Each update checks that the rotary module reproduces, at the positions it stores, the cos/sin the attention module
was handed for the new tokens (so the positions are the model's, and the rotary module is the one the layer uses).
Partial rotary (GPT-NeoX, Phi, StableLM, GLM-4: the first ``cos.shape[-1]`` dims) and interleaved rotary (Cohere,
GLM-4) come from the family's function; Llama 4's complex ``freqs_cis`` from its ``apply_rotary_emb``.

GPT-J has no rotary module: each attention module gathers ``sin | cos`` at its ``position_ids`` from its own
``embed_positions`` buffer and turns the first ``rotary_dim`` dims of ``[batch, tokens, heads, hd]`` with its
``apply_rotary_pos_emb(tensor, sin, cos)`` (pairs of neighbouring dims). There the cache reads cos/sin from that buffer
(:func:`buffer_embeddings`) at the ``position_ids`` the module was handed, and turns with the family's function
through :func:`family_rotate`'s adapter to the ``(q, k, cos, sin)`` form.
"""

from __future__ import annotations

import inspect
import sys
import weakref

import torch

from headlens.errors import HeadlensError

# Families whose keys the cache cannot un-rotate and re-rotate, and why (refused when rotary key latents are asked).
NO_ROTARY_KEYS = {
    "deepseek_v2": "multi-head latent attention caches a shared latent and a decoupled rotary key, not keys",
    "deepseek_v3": "multi-head latent attention caches a shared latent and a decoupled rotary key, not keys",
}
# RoPE types whose cos/sin at a position depend on the longest position of the call: keys re-rotated later would
# differ from those the model rotated.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# The cache argument's name in the attention modules' forward (Falcon, GPT-J: layer_past).
CACHE_KWARGS = ("past_key_values", "layer_past")
_HOOK = "_headlens_key_positions"


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """{layer index: the attention module that calls ``past_key_values.update`` for it} (modules with an int
    ``layer_idx`` whose class is an attention class)."""
    out = {}
    for module in model.modules():
        idx = layer_index(module)
        name = type(module).__name__
        if idx is not None and "Attention" in name and "DecoderLayer" not in name:
            out.setdefault(idx, module)
    return out


def layer_index(module) -> int | None:
    """The layer index an attention module passes to ``update`` (``layer_idx``; GPT-Neo's ``layer_id``)."""
    idx = getattr(module, "layer_idx", getattr(module, "layer_id", None))
    return idx if isinstance(idx, int) else None


def rotates_keys(model, attn) -> bool:
    """Whether ``attn`` rotates its keys: not a NoPE layer (``use_rope`` False: Llama 4, SmolLM3), not ALiBi (Falcon's
    ``alibi``), and the model has a rotary embedding module."""
    if getattr(attn, "use_rope", True) is False or getattr(model.config, "alibi", False):
        return False
    if getattr(model.config, "model_type", None) in NO_ROTARY_KEYS:
        return True
    return bool(_rotary_modules(model)) or _buffer_rotary(attn)


def _buffer_rotary(attn) -> bool:
    """GPT-J's form: the attention module holds its own sin|cos table and turns its keys itself."""
    return isinstance(getattr(attn, "embed_positions", None), torch.Tensor) and \
        family_rotate(sys.modules[type(attn).__module__])[0] is not None


def family_rotate(modeling):
    """(the family's rotate function in the ``fn(q, k, cos, sin) -> (q', k')`` form on ``[batch, heads, tokens,
    rot]``, whether it takes Llama 4's complex ``freqs_cis`` instead), or (None, False). GPT-J's
    ``apply_rotary_pos_emb(tensor, sin, cos)`` (``[batch, tokens, heads, rot]``, sin/cos ``[batch, tokens, rot / 2]``)
    is adapted: cos/sin come in the ``[batch, tokens, rot]`` form of :func:`buffer_embeddings` (each value twice, as
    the function repeats them) and every other one is handed on."""
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if fn is not None and list(inspect.signature(fn).parameters)[:3] == ["tensor", "sin", "cos"]:
        def apply(q, k, cos, sin, _fn=fn):
            def one(x):
                return _fn(x.transpose(1, 2), sin[..., ::2], cos[..., ::2]).transpose(1, 2)
            return one(q), one(k)
        return apply, False
    if fn is not None:
        return fn, False
    fn = getattr(modeling, "apply_rotary_emb", None)
    return (fn, True) if fn is not None else (None, False)


def buffer_embeddings(attn, positions: torch.Tensor):
    """(cos, sin) [batch, tokens, rot] at ``positions`` [batch, tokens] from a GPT-J attention module's own
    ``embed_positions`` table (``sin | cos`` per position, rot / 2 each), each value repeated for the two dims of its
    pair; float64 where the table is, else float32."""
    table = attn.embed_positions
    sincos = table[positions.to(table.device, torch.long)]
    dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    sin, cos = (t.to(dtype).repeat_interleave(2, dim=-1) for t in sincos.chunk(2, dim=-1))
    return cos, sin


def _rotary_modules(model) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "rotary_emb"]


class RotaryKeys:
    """How one model rotates its keys: its rotary embedding module and its family's rotate function (held weakly: the
    cache does not keep the model alive). HeadlensError, one line, for a family where the cache cannot do it."""

    def __init__(self, model):
        self.family = str(getattr(model.config, "model_type", type(model).__name__))
        if self.family in NO_ROTARY_KEYS:
            raise HeadlensError(f"{self.family} cannot store rotary key latents: {NO_ROTARY_KEYS[self.family]}")
        rotary = _rotary_modules(model)
        attn = attention_modules(model)
        first = next(iter(attn.values()), None)
        self.buffer = not rotary and first is not None and _buffer_rotary(first)  # GPT-J: a sin|cos table per module
        if not self.buffer and (len(rotary) != 1 or not attn):
            raise HeadlensError(f"{self.family} cannot store rotary key latents: it has "
                                f"{len(rotary)} rotary embedding modules (`rotary_emb`) and {len(attn)} attention "
                                "modules with a layer_idx, where the cache needs one and some")
        rope = str(getattr(rotary[0], "rope_type", "")) if rotary else ""
        if any(kind in rope for kind in LENGTH_DEPENDENT_ROPE):
            raise HeadlensError(f"{self.family} cannot store rotary key latents: its RoPE ({rope}) rotates a "
                                "position by the call's length, so cached keys cannot be re-rotated as they were")
        self.fn, self.complex = family_rotate(sys.modules[type(first).__module__])
        if self.fn is None:
            raise HeadlensError(f"{self.family} cannot store rotary key latents: its modeling module has no "
                                "apply_rotary_pos_emb or apply_rotary_emb function")
        text = model.config.get_text_config(decoder=True)
        params = inspect.signature(rotary[0].forward).parameters if rotary else {}
        self.layer_types = list(text.layer_types) if "layer_type" in params else None
        self._rotary = weakref.ref(rotary[0]) if rotary else (lambda: None)
        self._attn = {i: weakref.ref(m) for i, m in attn.items()}

    def owns(self, layer: int, module) -> bool:
        ref = self._attn.get(layer)
        return ref is not None and ref() is module

    def embeddings(self, layer: int, positions: torch.Tensor, device: torch.device):
        """The rotary module's position embeddings at ``positions`` [batch, tokens] in float32: (cos, sin) each
        [batch, tokens, rot], or Llama 4's complex ``freqs_cis`` [batch, tokens, hd / 2]."""
        if self.buffer:
            attn = self._attn[layer]()
            if attn is None:
                raise HeadlensError("the model this LatentCache's rotary key latents were built for no longer exists")
            return buffer_embeddings(attn, positions)
        rotary = self._rotary()
        if rotary is None:
            raise HeadlensError("the model this LatentCache's rotary key latents were built for no longer exists")
        x = torch.empty(0, device=device, dtype=torch.float32)
        args = (self.layer_types[layer],) if self.layer_types is not None else ()
        with torch.no_grad():
            out = rotary(x, positions.to(device, torch.long), *args)
        if self.complex:
            return out.to(torch.complex64)
        return out[0].float(), out[1].float()

    def rotate(self, keys: torch.Tensor, pe) -> torch.Tensor:
        """``keys`` [batch, heads, tokens, hd] (float32) rotated by ``pe`` (:meth:`embeddings`' form) with the family's
        function (:func:`turn`)."""
        return turn(self.fn, self.complex, keys, pe)

    def unrotate(self, keys: torch.Tensor, pe) -> torch.Tensor:
        """The inverse of :meth:`rotate` at ``pe`` (:func:`turn`)."""
        return turn(self.fn, self.complex, keys, pe, inverse=True)

    def positions(self, layer: int, handed, past: int, batch: int, tokens: int, device: torch.device):
        """(positions int32 [batch, tokens], the handed position embeddings in float32) of a layer's new tokens from
        what the hook handed it (position_embeddings, position_ids), ``past`` tokens before them: position_ids
        where given, else ``past + arange(tokens)`` (what the model uses without position_ids); checked against the
        handed cos/sin by recomputing them. HeadlensError, one line, where they disagree."""
        if handed is None or (handed[0] is None and not (self.buffer and handed[1] is not None)):
            raise HeadlensError(f"layer {layer}: the LatentCache stores rotary key latents but the attention module "
                                "handed it no position_embeddings (the cache was built with another model than the "
                                "one running, or the family passes them another way)")
        pe, ids = handed
        if ids is None:
            ids = torch.arange(past, past + tokens, device=device)[None]
        if ids.dim() != 2 or ids.shape[-1] != tokens:
            raise HeadlensError(f"layer {layer}: position_ids of shape {tuple(ids.shape)} do not give one position "
                                f"per token of {tokens} new tokens")
        ids = ids.expand(batch, tokens).to(device, torch.int32)
        mine = self.embeddings(layer, ids, device)
        if self.buffer:  # GPT-J: the module gathers from the very table read here, at these position_ids
            return ids, mine
        theirs = pe.to(device, torch.complex64) if self.complex else (pe[0].float(), pe[1].float())
        pairs = [(mine, theirs)] if self.complex else list(zip(mine, theirs))
        for a, b in pairs:
            b = b.expand_as(a)
            tol = (1e-5 if pe_dtype(pe) in (torch.float32, torch.float64) else 1e-2) * max(float(b.abs().max()), 1.0)
            if a.shape != b.shape or float((a - b).abs().max()) > tol:
                raise HeadlensError(f"layer {layer}: the model's rotary embedding module does not reproduce the "
                                    f"position embeddings this attention layer was handed ({self.family} rotates "
                                    "this layer another way): its keys cannot be stored as rotary latents")
        return ids, theirs


def turn(fn, complex_: bool, x: torch.Tensor, pe, inverse: bool = False) -> torch.Tensor:
    """``x`` [batch, heads, tokens, hd] turned by the position embeddings ``pe`` with the family's function ``fn`` (or
    back, ``inverse``): ``(cos, sin)`` through ``apply_rotary_pos_emb`` (inverse ``(cos, -sin) / (cos^2 + sin^2)``,
    exact under an attention scaling; only the leading ``rot`` dimensions where cos/sin cover fewer than hd, as the
    partial-rotary families split them), or Llama 4's complex ``freqs_cis`` through ``apply_rotary_emb``
    (``complex_``; inverse ``conj(f) / |f|^2``)."""
    if complex_:
        f = pe.conj() / (pe.abs() ** 2) if inverse else pe
        k = x.transpose(1, 2)  # apply_rotary_emb takes [batch, tokens, heads, hd]
        return fn(k, k, f)[1].to(x.dtype).transpose(1, 2)
    cos, sin = pe[0].to(x.dtype), pe[1].to(x.dtype)
    if inverse:
        s2 = cos * cos + sin * sin
        cos, sin = cos / s2, -sin / s2
    rot = cos.shape[-1]
    part = x[..., :rot]
    out = fn(part, part, cos, sin)[1].to(x.dtype)
    return torch.cat([out, x[..., rot:]], dim=-1) if rot < x.shape[-1] else out


def pe_dtype(pe) -> torch.dtype:
    return pe.dtype if isinstance(pe, torch.Tensor) else pe[0].dtype


def _hand_positions(module, args, kwargs):
    """Forward pre-hook: hand a LatentCache layer with rotary key latents this call's position embeddings and ids."""
    cache = next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)
    layers = getattr(cache, "layers", None)
    idx = layer_index(module)
    if layers is None or idx is None or idx >= len(layers):
        return None
    layer = layers[idx]
    rotary = getattr(layer, "rotary", None)
    if rotary is not None:
        if not rotary.owns(idx, module):
            raise HeadlensError(f"layer {idx}: this LatentCache's rotary key latents were built for another model "
                                "(build it with `model` the model that runs it)")
        layer.pending = (kwargs.get("position_embeddings"), kwargs.get("position_ids"))
    return None


def install(model) -> None:
    """Install the position hook on each attention module of ``model``, once (idempotent)."""
    for module in attention_modules(model).values():
        if getattr(module, _HOOK, None) is None:
            setattr(module, _HOOK, module.register_forward_pre_hook(_hand_positions, with_kwargs=True))
