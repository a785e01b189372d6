"""Where key latents meet the running model: the queries and keys attention receives, un-rotated; keys compressed
inside a forward pass; the logit and attention errors a key latent causes.

transformers routes attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with the queries
and keys as attention uses them (after ``q_norm``/``k_norm`` and rotary);
:func:`~headlens.compress.key_attention.key_attention` hands each call to a :class:`KeyState` (this module), then to
the model's own implementation. With the ``position_embeddings`` (cos, sin) the attention module was handed, a call
can un-rotate with the family's own ``apply_rotary_pos_emb`` (inverse: ``(cos, -sin) / (cos^2 + sin^2)``, exact also
under an attention scaling). The first call of each layer checks what it assumes (:meth:`KeyState.check_layer`):
the keys attention receives, un-rotated, are the family's key projection (through ``k_norm`` where there is one);
a layer where they are the projection without un-rotating is a NoPE layer; anything else is refused in one line.

Passes are unbatched and uncached (batch 1, keys = this pass's tokens), as the compress passes are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field

import torch

from headlens.compress.keys import KeyLayerPlan, KeyMoments, pairs_of, rotation_average
from headlens.compress.rotary_keys import family_rotate
from headlens.compress.rotary_keys import turn as turn_with
from headlens.errors import HeadlensError

CHECK_TOL = 1e-3  # relative: un-rotated keys against the key projection (float32 models; bfloat16 gets 2e-2)


@dataclass
class LayerInfo:
    """What the first call of a layer found: whether its keys are rotated, the family's rotary function and pairs."""

    rotary: bool
    apply: object = None
    pairs: list = field(default_factory=list)
    complex: bool = False  # Llama 4: apply_rotary_emb(xq, xk, freqs_cis) on [B, T, heads, hd], complex frequencies


@dataclass
class LayerSums:
    """Per layer and configuration, the isolated key errors summed over the eval texts."""

    logit_lost: float = 0.0
    logit_total: float = 0.0
    kl: float = 0.0
    rows: int = 0
    out: dict = field(default_factory=dict)  # "keys"/"values"/"both"/"acc" -> [lost, total]
    frequency: "LayerSums | None" = None  # the per-frequency cross-head latent's logit sums (rotary, G > 1)

    def __post_init__(self):
        if self.frequency is None and type(self) is LayerSums:
            self.frequency = _FrequencySums()


class _FrequencySums(LayerSums):
    """The frequency latent's own logit sums (no nested frequency sums)."""


def _add(d: dict, key: str, lost: float, total: float) -> None:
    a = d.setdefault(key, [0.0, 0.0])
    a[0] += lost
    a[1] += total


