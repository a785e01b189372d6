"""Spending a byte budget over every latent: per (layer, kv group, keys or values) slot, how many numbers it keeps.

The budget is a number of latent numbers per token, ``total`` (from a saving of the whole KV cache or bytes per
token: :func:`numbers_for`); every number costs the same bytes, so keys and values compete for the same bytes (the
positions a rotary key layer keeps are a fixed cost, taken off first). A slot's spectrum (the singular values its
latent is cut from: ``sigma(M_g)`` or ``sigma(M_g S)`` for values, the key plan's for keys) says what each further
number buys. :func:`allocate` by ``method``:

- ``uniform``: the same size everywhere (the total spread as evenly as integers allow).
- ``error``: minimise the largest predicted relative error ``tail_s(k) / scale_s`` over the slots (one number at a
  time to the slot whose error is largest): what a common error target does, at exactly these bytes.
- ``energy``: keep the same fraction of every slot's energy; since a slot's kept energy is ``1 - e_s^2`` this picks
  the same sizes as ``error`` (said, not hidden: both names are accepted because both targets exist).
- ``fisher``: sizes proportional to each slot's Fisher score (Palu's rule): ``F_s = mean_t ||dL/dx_{s,t}||^2``, the
  squared gradient of the calibration loss with respect to the slot's projected tensor (:func:`fisher_scores`),
  water-filled into 0..head_dim.
- ``greedy``: one number at a time, the one with the largest predicted end-to-end loss reduction. Derivation: near
  the uncompressed model the end metric (next-token KL, or 1 - cosine for an encoder) is quadratic in the error of
  the cached tensors, ``dM ~ sum_s lambda_s ||A_s delta_s||^2``, where ``||A_s delta_s||^2`` is the error the
  slot's spectrum measures (output error for values, logit error for keys), so dropping direction i of slot s costs
  ``lambda_s sigma_{s,i}^2``. The sensitivity ``lambda`` of each (layer, keys or values) is measured by a finite
  perturbation on the calibration texts (:func:`sensitivities`): that part of that layer alone cut to half its
  size, ``lambda = dM / sum_g tail_g^2``. With sigma decreasing along each slot, taking the ``total`` largest
  ``lambda_s sigma_{s,i}^2`` is the exact optimum of that separable model, and it is what the loop does. The loss
  is not quadratic far from the uncompressed model (a part cut deep loses more than the half-size probe says), so
  :func:`refined_greedy` measures lambda again where the first allocation cut each part and allocates once more
  with those (a part left whole keeps its first lambda): one correction, not iterated to a fixed point.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from headlens.errors import HeadlensError

ALLOCATIONS = ("uniform", "error", "energy", "fisher", "greedy")
PARTS = ("values", "keys")
SlotKey = tuple[int, int, str]  # (layer, kv group, part)


@dataclass(frozen=True)
class Slot:
    """One latent the budget sizes: a layer's kv group, its values or its keys, and the spectrum it is cut from."""

    layer: int
    group: int
    part: str
    spectrum: torch.Tensor  # (hd,) float64, descending
    scale: float

    @property
    def key(self) -> SlotKey:
        return (self.layer, self.group, self.part)

    def tail2(self, k: int) -> float:
        """The squared error the spectrum predicts at size ``k`` (absolute): ``sum_{i >= k} sigma_i^2``."""
        return float((self.spectrum[k:].to(torch.float64) ** 2).sum())

    def rel(self, k: int) -> float:
        return math.sqrt(self.tail2(k)) / self.scale if self.scale > 0 else 0.0


def slots_of(values: Mapping | None, keys: Mapping | None) -> list[Slot]:
    """Every slot of the full-size value plans (layer -> LayerPlan) and key plans (layer -> KeyLayerPlan)."""
    out = []
    for part, plans in (("values", values or {}), ("keys", keys or {})):
        for layer in sorted(plans):
            for g, lat in enumerate(plans[layer].groups):
                out.append(Slot(layer, g, part, lat.spectrum.detach().to("cpu", torch.float64), float(lat.scale)))
    return out


LEAST = {"values": 0, "keys": 1}  # a key latent of 0 numbers stores no key (every logit the same): at least 1


