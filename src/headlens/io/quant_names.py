"""Which stored tensors hold one weight of a quantized checkpoint: names only, no reading.

A quantized weight ``X.weight`` is stored as several tensors (``X.qweight`` with ``X.qzeros`` and ``X.scales``,
``X.weight`` in fp8 with ``X.weight_scale_inv``, ...). :func:`storage_of` groups a checkpoint's tensor names into
*logical* tensors, the names an unquantized checkpoint would have; it works on a shard index before any shard is read
(a hub download of just the shards a layer needs). What the parts mean is :mod:`headlens.io.quant_layout`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headlens.io.quant_schemes import Scheme

# companion suffixes of a weight ``X.weight`` stored quantized, by the tensor that marks the scheme
_BNB4 = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
         "quant_state.bitsandbytes__fp4")
# runtime scales that describe activations or the KV cache, not weights: hidden from the logical view
_RUNTIME = ("input_scale", "input_global_scale", "input_zero_point", "output_scale", "output_zero_point", "k_scale",
            "v_scale", "q_scale", "activation_scale", "weight_global_scale")


@dataclass
class Stored:
    """One logical weight stored quantized: the stored tensors by role, and how to read them."""

    name: str  # logical name, e.g. model.layers.0.self_attn.v_proj.weight
    kind: str  # fp8-scale-inv | scaled | bnb-int8 | bnb-4bit | packed-qweight | ct-packed | mxfp4
    parts: dict[str, str]  # role -> stored tensor name (weight, scale, zero, g_idx, shape, ...)
    scheme: "Scheme | None" = None  # set by Layout
    shape: tuple[int, ...] = ()  # the logical shape, set by Layout
    params: dict[str, Any] = field(default_factory=dict)  # what dequantizing needs: block, bits, group size, ...


def storage_of(names: list[str]) -> tuple[dict[str, Stored], set[str]]:
    """({logical name: Stored} for the weights stored quantized, every stored name that is a part of one or a runtime
    scale). Purely by name: works on a shard index before any shard is read."""
    have = set(names)
    out: dict[str, Stored] = {}
    parts: set[str] = set()

    def add(logical: str, kind: str, roles: dict[str, str]) -> None:
        found = {role: n for role, n in roles.items() if n in have}
        out[logical] = Stored(logical, kind, found)
        parts.update(found.values())

    for n in names:
        base, dot, leaf = n.rpartition(".")
        pre = base + dot
        if leaf == "qweight":
            add(pre + "weight", "packed-qweight", {"qweight": n, "qzeros": pre + "qzeros", "scales": pre + "scales",
                                                    "g_idx": pre + "g_idx"})
        elif leaf == "weight_packed":
            add(pre + "weight", "ct-packed", {"packed": n, "scale": pre + "weight_scale",
                                              "zero": pre + "weight_zero_point", "shape": pre + "weight_shape",
                                              "g_idx": pre + "weight_g_idx"})
        elif leaf == "weight" and pre + "weight_scale_inv" in have:
            add(n, "fp8-scale-inv", {"weight": n, "scale": pre + "weight_scale_inv"})
        elif leaf == "weight" and pre + "weight_scale" in have:
            add(n, "scaled", {"weight": n, "scale": pre + "weight_scale", "zero": pre + "weight_zero_point",
                              "g_idx": pre + "weight_g_idx"})
        elif leaf == "weight" and pre + "SCB" in have:
            add(n, "bnb-int8", {"weight": n, "scb": pre + "SCB", "format": pre + "weight_format"})
        elif leaf == "weight" and n + ".absmax" in have:
            add(n, "bnb-4bit", {"weight": n, **{s: f"{n}.{s}" for s in _BNB4}})
        elif n.endswith("_blocks") and n[: -len("_blocks")] + "_scales" in have:
            add(n[: -len("_blocks")], "mxfp4", {"blocks": n, "scales": n[: -len("_blocks")] + "_scales"})
    for n in names:
        if n.rpartition(".")[2] in _RUNTIME:
            parts.add(n)
    return out, parts


def logical_names(names: list[str]) -> list[str]:
    """The names an unquantized checkpoint would have, in stored order: every stored name that is not a part of a
    quantized weight, plus each quantized weight's logical name at the place of its first part."""
    stored, parts = storage_of(names)
    first = {}
    for s in stored.values():
        first.setdefault(min(s.parts.values(), key=names.index), s.name)
    out: list[str] = []
    for n in names:
        if n in first:
            out.append(first[n])
        elif n not in parts:
            out.append(n)
    return list(dict.fromkeys(out))


def stored_names(wanted: set[str], names: list[str]) -> set[str]:
    """The stored tensors that hold the logical tensors ``wanted`` (a shard download of just those)."""
    stored, _ = storage_of(names)
    out = set()
    for n in wanted:
        out.update(stored[n].parts.values() if n in stored else (n,))
    return out


