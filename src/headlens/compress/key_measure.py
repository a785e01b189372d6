"""The key side of :func:`headlens.compress.measure.measure_many`: per layer, what key latents lose
(:class:`KeyLayerErrors`), summed by :class:`~headlens.compress.qk_capture.KeyState` while the passes run."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else 0.0


@dataclass
class KeyLayerErrors:
    """One layer's key numbers and its attention-output errors (keys alone, values alone, both), on the eval tokens,
    measured at the attention function's output (every head's ``softmax(q k^T) v`` before the output projection),
    relative to that output. None where the configuration does not compress that part of the layer."""

    layer: int
    key_kind: str | None
    key_ks: list[int] | None
    rotary: bool | None
    key_predicted_error: float | None  # the key plan's spectrum (averaged over relative rotations where rotary)
    key_logit_error: float | None  # measured, only this layer's keys compressed: ||L' - L|| / ||L|| over unmasked pairs
    key_attention_kl: float | None  # mean over query rows and heads of KL(softmax(L) || softmax(L'))
    isolated_keys_error: float | None  # the kept form's keys (key_form)
    isolated_values_error: float | None
    isolated_both_error: float | None
    attention_accumulated_error: float | None  # everything the configuration compresses, errors propagating
    # TransMLA's per-frequency projection across kv heads at the same numbers per token (rotary layers, G > 1):
    key_frequency_predicted_error: float | None = None
    key_frequency_logit_error: float | None = None
    key_frequency_attention_kl: float | None = None
    # the form the cache keeps for this layer (per_group or across: the lower prediction), which the isolated and
    # accumulated output errors, the end-to-end numbers and the LatentCache use; None without key latents
    key_form: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def probed(keys, model):
    """Find each layer's rotary structure with a probe pass before the Recorder hooks the model (its re-runs would
    call the probe's cache twice)."""
    if keys is not None:
        keys.probe(model)
    yield


def _frequency(plan, sums) -> dict:
    """The per-frequency cross-head latent's predicted and measured numbers, where the layer has one."""
    freq = plan.frequency_latent() if plan is not None else None
    if freq is None:
        return {}
    f = sums.frequency
    return {"key_frequency_predicted_error": freq.predicted_error,
            "key_frequency_logit_error": _ratio(f.logit_lost, f.logit_total) if f.rows else None,
            "key_frequency_attention_kl": f.kl / f.rows if f.rows else None}


def key_result(key_plans: Mapping, sums: Mapping, info: Mapping) -> list[KeyLayerErrors]:
    out = []
    for layer in sorted(sums):
        s, plan = sums[layer], key_plans.get(layer)

        def part(name: str) -> float | None:
            a = s.out.get(name)
            return _ratio(a[0], a[1]) if a is not None else None

        out.append(KeyLayerErrors(
            layer=layer, key_kind=plan.kind if plan else None, key_ks=plan.ks if plan else None,
            rotary=info[layer].rotary if layer in info else None,
            key_predicted_error=plan.predicted_error if plan else None,
            key_logit_error=_ratio(s.logit_lost, s.logit_total) if plan else None,
            key_attention_kl=s.kl / s.rows if plan and s.rows else None,
            isolated_keys_error=part("keys"), isolated_values_error=part("values"), isolated_both_error=part("both"),
            attention_accumulated_error=part("acc"), key_form=plan.form if plan else None, **_frequency(plan, s)))
    return out
