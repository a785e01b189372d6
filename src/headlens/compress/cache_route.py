"""The attention errors of key latents on families that compute attention themselves (BLOOM, GPT-Neo, Falcon, GPT-J).

There headlens sees neither the attention pattern nor the attention output through transformers' attention
interface, so it asks the family: after the original pass's call of a layer's attention module (a forward hook), the
module is called again on the very same arguments, once as it was and once per configuration with the layer's new
keys (and/or values) replaced in a fresh cache (:class:`SwapCache`, the only thing that differs), with
``output_attentions=True``. The family's own softmax (its scaling, ALiBi, masks) gives the attention patterns whose
KL is measured; a forward pre-hook on the module's output projection reads the attention output before it (every
head's ``softmax(q k^T) v``, [batch, tokens, heads * hd]), the same quantity the interface route measures. In a
compressed (``acc``) pass the same pre-hook gives the accumulated error. A layer whose module returns no
[batch, heads, tokens, tokens] pattern, or whose output projection is not called as a module (BLOOM with
``pretraining_tp`` > 1), gets no KL or output errors (None), never an estimate.
"""

from __future__ import annotations

import torch

from headlens.compress.rotary_keys import CACHE_KWARGS

OUT_PROJECTIONS = ("dense", "out_proj", "c_proj", "o_proj")


def _swap_cache_class():
    from transformers import DynamicCache

    class SwapCache(DynamicCache):
        """A fresh DynamicCache for one re-call of one layer: its new keys and values replaced by ``swap``."""

        def __init__(self, config, swap):
            super().__init__(config=config)
            self.swap = swap

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = self.swap(key_states, value_states)
            return super().update(k, v, layer_idx, *args, **kwargs)

    return SwapCache


_SWAP = None


def SwapCache(config, swap):  # noqa: N802 (a class, built on first use: transformers loads lazily)
    global _SWAP
    if _SWAP is None:
        _SWAP = _swap_cache_class()
    return _SWAP(config, swap)


class RouteMeasure:
    """The attention errors of the cache route for a :class:`~headlens.compress.qk_capture.KeyState` (module
    docstring); :meth:`install` hooks one layer."""

    def __init__(self, state):
        self.state = state
        self.ctx: torch.Tensor | None = None  # the output projection's input of the latest call
        self.busy = False

    def install(self, layer: int, attn) -> list:
        out = next((getattr(attn, n) for n in OUT_PROJECTIONS if isinstance(getattr(attn, n, None), torch.nn.Module)),
                   None)
        if out is None:
            return []

        def keep(_m, args):
            if args and isinstance(args[0], torch.Tensor):
                self.ctx = args[0].detach().to(torch.float64)

        def done(module, args, kwargs, output, layer=layer):
            self.done(layer, module, args, kwargs, output)
        return [out.register_forward_pre_hook(keep), attn.register_forward_hook(done, with_kwargs=True)]

    def done(self, layer: int, module, args, kwargs, output) -> None:
        st = self.state
        if self.busy:  # a re-call's own hook: its output is read by recall
            return
        ctx, self.ctx = self.ctx, None
        if layer not in st.layers or ctx is None:
            return
        if st.mode == "orig" and ("route", layer) not in st.seen:
            st.seen.add(("route", layer))
            st.orig_out[layer] = ctx
            per = [(c, conf[layer]) for c, conf in enumerate(st.configs) if layer in conf]
            if not per:
                return
            ref = self.recall(layer, module, args, kwargs, None, None)
            for c, (plan, vfac) in per:
                self.isolated(st._sums(c, layer), layer, module, args, kwargs, ref, plan, vfac)
        elif st.mode == "acc" and ("route", layer) not in st.seen:
            st.seen.add(("route", layer))
            o = st.orig_out.get(layer)
            if layer in st.configs[st.current] and o is not None and o.shape == ctx.shape:
                from headlens.compress.qk_capture import _add

                _add(st._sums(st.current, layer).out, "acc", float(((ctx - o) ** 2).sum()), float((o ** 2).sum()))

    def isolated(self, sums, layer: int, module, args, kwargs, ref, plan, vfac) -> None:
        from headlens.compress.qk_capture import _add

        o, p = ref
        if o is None:
            return
        total = float((o ** 2).sum())
        for name, kp, vf in (("keys", plan, None), ("values", None, vfac), ("both", plan, vfac)):
            if (kp is None and name != "values") or (vf is None and name != "keys"):
                continue
            o2, p2 = self.recall(layer, module, args, kwargs, kp, vf)
            if o2 is not None and o2.shape == o.shape:
                _add(sums.out, name, float(((o2 - o) ** 2).sum()), total)
            if name == "keys" and p is not None and p2 is not None and p2.shape == p.shape:
                lp = torch.where(p > 0, p, 1.0).log()
                lp2 = p2.clamp_min(torch.finfo(torch.float64).tiny).log()
                sums.kl += float(torch.where(p > 0, p * (lp - lp2), 0.0).sum())
                sums.rows += int(p.shape[0] * p.shape[1] * p.shape[2])

    def recall(self, layer: int, module, args, kwargs, plan, vfac):
        """(attention output before the output projection, attention pattern [B, H, T, S]) of ``module`` called again
        on ``args``/``kwargs`` with its cache replaced by a fresh :class:`SwapCache` (keys through ``plan``'s latents,
        values through ``vfac``'s, where given); (None, None) where the call takes no cache argument."""
        from headlens.compress.qk_capture import _values

        st = self.state
        name = next((n for n in CACHE_KWARGS if n in kwargs), None)
        if name is None:
            return None, None
        info = st.info.get(layer)

        def swap(k, v):
            if plan is not None and info is not None:
                k = st.compress(module, info, k, plan).to(k.dtype)
            if vfac is not None:
                v = _values(vfac, v)
            return k, v

        kw = {**kwargs, name: SwapCache(st.model.config, swap), "output_attentions": True}
        self.busy, self.ctx = True, None
        try:
            with torch.no_grad(), st.quiet():  # module.forward: the module's own hooks stay out of it
                out = module.forward(*args, **kw)
        finally:
            self.busy = False
        ctx, self.ctx = self.ctx, None
        probs = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        ok = isinstance(probs, torch.Tensor) and probs.dim() == 4
        return ctx, probs.detach().to(torch.float64) if ok else None
