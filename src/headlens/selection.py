"""Parsing the layer and latent-size selections every command takes (``layers="7:35"``, ``ks="8,16,32"``)."""

from __future__ import annotations

from headlens.errors import HeadlensError


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """Sorted layer indices. ``None``/``all``: every layer; ``7:35`` (a Python slice, step allowed), ``5``, or
    ``1,4,9``. Raises HeadlensError naming ``layers`` and the valid range otherwise."""
    valid = f"valid layers are 0..{num_layers - 1}"
    if text is None or text.strip() in ("", "all"):
        return list(range(num_layers))
    text = text.strip()
    try:
        if ":" in text:
            parts = [p.strip() for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            start = int(parts[0]) if parts[0] else 0
            stop = int(parts[1]) if len(parts) > 1 and parts[1] else num_layers
            step = int(parts[2]) if len(parts) > 2 and parts[2] else 1
            if step <= 0:
                raise HeadlensError(f"`layers` {text}: the step must be positive")
            for v, name in ((start, "start"), (stop, "stop")):
                if not -num_layers <= v <= num_layers:
                    raise HeadlensError(f"`layers` {text}: {name} {v} is out of range ({valid})")
            layers = list(range(num_layers))[slice(start, stop, step)]
        else:
            layers = [int(p) for p in text.split(",")]
            for v in layers:
                if not 0 <= v < num_layers:
                    raise HeadlensError(f"`layers` {text}: layer {v} is out of range ({valid})")
    except ValueError:
        raise HeadlensError(f"`layers` {text!r}: use a slice like 7:35, a list like 1,4,9, or all") from None
    if not layers:
        raise HeadlensError(f"`layers` {text} selects no layer ({valid})")
    return sorted(set(layers))


def parse_ks(text: str, head_dim: int | None = None) -> list[int]:
    """Sorted distinct latent sizes from ``8,16,32``; each must be in 1..``head_dim`` when it is given."""
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise HeadlensError(f"`ks` {text!r}: give positive integers separated by commas, e.g. 8,16,32") from None
    if not ks or ks[0] <= 0:
        raise HeadlensError(f"`ks` {text!r}: latent sizes must be positive integers, e.g. 8,16,32")
    if head_dim is not None and ks[-1] > head_dim:
        raise HeadlensError(f"`ks` {ks[-1]} is above head_dim {head_dim}: a head's OV circuit has rank <= {head_dim}; "
                            f"choose sizes in 1..{head_dim}")
    return ks