def allocate(method: str, slots: Sequence[Slot], total: int, cap: int,
             sensitivity: Mapping[tuple[int, str], float] | None = None,
             fisher: Mapping[SlotKey, float] | None = None) -> dict[SlotKey, int]:
    """{slot key: size} with ``sum == total``, every size in its least (:data:`LEAST`: 1 for a key latent)
    ..``cap`` (module docstring)."""
    if method not in ALLOCATIONS:
        raise HeadlensError(f"`allocate` {method!r}: choose one of {', '.join(ALLOCATIONS)}")
    n = len(slots)
    least = [min(LEAST.get(s.part, 0), cap) for s in slots]
    if not sum(least) <= total <= cap * n:
        raise HeadlensError(f"a budget of {total} latent numbers per token does not fit {n} latents of 0..{cap} "
                            f"numbers ({sum(least)}..{cap * n}: a key latent keeps at least 1)")
    if method == "uniform":
        base, extra = divmod(total, n)
        sizes = [base + (1 if i < extra else 0) for i in range(n)]
        short = sum(max(f - k, 0) for f, k in zip(least, sizes))  # raise the floors, taken from the largest
        sizes = [max(k, f) for k, f in zip(sizes, least)]
        for i in sorted(range(n), key=lambda i: (-sizes[i], i)):
            while short and sizes[i] > least[i] and sizes[i] > min(sizes):
                sizes[i], short = sizes[i] - 1, short - 1
        return {s.key: k for s, k in zip(slots, sizes)}
    if method == "fisher":
        if fisher is None:
            raise HeadlensError("`allocate` fisher needs each latent's Fisher score (calibration texts)")
        rest = _water_fill(slots, total - sum(least), [cap - f for f in least],
                           [max(float(fisher[s.key]), 0.0) for s in slots])
        return {s.key: rest[s.key] + f for s, f in zip(slots, least)}
    if method == "greedy":
        if sensitivity is None:
            raise HeadlensError("`allocate` greedy needs each layer's measured sensitivity (calibration texts)")

        def gain(s: Slot, k: int) -> float:
            return float(sensitivity[(s.layer, s.part)]) * float(s.spectrum[k]) ** 2
    else:  # error, energy: the largest relative error first

        def gain(s: Slot, k: int) -> float:
            return s.rel(k)
    sizes_ = {s.key: f for s, f in zip(slots, least)}
    heap = [(-gain(s, f), i) for i, (s, f) in enumerate(zip(slots, least)) if f < cap]
    heapq.heapify(heap)
    for _ in range(total - sum(least)):
        _, i = heapq.heappop(heap)
        s = slots[i]
        sizes_[s.key] += 1
        if sizes_[s.key] < cap:
            heapq.heappush(heap, (-gain(s, sizes_[s.key]), i))
    return sizes_


def refined_greedy(slots: Sequence[Slot], total: int, cap: int, sensitivity: Mapping[tuple[int, str], float],
                   reprobe: Callable[[dict], Mapping[tuple[int, str], float]] | None = None) -> dict[SlotKey, int]:
    """The greedy allocation, then (``reprobe``: the lambdas measured at a given allocation's sizes) the greedy
    allocation again with the lambdas measured where the first one cut (module docstring)."""
    first = allocate("greedy", slots, total, cap, sensitivity=sensitivity)
    if reprobe is None:
        return first
    return allocate("greedy", slots, total, cap, sensitivity={**sensitivity, **reprobe(first)})


def _water_fill(slots: Sequence[Slot], total: int, caps: list[int], w: list[float]) -> dict[SlotKey, int]:
    """Sizes proportional to ``w`` (equal where every weight is 0), each at most its cap, summing to ``total``:
    the capped slots take their cap and the rest share what is left, rounded by the largest remainder."""
    n = len(slots)
    if sum(w) <= 0:
        w = [1.0] * n
    free = list(range(n))
    share = [0.0] * n
    left = float(total)
    while free:
        tot = sum(w[i] for i in free)
        if tot <= 0:
            for i in free:
                share[i] = left / len(free)
            break
        over = [i for i in free if left * w[i] / tot > caps[i]]
        if not over:
            for i in free:
                share[i] = left * w[i] / tot
            break
        for i in over:
            share[i] = float(caps[i])
            left -= caps[i]
        free = [i for i in free if i not in over]
    base = [min(int(math.floor(x + 1e-9)), c) for x, c in zip(share, caps)]
    rest = total - sum(base)
    for i in sorted(range(n), key=lambda i: (-(share[i] - base[i]), i)):
        if rest <= 0:
            break
        if base[i] < caps[i]:
            base[i] += 1
            rest -= 1
    return {s.key: base[i] for i, s in enumerate(slots)}


