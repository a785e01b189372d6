"""Absorbed attention: attention that reads a :class:`~headlens.compress.cache.LatentCache` layer's latents as they
are, never the values rebuilt from them.

Per query head h of kv group g, with ``C_g`` the group's cached latents (tokens x k_g) and the cached values
``V_g = C_g U_g^T + 1 b_g^T``::

    softmax(q K^T + mask) V_g  =  (softmax(q K^T + mask) C_g) U_g^T  +  rowsum(softmax(...)) b_g^T

so a decoding step reads k_g numbers per cached token and kv group instead of head_dim (what MLA does with its
``W_UV``). The row sum is 1 for a softmax (the bias is added as it is); after dropout in training it is each row's
kept mass.

Which calls absorb: those with at most head_dim / 2 score rows per kv group (queries x query heads per group:
decoding steps, short multi-token steps). A call with more (a prefill) rebuilds the values once for that call and runs
the model's own attention: rebuilding ``S k hd`` numbers then costs less than the attention product itself, and the
model's fused kernel beats an unfused product over a large score matrix (on tiny-lm's 2,048-token prefill the
unfused one took 2.3x as long).

transformers routes attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``: each attention
module calls ``past_key_values.update(k, v, layer_idx)`` and passes what it returns straight to that function.
:func:`absorbed_attention` sets the model's implementation to :data:`ABSORBED` (``"headlens_latent"``) for a
``with`` block and restores the model's own afterwards. Inside it, the layers of a LatentCache built for that model
(``absorbed="auto"`` or ``True``) return from ``update`` their latents wrapped as :class:`LatentValues`, which carries
the cache layer (its factors); :func:`absorbed_attention_forward` recognises them and computes the right-hand side above. Values that are
not latents (layers left uncompressed, a DynamicCache) go to the implementation the model had (eager or sdpa), and
transformers builds the masks of that implementation (:func:`absorbed_mask`), so those layers run as outside the block.

A :class:`LatentValues` refuses every torch operation but reading its shape, dtype and device: latents that reach
any other function (a family that computes attention itself, a model that runs another attention implementation)
raise :class:`~headlens.errors.HeadlensError` instead of being read as values.

Families that compute attention themselves (Falcon, GPT-J, GPT-Neo, BLOOM in transformers 5.x) are refused by
:func:`absorbed_attention`; their LatentCache rebuilds the values.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import torch

from headlens.errors import HeadlensError

ABSORBED = "headlens_latent"
# The implementations a model may run outside the block; absorbed_attention hands non-latent values back to them.
FALLBACKS = ("eager", "sdpa")

# Process-wide, so that a generate running in another thread (a streamer's) absorbs too: which configs are inside an
# absorbed_attention block (id -> how many blocks), and the implementation each had before.
_lock = threading.Lock()
_inside: dict[int, int] = {}
_previous: dict[int, str] = {}


def absorbing(config=None) -> bool:
    """Whether the model whose config is ``config`` runs inside an :func:`absorbed_attention` block (``None``: any
    model): a LatentCache layer with ``absorbed="auto"`` then hands its latents to attention."""
    return bool(_inside) if config is None else id(config) in _inside


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
    model had before :func:`absorbed_attention`, with the same arguments.

    ``query`` ``[batch, heads, q_len, head_dim]``, ``key`` ``[batch, kv heads, kv_len, head_dim]`` (kv heads may come
    repeated, Falcon-style), ``attention_mask`` ``[batch, 1, q_len, kv_len]`` additive (eager's) or boolean (sdpa's,
    True = attend), or None (no mask; under sdpa's masks, causal where there is more than one query, as sdpa reads
    it). Keyword arguments read: ``scaling`` (None: ``head_dim ** -0.5``), ``dropout`` (applied in training only, as
    eager does), ``softcap`` (Gemma 2's logit soft-capping), ``is_causal``; ``sliding_window`` needs nothing here (the
    mask and the cache layer's window carry it); attention sinks (``s_aux``, gpt-oss) are refused."""
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
    K = key if key.shape[1] == G else key[:, :: key.shape[1] // G]  # (B, G, S, hd): one copy of each kv head
    scale = hd ** -0.5 if scaling is None else scaling
    q = query.reshape(B, G, n * L, hd)  # query head h = g n + j serves kv group g (repeat_kv's order)
    scores = torch.matmul(q, K.transpose(2, 3)) * scale  # (B, G, n L, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is None and L > 1 and causal and _own(module.config) == "sdpa":
        # sdpa's masks leave the causal pattern to the kernel where queries and keys line up: rebuild it
        rows = torch.arange(L, device=query.device)[:, None] + (S - L)
        attention_mask = (torch.arange(S, device=query.device)[None, :] <= rows)[None, None]  # (1, 1, L, S)
    if attention_mask is not None:
        mask = attention_mask[..., :S].unsqueeze(2)  # (B, 1, 1, L, S)
        scores = scores.view(B, G, n, L, S)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores.view(B, G, n * L, S), dim=-1, dtype=torch.float32).to(query.dtype)
    dropped = bool(dropout) and module.training
    if dropped:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = _apply_latents(value.layer, probs, C, dropped)  # (B, G, n L, hd)
    out = out.view(B, G, n, L, hd).permute(0, 3, 1, 2, 4).reshape(B, L, H, hd)  # head g n + j at [:, l, g n + j]
    return out, probs.view(B, H, L, S)


