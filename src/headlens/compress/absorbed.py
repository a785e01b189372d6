"""Absorbed attention: attention that reads a :class:`~headlens.compress.cache.LatentCache` layer's latents as they
are, never the values rebuilt from them.

Per query head h of kv group g, with ``C_g`` the group's cached latents (tokens x k_g) and the cached values
``V_g = C_g U_g^T + 1 b_g^T``::

    softmax(q K^T + mask) V_g  =  (softmax(q K^T + mask) C_g) U_g^T  +  rowsum(softmax(...)) b_g^T

so a decoding step reads k_g numbers per cached token and kv group instead of head_dim (what MLA does with its
``W_UV``). The row sum is 1 for a softmax; it is kept as computed so that dropout in training stays exact.

Which calls absorb: those with at most head_dim / 2 score rows per kv group (queries x query heads per group:
decoding steps, short multi-token steps). A call with more (a prefill) rebuilds the values once for that call and runs
the model's own attention: rebuilding ``S k hd`` numbers then costs less than the attention product itself, and the
model's fused kernel beats an unfused product over a large score matrix (on tiny-lm's 2,048-token prefill the
unfused one took 2.3x as long).

transformers routes attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``: each attention
module calls ``past_key_values.update(k, v, layer_idx)`` and passes what it returns straight to that function.
:func:`absorbed_attention` sets the model's implementation to :data:`ABSORBED` (``"headlens_latent"``) for a
``with`` block and restores the model's own afterwards. Inside it, a LatentCache layer (``absorbed="auto"`` or
``True``) returns from ``update`` its latents wrapped as :class:`LatentValues`, which carries the cache layer (its
factors); :func:`absorbed_attention_forward` recognises them and computes the right-hand side above. Values that are
not latents (layers left uncompressed, a DynamicCache) go to the implementation the model had (eager or sdpa).

A :class:`LatentValues` refuses every torch operation but reading its shape, dtype and device: latents that reach
any other function (a family that computes attention itself, a model that runs another attention implementation)
raise :class:`~headlens.errors.HeadlensError` instead of being read as values.

Families that compute attention themselves (Falcon, GPT-J, BLOOM in transformers 5.x) are refused by
:func:`absorbed_attention`; their LatentCache rebuilds the values.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

import torch

from headlens.errors import HeadlensError

ABSORBED = "headlens_latent"
# The implementations a model may run outside the block; absorbed_attention hands non-latent values back to them.
FALLBACKS = ("eager", "sdpa")

_depth: contextvars.ContextVar[int] = contextvars.ContextVar("headlens_absorbed_depth", default=0)
_previous: dict[int, str] = {}  # id(config) -> the implementation it had before absorbed_attention


def absorbing() -> bool:
    """True inside an :func:`absorbed_attention` block (of any model): LatentCache layers with ``absorbed="auto"``
    then hand their latents to attention."""
    return _depth.get() > 0


class LatentValues(torch.Tensor):
    """What a LatentCache layer's ``update`` returns in place of values under absorbed attention: its latents
    ``[batch, 1, tokens, sum_g k_g]`` (``.latents``, a plain tensor) and the cache layer they belong to (``.layer``,
    whose ``latents`` are the factors). Reading ``shape``/``dtype``/``device`` works; any other torch operation raises
    HeadlensError, so the latents can never be mistaken for values."""

    latents: torch.Tensor
    layer: object

    @staticmethod
    def wrap(latents: torch.Tensor, layer) -> "LatentValues":
        out = latents.as_subclass(LatentValues)
        out.latents, out.layer = latents, layer
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        raise HeadlensError(f"a LatentCache layer handed its value latents to attention, but {name} received them: "
                            f"only the {ABSORBED!r} attention function reads latents (the model's attention "
                            "implementation was changed inside absorbed_attention, or the family computes attention "
                            "itself): build the cache with `absorbed`=False there")


_METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,  # type: ignore[attr-defined]
             torch.Tensor.ndim.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.__repr__}  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ the attention function


def absorbed_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, **kwargs):
    """transformers attention function: ``(attn_output [batch, q_len, heads, head_dim], attn_weights
    [batch, heads, q_len, kv_len])``, as the families' ``eager_attention_forward``.

    ``value`` a :class:`LatentValues`: attention on the latents, each group's ``U_g`` applied after (module
    docstring), where a kv group has at most ``head_dim / 2`` score rows (queries x its query heads); with more (a
    prefill), the values rebuilt once and the model's own implementation. Any other value: the implementation the
    model had before :func:`absorbed_attention`, with the same arguments. ``query`` ``[batch, heads, q_len, head_dim]``, ``key`` ``[batch, kv heads, kv_len, head_dim]`` (kv heads
    may come repeated, Falcon-style), ``attention_mask`` additive ``[batch, 1, q_len, kv_len]`` (the eager masks this
    implementation asks transformers for; a boolean mask is read as keep/drop) or None. Keyword arguments read:
    ``scaling`` (None: ``head_dim ** -0.5``), ``dropout`` (applied in training only, as eager does), ``softcap``
    (Gemma 2's logit soft-capping); ``sliding_window`` needs nothing here (the mask and the cache layer's window
    carry it); attention sinks (``s_aux``, gpt-oss) are refused."""
    if not isinstance(value, LatentValues):
        return _fallback(module)(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise HeadlensError("absorbed attention does not implement attention sinks (`s_aux`): build the LatentCache "
                            "with `absorbed`=False for this family")
    scaling, dropout, softcap = kwargs.get("scaling"), kwargs.get("dropout", 0.0), kwargs.get("softcap")
    lat = value.layer.latents  # LayerLatents: the factors
    C = value.latents[:, 0]  # (B, S, K) every group's latents side by side
    B, H, L, hd = query.shape
    G, S = len(lat.encode), C.shape[1]
    if H % G or key.shape[1] % G or key.shape[2] != S:
        raise HeadlensError(f"layer {lat.layer}: {H} query heads and keys {tuple(key.shape)} do not fit latents of "
                            f"{G} kv groups over {S} tokens")
    n = H // G
    if 2 * n * L > hd:  # a prefill: rebuild the values once for this call, run the model's own (fused) attention
        values = value.layer.decode(value.latents, value.latents.dtype)
        return _fallback(module)(module, query, key, values, attention_mask, **kwargs)
    K = key[:, :: key.shape[1] // G]  # (B, G, S, hd): one copy of each kv head
    scale = hd ** -0.5 if scaling is None else scaling
    q = query.reshape(B, G, n * L, hd)  # query head h = g n + j serves kv group g (repeat_kv's order)
    scores = torch.matmul(q, K.transpose(2, 3)) * scale  # (B, G, n L, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, G, n, L, S)
    if attention_mask is not None:
        mask = attention_mask[..., :S].unsqueeze(2)  # (B, 1, 1, L, S)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = _apply_latents(value.layer, probs.view(B, G, n * L, S), C)  # (B, G, n L, hd)
    return out.view(B, H, L, hd).transpose(1, 2).contiguous(), probs.view(B, H, L, S)  # (B, L, H, hd)


def _apply_latents(layer, probs: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``probs_g C_g U_g^T + rowsum(probs_g) b_g^T`` per group: ``probs`` (B, G, M, S), ``C`` (B, S, sum_g k_g) ->
    (B, G, M, hd) in ``probs``' dtype. The products with ``U_g`` run in float32 (the factors' precision)."""
    _, up, bias, _, U = layer._factors(C.device)
    B, G, M, S = probs.shape
    if U is not None:  # every group the same k: C viewed as (B, G, S, k) without a copy
        k = U.shape[-1]
        Cg = C.view(B, S, G, k).transpose(1, 2)
        mixed = torch.matmul(probs, Cg).to(torch.float32)  # (B, G, M, k): what the step reads per token is k
        out = torch.matmul(mixed, U.transpose(1, 2))  # (B, G, M, hd)
    else:
        parts = torch.split(C, layer.latents.ks, dim=-1)
        out = torch.stack([torch.matmul(torch.matmul(probs[:, g], parts[g]).to(torch.float32), up[g].T)
                           for g in range(G)], dim=1)
    if bias is not None:
        out = out + probs.sum(-1, dtype=torch.float32).unsqueeze(-1) * bias[None, :, None, :]
    return out.to(probs.dtype)


