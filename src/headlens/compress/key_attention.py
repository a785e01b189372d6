"""Switching a model over to key latents: ``"headlens_keys"`` through transformers' attention interface, or, for
families that compute attention themselves, their projections and the cache they update.

:func:`key_attention` sets the model's attention implementation to :data:`KEYS` for a ``with`` block (masks: those of
the implementation the model had; restored on leaving) and hands each call to the block's
:class:`~headlens.compress.qk_capture.KeyState`, then to the model's own implementation (eager or sdpa). A forward
pre-hook on every attention module keeps the ``position_embeddings`` it was handed; a hook on each layer's key
projection keeps its output (what the first call's check compares the keys with). BLOOM, GPT-Neo and Falcon do not
route attention through the interface: there the q/k projections' outputs are the pre-rotary queries and keys (no
q/k norm sits between, checked), and a pass whose keys are to be replaced runs with a
:func:`~headlens.compress.qk_capture.ProbeCache` (:meth:`KeyState.forward_kwargs`). GPT-J turns its keys inside
attention with sin/cos gathered from its own table at the ``position_ids`` it is handed: the pre-hook reads the same
table at the same ids (:func:`~headlens.compress.rotary_keys.buffer_embeddings`).
"""

from __future__ import annotations

import contextlib

from headlens.compress.qk_capture import KeyState
from headlens.errors import HeadlensError

KEYS = "headlens_keys"
FALLBACKS = ("eager", "sdpa")

_states: dict[int, KeyState] = {}  # id(config) -> the state of the model running inside key_attention


# ------------------------------------------------------------------------------------------ switching a model over


def _attention_forward(module, query, key, value, attention_mask, **kwargs):
    state = _states.get(id(module.config))
    run = _fallback(module, state)
    if state is None:
        return run(module, query, key, value, attention_mask, **kwargs)
    return state.call(module, query, key, value, attention_mask, kwargs, run)


def _fallback(module, state):
    from headlens.compress.absorbed import implementation

    return implementation(module, state.previous.get(id(module.config), "eager") if state is not None else "eager")


def _mask(*args, **kwargs):
    from transformers.masking_utils import eager_mask, sdpa_mask

    cfg = kwargs.get("config")
    state = _states.get(id(cfg))
    impl = state.previous.get(id(cfg), "eager") if state is not None else "eager"
    return (sdpa_mask if impl == "sdpa" else eager_mask)(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if AttentionInterface._global_mapping.get(KEYS) is not _attention_forward:
        AttentionInterface.register(KEYS, _attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(KEYS, _mask)


def supports_keys(model) -> bool:
    """Whether the family routes attention through transformers' attention interface (where headlens reads keys)."""
    test = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(test()) if test is not None else True


@contextlib.contextmanager
def key_attention(model, ck, layers: list[int]):
    """Run ``model``'s attention through :data:`KEYS` inside the block; yields the :class:`KeyState` (mode ``off``
    until set). The model's implementation, hooks and configs are restored on leaving, also on error."""
    from headlens.compress.absorbed import _configs
    from headlens.compress.projections import head_projection
    from headlens.compress.rotary_keys import _buffer_rotary, buffer_embeddings

    via_cache = not supports_keys(model)
    configs = _configs(model)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    others = sorted({str(cfg._attn_implementation) for cfg, _ in saved if cfg._attn_implementation is not None}
                    - set(FALLBACKS))
    if others and not via_cache:
        raise HeadlensError(f"`model` runs {others[0]} attention; key latents stand in for "
                            f"{' or '.join(FALLBACKS)} (load the model with attn_implementation='sdpa')")
    state = KeyState(model, ck, layers)
    state.previous = {id(cfg): cfg._attn_implementation or "eager" for cfg, _ in saved}  # type: ignore[attr-defined]
    state.via_cache = via_cache
    handles = []
    try:
        if via_cache:
            from headlens.compress.cache_route import RouteMeasure

            _check_cache_route(model, ck, layers, state)
            route = RouteMeasure(state)
            for layer in layers:
                handles += route.install(layer, state.by_layer[layer])
        for mod in model.modules():
            if isinstance(_layer_index(mod), int) and "Attention" in type(mod).__name__:
                def keep(m, args, kwargs):
                    pe = kwargs.get("position_embeddings")
                    if pe is None and len(args) > 1 and isinstance(args[1], tuple):
                        pe = args[1]
                    if pe is None and kwargs.get("position_ids") is not None and _buffer_rotary(m):  # GPT-J
                        pe = buffer_embeddings(m, kwargs["position_ids"])
                    if pe is not None:
                        state.pe[id(m)] = pe
                    else:
                        state.pe.pop(id(m), None)
                handles.append(mod.register_forward_pre_hook(keep, with_kwargs=True))
        for layer in layers:
            proj = head_projection(model, ck, layer, "k")
            state.key_bias[layer] = proj.biases()
            if via_cache:
                qproj = head_projection(model, ck, layer, "q")

                def keep_q(_m, _args, output, layer=layer, qproj=qproj):
                    state.q_out[layer] = qproj.select(output)
                handles.append(qproj.module.register_forward_hook(keep_q))

            def keep_k(_m, _args, output, layer=layer, proj=proj):
                state.k_out[layer] = proj.select(output)
                if via_cache and layer in state.q_out:
                    state.projected(state.by_layer[layer], layer, state.q_out.pop(layer), state.k_out[layer])
            handles.append(proj.module.register_forward_hook(keep_k))
        if not via_cache:
            _register()
            for cfg, _ in saved:
                _states[id(cfg)] = state
            model.set_attn_implementation(KEYS)
        yield state
    finally:
        for h in handles:
            h.remove()
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
            _states.pop(id(cfg), None)


def _layer_index(module) -> int | None:
    """An attention module's layer index (``layer_idx``; GPT-Neo calls it ``layer_id``)."""
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) else getattr(module, "layer_id", None)


def _check_cache_route(model, ck, layers: list[int], state: "KeyState") -> None:
    """The cache route reads queries from the q projection's output: refuse a family with q/k norms there."""
    from headlens.compress.keys import attention_module

    for layer in layers:
        attn = attention_module(model, layer)
        state.by_layer[layer] = attn
        if any(getattr(attn, n, None) is not None for n in ("q_norm", "k_norm", "qk_norm", "q_layernorm")):
            raise HeadlensError(f"key latents: {ck.spec.family} normalises queries or keys inside attention, which it "
                                "computes itself: headlens cannot read its queries; compress its values only (`keys` "
                                "none)")
