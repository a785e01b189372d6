"""Calibration honesty: what each configuration's value latents lose on calibration tokens they were not fitted on.

A data-aware latent is fitted to the calibration tokens, so its error there (in-sample) flatters it; with few tokens
it overfits, and the eval texts are not the place to find out (nothing is chosen on them). So the calibration tokens
of every layer are split, even positions and odd positions (as ``headlens ov`` and ``sweep`` do); the latents of
each kind are fitted again on the even ones alone, cut to each configuration's sizes, and their value-path error
``sqrt(sum ||M_g (I - Q_g) X||^2 / sum ||M_g X||^2)`` over the configuration's layers and groups is measured on the
even tokens (in-sample) and on the odd ones (held out), with the plain latents of the same sizes on the same held-out
tokens beside them. Where the data-aware latents' held-out error exceeds the plain latents', :func:`warnings` says
so in one line: too little calibration data for a data-aware fit. The configurations' own latents stay fitted on
every calibration token; this split only measures.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

FIELDS = ("calib_error_in_sample", "calib_error_heldout", "plain_error_heldout")


def _error(plans: Mapping, W_V: Mapping[int, torch.Tensor], X: Mapping[int, torch.Tensor]) -> float:
    from headlens.compress.plan import _lost_and_total

    num = den = 0.0
    for layer, plan in plans.items():
        for g in plan.groups:
            lost, total = _lost_and_total(g, W_V[layer][g.kv_head], X[layer])
            num, den = num + lost ** 2, den + total ** 2
    return math.sqrt(num / den) if den > 0 else 0.0


def held_out_errors(ck, X: Mapping[int, torch.Tensor], confs: Sequence, plain: Mapping | None = None,
                    load_dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """{configuration name: {calib_error_in_sample, calib_error_heldout, plain_error_heldout, heldout_tokens}} for
    every configuration with value latents (module docstring); in-sample is None for plain latents (fitted on no
    tokens). ``plain``: the full-size plain plans where the run has them (they use no tokens). Empty where a layer
    has fewer than 8 calibration tokens."""
    from headlens.circuits.heads import read_layer
    from headlens.compress.allocate import cut_all, full_plans

    layers = sorted(X)
    if not layers or any(X[layer].shape[1] < 8 for layer in layers):
        return {}
    even = {layer: X[layer][:, 0::2].to(torch.float64) for layer in layers}
    odd = {layer: X[layer][:, 1::2].to(torch.float64) for layer in layers}
    fits = {"plain": dict(plain) if plain else full_plans(ck, layers, "plain", None, load_dtype),
            "data-aware": full_plans(ck, layers, "data-aware", even, load_dtype)}
    W_V = {layer: read_layer(ck, layer, with_qk=False, load_dtype=load_dtype).W_V.to(torch.float64)
           for layer in layers}
    out = {}
    for c in confs:
        if not c.ks or c.latent not in fits or set(c.ks) - set(layers):
            continue
        plans = cut_all(fits[c.latent], c.ks)
        plain = cut_all(fits["plain"], c.ks)
        out[c.name] = {"calib_error_in_sample": _error(plans, W_V, even) if c.latent == "data-aware" else None,
                       "calib_error_heldout": _error(plans, W_V, odd),
                       "plain_error_heldout": _error(plain, W_V, odd),
                       "heldout_tokens": int(odd[layers[0]].shape[1])}
    return out


def warnings(errors: Mapping[str, dict], tokens: int) -> list[str]:
    """One line per data-aware configuration whose held-out error exceeds the plain latents' of the same sizes."""
    out = []
    for name, e in errors.items():
        if e["calib_error_in_sample"] is not None and e["calib_error_heldout"] > e["plain_error_heldout"]:
            out.append(f"{name}: on held-out calibration tokens the data-aware latents lose more "
                       f"({e['calib_error_heldout']:.3f}, in-sample {e['calib_error_in_sample']:.3f}) than plain "
                       f"latents of the same sizes ({e['plain_error_heldout']:.3f}): {tokens} calibration tokens are "
                       "too few for a data-aware fit; give more calibration texts or use plain latents")
    return out