def _fallback(module):
    """The attention function the model ran before :func:`absorbed_attention`: sdpa, or the family's own eager."""
    previous = _previous.get(id(module.config), "eager")
    if previous == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise HeadlensError(f"{type(module).__name__} has no eager attention function to fall back on")
    return eager


# ------------------------------------------------------------------------------------------ switching a model over


def _register() -> None:
    """Register :data:`ABSORBED` with transformers (attention function and eager-style masks), once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if AttentionInterface._global_mapping.get(ABSORBED) is not absorbed_attention_forward:
        AttentionInterface.register(ABSORBED, absorbed_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ABSORBED, eager_mask)


def _configs(model) -> list:
    """Every distinct config object of ``model`` (top, sub-configs, submodels'), in a stable order."""
    from transformers import PreTrainedModel

    seen, out, todo = set(), [], [model.config]
    todo += [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while todo:
        cfg = todo.pop(0)
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        todo += [getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {})]
    return out


def supports_absorbed(model) -> bool:
    """Whether ``model``'s family routes attention through transformers' attention interface (transformers' own
    test: the modeling file's attention classes call ``ALL_ATTENTION_FUNCTIONS.get_interface``)."""
    return bool(type(model)._can_set_attn_implementation())


@contextlib.contextmanager
def absorbed_attention(model):
    """Run ``model``'s attention through :data:`ABSORBED` inside the block, so that a LatentCache
    (``absorbed="auto"``, the default, or ``True``) is read as latents instead of rebuilt values; the model's own
    attention implementation (every config's) is restored on leaving. Re-entering for a model already inside
    changes nothing.

    HeadlensError for a family that computes attention itself (its LatentCache rebuilds values: use it outside the
    block) and for a model running neither eager nor sdpa attention."""
    configs = _configs(model)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    if model.config._attn_implementation == ABSORBED:
        token = _depth.set(_depth.get() + 1)
        try:
            yield model
        finally:
            _depth.reset(token)
        return
    if not supports_absorbed(model):
        raise HeadlensError(f"`model` {type(model).__name__} computes attention itself, not through transformers' "
                            "attention interface: absorbed attention cannot read its cache; its LatentCache rebuilds "
                            "the values (use it without absorbed_attention, or with `absorbed`=False)")
    others = sorted({str(cfg._attn_implementation) for cfg, _ in saved if cfg._attn_implementation is not None}
                    - set(FALLBACKS))
    if others:
        raise HeadlensError(f"`model` runs {others[0]} attention; absorbed attention stands in for "
                            f"{' or '.join(FALLBACKS)} (load the model with attn_implementation='sdpa')")
    _register()
    for cfg, impl in saved:
        _previous[id(cfg)] = impl or "eager"
    token = _depth.set(_depth.get() + 1)
    try:
        model.set_attn_implementation(ABSORBED)
        yield model
    finally:
        _depth.reset(token)
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
            _previous.pop(id(cfg), None)