class KeyState:
    """What :data:`KEYS` does with each attention call. ``mode``: ``capture`` (sum the moments of ``layers``),
    ``orig`` (the unmodified pass: the isolated errors of every configuration in ``configs``), ``acc`` (configuration
    ``current`` compressed: its keys replaced, the attention output's accumulated error), or ``off``."""

    def __init__(self, model, ck, layers: list[int]):
        self.model, self.ck = model, ck
        self.layers = set(layers)
        self.info: dict[int, LayerInfo] = {}
        self.mode = "off"
        self.moments: dict[int, list] = {}  # layer -> [Cq (G,hd,hd), Ck (G,hd,hd), tokens]
        self.bias: dict[int, list | None] = {}  # per layer, once its rotary is known: the bias subtracted, or None
        self.key_bias: dict[int, list | None] = {}  # per layer the key projection's bias per kv group (or None)
        self.configs: list[dict] = []  # per configuration {layer: (KeyLayerPlan | None, value factors | None)}
        self.sums: list[dict[int, LayerSums]] = []
        self.current = 0
        self.orig_out: dict[int, torch.Tensor] = {}  # layer -> this text's original attention output
        self.seen: set = set()
        self.pe: dict[int, tuple] = {}  # id(attention module) -> position_embeddings of its current call
        self.k_out: dict[int, torch.Tensor] = {}  # layer -> the key projection's output of the current call
        self.q_out: dict[int, torch.Tensor] = {}  # the cache route: the query projection's output of the current call
        self.by_layer: dict[int, object] = {}  # the cache route: layer -> attention module
        self.via_cache = False
        self.quiet = contextlib.nullcontext  # what a re-call of an attention module runs inside (the Recorder's)

    # -------------------------------------------------------------------------------------------- a pass

    def start(self, mode: str, current: int = 0) -> None:
        self.mode, self.current = mode, current
        self.seen = set()

    def call(self, module, query, key, value, attention_mask, kwargs, run):
        layer = getattr(module, "layer_idx", None)
        if self.mode == "off" or layer not in self.layers or (self.mode != "capture" and (self.mode, layer) in self.seen):
            return run(module, query, key, value, attention_mask, **kwargs)
        self.seen.add((self.mode, layer))  # later calls of a layer in a measured pass are re-runs (the value recorder's)
        info = self.check_layer(module, layer, key)
        if self.mode == "probe":
            return run(module, query, key, value, attention_mask, **kwargs)
        if self.mode == "capture":
            self._capture(module, layer, info, query, key)
            return run(module, query, key, value, attention_mask, **kwargs)
        if self.mode == "orig":
            out = run(module, query, key, value, attention_mask, **kwargs)
            self.orig_out[layer] = out[0].detach().to(torch.float64)
            for c, per in enumerate(self.configs):
                if layer in per:
                    self._isolated(c, module, layer, info, query, key, value, attention_mask, kwargs, run, out[0])
            return out
        # acc: the configuration's keys replaced; its values are already the compressed model's
        plan, _ = self.configs[self.current].get(layer, (None, None))
        if plan is not None:
            key = self.compress(module, info, key, plan).to(key.dtype)
        out = run(module, query, key, value, attention_mask, **kwargs)
        if layer in self.configs[self.current] and layer in self.orig_out:
            o, o2 = self.orig_out[layer], out[0].detach().to(torch.float64)
            _add(self._sums(self.current, layer).out, "acc", float(((o2 - o) ** 2).sum()), float((o ** 2).sum()))
        return out

    def _sums(self, c: int, layer: int) -> LayerSums:
        while len(self.sums) <= c:
            self.sums.append({})
        return self.sums[c].setdefault(layer, LayerSums())

    # -------------------------------------------------------------------------------------------- rotary

    def rotate(self, module, info: LayerInfo, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``x`` [B, heads, T, hd] turned by the positions of the module's current call (or back, ``inverse``)."""
        return turn(info, x, self.pe[id(module)], inverse) if info.rotary else x

    def check_layer(self, module, layer: int, key: torch.Tensor) -> LayerInfo:
        """The first call of ``layer``: is the family's rotary what attention received? (module docstring)"""
        if layer in self.info:
            return self.info[layer]
        k_lin = self.k_out.get(layer)
        if k_lin is None:
            raise HeadlensError(f"layer {layer}: the key projection was not called before attention: headlens cannot "
                                "check the keys attention receives")
        G, hd = key.shape[1], key.shape[-1]
        expect = [e.to(torch.float64) for e in _normed(module, k_lin, G, hd)]  # each [B, G, T, hd]
        got = key.detach().to(torch.float64)
        tol = CHECK_TOL if key.dtype in (torch.float32, torch.float64) else 2e-2
        pe = self.pe.get(id(module))
        info = None
        if pe is not None:
            cand = _rotary(module, pe, hd)
            if cand is not None and any(_close(self.rotate(module, cand, got, inverse=True), e, tol) for e in expect):
                info = cand
        if info is None and any(_close(got, e, tol) for e in expect):
            info = LayerInfo(False)
        if info is None:
            raise HeadlensError(f"layer {layer} ({type(module).__name__}): the keys attention receives are not the key "
                                "projection turned by the family's apply_rotary_pos_emb: headlens cannot un-rotate "
                                "them, so it fits no key latent here")
        self.info[layer] = info
        # a linear key's bias is taken out before encoding (c = E (k - b)); before a rotation it is part of the key
        self.bias[layer] = self.key_bias.get(layer) if not info.rotary else None
        return info

    # -------------------------------------------------------------------------------------------- capture

    def _capture(self, module, layer: int, info: LayerInfo, query, key) -> None:
        q = self.rotate(module, info, query.detach().to(torch.float64), inverse=True)[0]  # (H, T, hd)
        k = self.rotate(module, info, key.detach().to(torch.float64), inverse=True)[0]  # (G, T, hd)
        self._accumulate(layer, q, k)

    def _accumulate(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Add pre-rotary queries (H, T, hd) and keys (G, T, hd) of one text to the layer's moments."""
        H, G = q.shape[0], k.shape[0]
        bias = self.bias.get(layer)
        if bias is not None:
            k = k - torch.stack(bias)[:, None, :]
        Cq = torch.einsum("gnti,gntj->gij", q.reshape(G, H // G, *q.shape[1:]), q.reshape(G, H // G, *q.shape[1:]))
        Ck = torch.einsum("gti,gtj->gij", k, k)
        flat = k.transpose(0, 1).reshape(k.shape[1], -1)  # (T, G hd): every kv head's key side by side
        acc = self.moments.setdefault(layer, [0, 0, 0, 0])
        acc[0], acc[1], acc[2], acc[3] = acc[0] + Cq, acc[1] + Ck, acc[2] + k.shape[1], acc[3] + flat.T @ flat

    # ------------------------------------------------------------------ families computing attention themselves

    def projected(self, module, layer: int, q_lin: torch.Tensor, k_lin: torch.Tensor) -> None:
        """The cache route (:attr:`via_cache`): the q/k projections' outputs [B, T, heads*hd] of one call, which are
        the pre-rotary queries and keys there (no q/k norms, checked): the moments, or in the original pass the
        isolated logit error of every configuration's keys (content logits ``q^T k``, turned by the positions in
        rotary layers; the attention KL and output errors come from the family's own attention, re-called by
        :class:`~headlens.compress.cache_route.RouteMeasure`)."""
        if self.mode not in ("capture", "orig") or layer not in self.layers or (self.mode, "p", layer) in self.seen:
            return
        if self.mode == "orig":
            self.seen.add((self.mode, "p", layer))
        hd = self.ck.shape.head_dim
        q = q_lin.detach().to(torch.float64)[0].reshape(q_lin.shape[1], -1, hd).transpose(0, 1)  # (H, T, hd)
        k = k_lin.detach().to(torch.float64)[0].reshape(k_lin.shape[1], -1, hd).transpose(0, 1)  # (G, T, hd)
        if self.mode == "capture":
            self._accumulate(layer, q, k)
            return
        info = self.info.get(layer)
        if info is None:
            raise HeadlensError(f"layer {layer}: its rotary structure was not found before the eval passes")
        for c, per in enumerate(self.configs):
            plan = per.get(layer, (None, None))[0]
            if plan is None:
                continue
            P = plan.projectors()
            b = torch.stack(plan.bias)[:, None, :] if plan.bias is not None else 0.0
            k2 = torch.matmul(k - b, P.transpose(1, 2)) + b
            Q, K, K2 = (self.rotate(module, info, t[None], inverse=False)[0] for t in (q, k, k2))
            rep = Q.shape[0] // K.shape[0]
            K, K2 = K.repeat_interleave(rep, 0), K2.repeat_interleave(rep, 0)
            L, L2 = Q @ K.transpose(1, 2), Q @ K2.transpose(1, 2)
            T = L.shape[-1]
            allowed = torch.ones(T, T, dtype=torch.bool).tril()
            sums = self._sums(c, layer)
            sums.logit_lost += float((((L2 - L) * allowed) ** 2).sum())
            sums.logit_total += float(((L * allowed) ** 2).sum())

    def cache_key(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        """What :class:`ProbeCache` hands attention for ``layer``'s new keys: checked (first call), and in an ``acc``
        pass replaced by the configuration's latents' keys."""
        module = self.by_layer.get(layer)
        if module is None or layer not in self.layers:
            return key
        info = self.check_layer(module, layer, key)
        if self.mode == "acc":
            plan = self.configs[self.current].get(layer, (None, None))[0]
            if plan is not None:
                return self.compress(module, info, key, plan).to(key.dtype)
        return key

    def probe(self, model) -> None:
        """One short forward pass (8 token ids, no text; nothing kept): each layer's first call finds and checks its
        rotary structure (:meth:`check_layer`), before any pass that needs it."""
        import inspect

        from headlens.io.placement import input_device

        mode, self.mode = self.mode, "probe"
        vocab = int(getattr(model.config.get_text_config(decoder=True), "vocab_size", 8) or 8)
        ids = (torch.arange(8) % max(vocab, 1)).reshape(1, 8).to(input_device(model))
        kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        try:
            with torch.no_grad():
                model(input_ids=ids, **{**kwargs, **self.forward_kwargs(model)})
        finally:
            self.mode = mode
            self.seen = set()

    def forward_kwargs(self, model) -> dict:
        """Extra arguments of a forward pass: on the cache route a fresh :class:`ProbeCache`, else none."""
        return {"past_key_values": ProbeCache(self, model.config), "use_cache": True} if self.via_cache else {}

    def key_moments(self) -> dict[int, KeyMoments]:
        out = {}
        for layer, (Cq, Ck, n, cross) in sorted(self.moments.items()):
            info = self.info[layer]
            Cq = rotation_average(Cq, info.pairs) if info.rotary else Cq
            out[layer] = KeyMoments(layer=layer, Cq=Cq, Ck=Ck, rotary=info.rotary, bias=self.bias.get(layer),
                                    tokens=int(n), Ck_cross=cross, pairs=list(info.pairs))
        return out

    # -------------------------------------------------------------------------------------------- compress

    def compress(self, module, info: LayerInfo, key: torch.Tensor, plan: KeyLayerPlan) -> torch.Tensor:
        """Keys [B, G, T, hd] as the cache rebuilds them from the plan's latents (the form it keeps), float64."""
        if plan.form == "across":
            from headlens.compress.cross_keys import across_keys

            return across_keys(key, plan.frequency_latent())
        k = self.rotate(module, info, key.detach().to(torch.float64), inverse=True)
        P = plan.projectors().to(k.device)  # (G, hd, hd)
        b = torch.stack(plan.bias).to(k.device, torch.float64)[None, :, None, :] if plan.bias is not None else 0.0
        k2 = torch.matmul(k - b, P.transpose(1, 2)) + b
        return self.rotate(module, info, k2, inverse=False)

    def compress_across(self, module, info: LayerInfo, key: torch.Tensor, freq) -> torch.Tensor:
        """Keys [B, G, T, hd] through the per-frequency cross-head latent (its projector on the pre-rotary keys)."""
        k = self.rotate(module, info, key.detach().to(torch.float64), inverse=True)
        B, G, T, hd = k.shape
        flat = k.transpose(1, 2).reshape(B, T, G * hd) @ freq.projector.to(k.device).T
        return self.rotate(module, info, flat.reshape(B, T, G, hd).transpose(1, 2), inverse=False).to(key.dtype)

    def _isolated(self, c, module, layer, info, query, key, value, mask, kwargs, run, out) -> None:
        plan, vfac = self.configs[c][layer]
        sums = self._sums(c, layer)
        o = out.detach().to(torch.float64)
        total = float((o ** 2).sum())
        k2 = self.compress(module, info, key, plan).to(key.dtype) if plan is not None else None  # the kept form
        v2 = _values(vfac, value) if vfac is not None else None
        if k2 is not None:  # each form's logit errors; the output errors below are the kept form's
            freq = plan.frequency_latent()
            per_group = k2 if plan.form == "per_group" else self.compress(
                module, info, key, dataclasses.replace(plan, form="per_group")).to(key.dtype)
            _logit_errors(sums, module, query, key, per_group, mask, kwargs)
            if freq is not None:
                _logit_errors(sums.frequency, module, query, key, self.compress_across(module, info, key, freq), mask,
                              kwargs)
            _add(sums.out, "keys", _lost(run(module, query, k2, value, mask, **kwargs)[0], o), total)
        if v2 is not None:
            _add(sums.out, "values", _lost(run(module, query, key, v2, mask, **kwargs)[0], o), total)
        if k2 is not None and v2 is not None:
            _add(sums.out, "both", _lost(run(module, query, k2, v2, mask, **kwargs)[0], o), total)


def _probe_cache_class():
    from transformers import DynamicCache

    class ProbeCache(DynamicCache):
        """A DynamicCache for one pass on the cache route: every layer's new keys go through
        :meth:`KeyState.cache_key` (checked; replaced by the latents' keys in a compressed pass) before they are
        stored and handed to attention."""

        def __init__(self, state: "KeyState", config):
            super().__init__(config=config)
            self.state = state

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(self.state.cache_key(layer_idx, key_states), value_states, layer_idx, *args,
                                  **kwargs)

    return ProbeCache


def ProbeCache(state: "KeyState", config):  # noqa: N802 (a class, built on first use: transformers loads lazily)
    global _PROBE
    if _PROBE is None:
        _PROBE = _probe_cache_class()
    return _PROBE(state, config)


_PROBE = None


def turn(info: LayerInfo, x: torch.Tensor, pe, inverse: bool = False) -> torch.Tensor:
    """``x`` [B, heads, T, hd] turned by ``pe`` with the layer's rotary (or back): the cache's own
    :func:`~headlens.compress.rotary_keys.turn`."""
    return turn_with(info.apply, info.complex, x, pe, inverse)


def _rotary(module, pe, hd: int) -> LayerInfo | None:
    """The family's rotary as a candidate :class:`LayerInfo` (its function, and the dimension pairs it turns found by
    turning each basis vector by 90 degrees with it), or None where the modeling module has no rotary function."""
    fn, complex_ = family_rotate(sys.modules.get(type(module).__module__))
    if fn is not None and not complex_ and isinstance(pe, (tuple, list)) and len(pe) == 2:
        info = LayerInfo(True, fn)
        rot = int(pe[0].shape[-1])
        quarter = (torch.zeros(1, hd, rot, dtype=torch.float64), torch.ones(1, hd, rot, dtype=torch.float64))
    elif fn is not None and complex_ and isinstance(pe, torch.Tensor) and pe.is_complex():
        info = LayerInfo(True, fn, complex=True)
        quarter = torch.full((1, hd, hd // 2), 1j, dtype=torch.complex64)
    else:
        return None
    eye = torch.eye(hd, dtype=torch.float64).reshape(1, 1, hd, hd)  # hd "tokens", one basis vector each
    info.pairs = pairs_of(turn(info, eye, quarter).reshape(hd, hd))
    return info


def _lost(out: torch.Tensor, o: torch.Tensor) -> float:
    return float(((out.detach().to(torch.float64) - o) ** 2).sum())


def _values(vfac, value: torch.Tensor) -> torch.Tensor:
    """Values [B, G, T, hd] as a value-latent cache rebuilds them (``U_g E_g (v - b) + b``)."""
    v = value.detach().to(torch.float64)
    b = (torch.stack([x.to(v.device, torch.float64) for x in vfac.bias])[None, :, None, :]
         if vfac.bias is not None else 0.0)
    P = getattr(vfac, "_projectors", None)  # (G, hd, hd), any k per group; made once per layer's factors
    if P is None or P.device != v.device:
        P = vfac._projectors = torch.stack([u.to(v.device, torch.float64) @ e.to(v.device, torch.float64)
                                            for u, e in zip(vfac.up, vfac.encode)])
    return (torch.matmul(v - b, P.transpose(1, 2)) + b).to(value.dtype)


def _logit_errors(sums: LayerSums, module, query, key, k2, mask, kwargs) -> None:
    """Add the relative logit error and the attention-pattern KL of keys ``k2`` against ``key`` (every query head,
    every unmasked query-key pair) to ``sums``."""
    q = query.detach().to(torch.float64)
    B, H, T, hd = q.shape
    G = key.shape[1]
    rep = H // G
    K = key.detach().to(torch.float64).repeat_interleave(rep, dim=1)
    K2 = k2.detach().to(torch.float64).repeat_interleave(rep, dim=1)
    scale = kwargs.get("scaling") or hd ** -0.5
    L = torch.matmul(q, K.transpose(2, 3)) * scale  # (B, H, T, S)
    L2 = torch.matmul(q, K2.transpose(2, 3)) * scale
    S = L.shape[-1]
    if mask is not None:
        m = mask[..., :S]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        allowed = allowed.expand(B, H, T, S)
    elif getattr(module, "is_causal", False) and T > 1:
        allowed = (torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)).to(q.device).expand(B, H, T, S)
    else:
        allowed = torch.ones(B, H, T, S, dtype=torch.bool, device=q.device)
    d = (L2 - L) * allowed
    sums.logit_lost += float((d ** 2).sum())
    sums.logit_total += float(((L * allowed) ** 2).sum())
    softcap = kwargs.get("softcap")
    if softcap:
        L, L2 = torch.tanh(L / softcap) * softcap, torch.tanh(L2 / softcap) * softcap
    neg = torch.finfo(torch.float64).min
    lp = torch.log_softmax(L.masked_fill(~allowed, neg), dim=-1)
    lp2 = torch.log_softmax(L2.masked_fill(~allowed, neg), dim=-1)
    kl = (lp.exp() * (lp - lp2)).masked_fill(~allowed, 0.0).sum(-1)  # (B, H, T)
    sums.kl += float(kl.sum())
    sums.rows += int(kl.numel())


def _normed(module, k_lin: torch.Tensor, G: int, hd: int) -> list[torch.Tensor]:
    """The key projection's output [B, T, G*hd] through the family's key norm (``k_norm``, ``qk_norm``,
    ``k_layernorm``: per head or over all kv heads), as [B, G, T, hd]: every way the families apply it (heads before
    or after the token axis), for the check to match one."""
    B, T = k_lin.shape[:2]
    norm = next((getattr(module, n) for n in ("k_norm", "qk_norm", "k_layernorm")
                 if getattr(module, n, None) is not None), None)
    per_head = k_lin.reshape(B, T, G, hd)
    if norm is None:
        return [per_head.transpose(1, 2)]
    out = []
    w = getattr(norm, "weight", None)
    tries = [lambda: norm(per_head).transpose(1, 2), lambda: norm(per_head.transpose(1, 2))]
    if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == G * hd and G > 1:
        tries.insert(0, lambda: norm(k_lin).reshape(B, T, G, hd).transpose(1, 2))
    for make in tries:
        try:
            t = make()
        except (RuntimeError, ValueError, IndexError):
            continue
        if t.shape == (B, G, T, hd):
            out.append(t)
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and float(torch.linalg.norm(a - b)) <= tol * max(float(torch.linalg.norm(b)), 1e-30)