def split(sizes: Mapping[SlotKey, int]) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(value sizes, key sizes), each ``{layer: [k per kv group]}``."""
    out: dict[str, dict[int, dict[int, int]]] = {"values": {}, "keys": {}}
    for (layer, g, part), k in sizes.items():
        out[part].setdefault(layer, {})[g] = k
    return tuple({layer: [per[g] for g in sorted(per)] for layer, per in sorted(d.items())}  # type: ignore[return-value]
                 for d in (out["values"], out["keys"]))


def numbers_for(budget_bytes: float, ck, layers: Sequence[int], kv_bytes: int, keys: bool, rotary_layers: int,
                position_bytes: float) -> int:
    """The latent numbers per token a cache of ``budget_bytes`` per token leaves: the whole cache's bytes less the
    parts kept whole (the layers not compressed; the keys, where they are not latents) and the positions of rotary
    key layers, in numbers of ``kv_bytes`` bytes (rounded down: never above the budget)."""
    s = ck.shape
    full = s.num_kv_heads * s.head_dim
    fixed = (s.num_layers - len(layers)) * 2 * full * kv_bytes + (0 if keys else len(layers) * full * kv_bytes)
    fixed += rotary_layers * position_bytes if keys else 0
    n = math.floor((budget_bytes - fixed) / kv_bytes + 1e-9)
    most = len(layers) * full * (2 if keys else 1)
    if n < 0:
        raise HeadlensError(f"a KV budget of {budget_bytes:g} bytes per token is below what stays whole "
                            f"({fixed:g} bytes: {'positions and ' if keys else 'full keys and '}uncompressed layers)")
    if n > most:
        raise HeadlensError(f"a KV budget of {budget_bytes:g} bytes per token is above this cache with every latent "
                            f"at full size ({fixed + most * kv_bytes:g} bytes)")
    return n


# -------------------------------------------------------------------------------------- what the budget is spent by


def end_metric(m) -> float:
    """The end metric a measurement is judged by: next-token KL (nats) for a decoder, ``1 - cosine`` of the
    embeddings for an encoder."""
    if m.kl_mean is not None:
        return float(m.kl_mean)
    return 1.0 - float(m.embedding_cosine_mean)


def sensitivities(slots: Sequence[Slot], probe: Callable[[int, str, dict], float], cap: int,
                  at: Mapping[SlotKey, int] | None = None) -> dict[tuple[int, str], float]:
    """lambda per (layer, part): ``probe(layer, part, sizes)`` (the end metric with only that part of that layer cut
    to ``sizes``, {kv group: k}: ``at``'s, or ``cap // 2`` everywhere) over the squared error the spectra predict
    there (module docstring). A part the sizes leave whole (nothing predicted lost) is not probed and not in the
    result."""
    by: dict[tuple[int, str], list[Slot]] = {}
    for s in slots:
        by.setdefault((s.layer, s.part), []).append(s)
    out = {}
    for (layer, part), group in sorted(by.items()):
        sizes = {s.group: (at[s.key] if at is not None else cap // 2) for s in group}
        err = sum(s.tail2(sizes[s.group]) for s in group)
        if err > 0:
            out[(layer, part)] = max(probe(layer, part, sizes), 0.0) / err
    return out


def fisher_scores(model, ck, tokenizer, texts: Sequence[str], layers: Sequence[int], parts: Sequence[str],
                  max_tokens: int = 2048, seed: int = 0) -> dict[SlotKey, float]:
    """``F_s = mean over tokens of ||dL/dx_{s,t}||^2`` per (layer, kv group, part): ``x`` the output of the key or
    value projection narrowed to that kv group (what the cache is fitted on; before rotary and key norm), ``L`` the
    calibration loss: for a causal LM the sum of the next-token losses of the actual tokens (the empirical Fisher,
    as Palu); for an encoder ``sum_t r_t . (I - u_t u_t^T) h_t / |h_t|`` (``u_t = h_t / |h_t|``, ``r_t`` standard
    normal), whose expected squared gradient is the Gauss-Newton curvature of the embeddings' cosine."""
    from headlens.compress.projections import head_projection
    from headlens.io.placement import input_device

    s = ck.shape
    hd = s.head_dim
    projections = {(layer, part): head_projection(model, ck, layer, "k" if part == "keys" else "v")
                   for layer in layers for part in parts}
    leaves: dict[int, torch.Tensor] = {}
    handles = []

    def keep(module, _args, output):
        if isinstance(output, torch.Tensor):
            out = output.detach().requires_grad_(True)
            leaves[id(module)] = out
            return out
        return None

    for proj in {id(p.module): p for p in projections.values()}.values():
        handles.append(proj.module.register_forward_hook(keep))
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)  # the gradients wanted are of the projections' outputs, not of the weights
    sums = {(layer, g, part): 0.0 for layer, part in projections for g in range(s.num_kv_heads)}
    tokens = 0
    gen = torch.Generator().manual_seed(seed)
    causal = bool(ck.spec.decoder)
    was = model.training
    model.eval()
    try:
        for text in texts:
            if tokens >= max_tokens:
                break
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : max_tokens - tokens]
            if ids.shape[1] < 2:
                continue
            ids = ids.to(input_device(model))
            leaves.clear()
            with torch.enable_grad():
                kwargs = {"use_cache": False} if causal else {}
                out = model(input_ids=ids, output_hidden_states=not causal, **kwargs)
                if causal:
                    logits = out.logits[0, :-1].float()
                    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                else:
                    h = out.hidden_states[-1][0].float()
                    u = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    r = torch.randn(h.shape, generator=gen).to(h.device)
                    r = r - (r * u).sum(-1, keepdim=True) * u
                    loss = (r * h).sum(-1).div(h.norm(dim=-1).clamp_min(1e-12)).sum()
                loss.backward()
            for (layer, part), proj in projections.items():
                grad = leaves[id(proj.module)].grad
                if grad is None:
                    raise HeadlensError(f"layer {layer}: the calibration loss does not reach its {part} "
                                        "projection: no Fisher score")
                g = proj.select(grad)[0].to(torch.float64)  # (T, G hd)
                for j in range(s.num_kv_heads):
                    sums[(layer, j, part)] += float((g[:, j * hd:(j + 1) * hd] ** 2).sum())
            tokens += int(ids.shape[1])
    finally:
        for h in handles:
            h.remove()
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was)
    if tokens == 0:
        raise HeadlensError("the calibration texts give no tokens: Fisher scores need calibration texts")
    return {key: v / tokens for key, v in sums.items()}