def _apply_latents(layer, probs: torch.Tensor, C: torch.Tensor, dropped: bool) -> torch.Tensor:
    """``probs_g C_g U_g^T + rowsum(probs_g) b_g^T`` per group: ``probs`` (B, G, M, S), ``C`` (B, S, sum_g k_g) ->
    (B, G, M, hd) in ``probs``' dtype. The rows of a softmax sum to 1; after dropout (``dropped``) each row's kept
    mass scales the bias. The products with ``U_g`` run in float32 (the factors' precision)."""
    _, up, bias, _, Ut = layer._factors(C.device)
    B, G, M, S = probs.shape
    if Ut is not None:  # every group the same k: C viewed as (B, G, S, k) without a copy
        mixed = torch.matmul(probs, C.view(B, S, G, -1).transpose(1, 2))  # (B, G, M, k): k numbers a token
        out = torch.matmul(mixed.to(torch.float32), Ut)  # (B, G, M, hd)
    else:
        parts = torch.split(C, layer.latents.ks, dim=-1)
        out = torch.stack([torch.matmul(torch.matmul(probs[:, g], parts[g]).to(torch.float32), up[g].T)
                           for g in range(G)], dim=1)
    if bias is not None:
        rows = probs.sum(-1, dtype=torch.float32).unsqueeze(-1) if dropped else 1.0  # (B, G, M, 1)
        out = out + rows * bias[:, None, :]
    return out.to(probs.dtype)


def _own(config) -> str:
    """The implementation ``config`` had before :func:`absorbed_attention` (eager where it is not known)."""
    return _previous.get(id(config), "eager")


def _fallback(module):
    """The attention function the model ran before :func:`absorbed_attention`: sdpa, or the family's own eager."""
    return implementation(module, _own(module.config))


def implementation(module, impl: str):
    """The attention function ``impl`` ("sdpa", or eager: the family's own) for the attention ``module``."""
    if impl == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise HeadlensError(f"{type(module).__name__} has no eager attention function to fall back on")
    return eager


# ------------------------------------------------------------------------------------------ switching a model over


def absorbed_mask(*args, **kwargs):
    """transformers mask function for :data:`ABSORBED`: the masks of the implementation the model had (``config``
    is passed by transformers), so that its own attention, which runs a prefill and every layer without latents,
    gets exactly the masks it would get outside the block: eager's additive masks, or sdpa's boolean masks (None
    where the kernel's causal flag does the job)."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    return (sdpa_mask if _own(kwargs.get("config")) == "sdpa" else eager_mask)(*args, **kwargs)


def _register() -> None:
    """Register :data:`ABSORBED` with transformers (attention function and mask function), once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if AttentionInterface._global_mapping.get(ABSORBED) is not absorbed_attention_forward:
        AttentionInterface.register(ABSORBED, absorbed_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ABSORBED, absorbed_mask)


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
    test: the modeling file's attention classes call ``ALL_ATTENTION_FUNCTIONS.get_interface``; a transformers
    without that test is trusted, and latents that reach another function still raise)."""
    test = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(test()) if test is not None else True


@contextlib.contextmanager
def absorbed_attention(model):
    """Run ``model``'s attention through :data:`ABSORBED` inside the block, so that a LatentCache built for it
    (``absorbed="auto"``, the default, or ``True``) is read as latents instead of rebuilt values; the model's own
    attention implementation (every config's) is restored on leaving. Nested blocks for one model change nothing
    more; a generate running in another thread started inside the block absorbs too.

    HeadlensError for a family that computes attention itself (its LatentCache rebuilds values: use it outside the
    block) and for a model running neither eager nor sdpa attention."""
    configs = _configs(model)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    switch = model.config._attn_implementation != ABSORBED
    if switch:
        if not supports_absorbed(model):
            raise HeadlensError(f"`model` {type(model).__name__} computes attention itself, not through "
                                "transformers' attention interface: absorbed attention cannot read its cache; its "
                                "LatentCache rebuilds the values (use it without absorbed_attention, or with "
                                "`absorbed`=False)")
        others = sorted({str(cfg._attn_implementation) for cfg, _ in saved
                         if cfg._attn_implementation is not None} - set(FALLBACKS))
        if others:
            raise HeadlensError(f"`model` runs {others[0]} attention; absorbed attention stands in for "
                                f"{' or '.join(FALLBACKS)} (load the model with attn_implementation='sdpa')")
        _register()
    with _lock:
        for cfg, impl in saved:
            if switch:
                _previous[id(cfg)] = cfg._attn_implementation or "eager"
            _inside[id(cfg)] = _inside.get(id(cfg), 0) + 1
    try:
        if switch:
            model.set_attn_implementation(ABSORBED)
        yield model
    finally:
        with _lock:
            for cfg, impl in saved:
                _inside[id(cfg)] -= 1
                if not _inside[id(cfg)]:
                    del _inside[id(cfg)]
                if switch:
                    cfg._attn_implementation_internal = impl
                    _previous.pop(id(cfg), None)