def probe_sensitivities(model, ck, tokenizer, texts: Sequence[str], values_full: Mapping | None,
                        keys_full: Mapping | None, kv_bytes: int, truncate: bool = False,
                        disable: bool | None = None, at: Mapping[SlotKey, int] | None = None
                        ) -> dict[tuple[int, str], float]:
    """:func:`sensitivities` measured: one configuration per (layer, part), that part of that layer alone cut (to
    half of head_dim in every kv group, or to ``at``'s sizes), measured on ``texts`` (the calibration texts: nothing
    is chosen on the eval texts) by :func:`~headlens.compress.measure.measure_many`, in one set of passes."""
    from headlens.compress.allocate import cut
    from headlens.compress.keys import cut_keys
    from headlens.compress.measure import measure_many

    cap = ck.shape.head_dim
    slots = slots_of(values_full, keys_full)
    wanted: dict[tuple[int, str], dict] = {}

    def note(layer: int, part: str, sizes: dict) -> float:  # which parts to probe, at which sizes
        wanted[(layer, part)] = sizes
        return 0.0

    sensitivities(slots, note, cap, at)
    probes = sorted(wanted)
    if not probes:
        return {}
    plan_sets: list[dict] = []
    key_sets: list[dict] = []
    for layer, part in probes:
        plans = (values_full if part == "values" else keys_full) or {}
        p = plans[layer]
        ks = [wanted[(layer, part)][g] for g in range(len(p.groups))]
        plan_sets.append({layer: cut(p, ks)} if part == "values" else {})
        key_sets.append({layer: cut_keys(p, ks)} if part == "keys" else {})
    measured = measure_many(model, ck, tokenizer, plan_sets, texts, bytes_per_value=kv_bytes, truncate=truncate,
                            disable=disable, desc="sensitivity", key_plans=key_sets)
    delta = {probe: end_metric(m) for probe, m in zip(probes, measured)}
    return sensitivities(slots, lambda layer, part, _sizes: delta[(layer, part)], cap, at)
