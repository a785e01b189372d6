"""Parsing the layer and latent-size selections every command takes (``layers="7:35"``, ``ks="8,16,32"``).

One rule for both lists: items are integers separated by single commas; an empty selection, an empty item
(``1,,4``, ``8,``) and an item given twice (``8,8``) are refused with one line naming the parameter. A layer
selection may also be ``all`` (or None: every layer) or a Python slice ``start:stop[:step]``.
"""

from __future__ import annotations

from headlens.errors import HeadlensError

# The precisions a model can be run in and its weights rounded to (``dtype`` / ``--dtype``).
DTYPES = ("float32", "float64", "bfloat16", "float16")
# ``auto`` as well: float32 on the CPU, the checkpoint's own torch_dtype on an accelerator (headlens.io.placement).
DTYPE_CHOICES = ("auto", *DTYPES)
LABEL_CHOICES = ("auto", "all", "none")  # sphere GIF token labels: a non-overlapping subset, every one, none


def _int_list(text: str, name: str, syntax: str) -> list[int]:
    """The integers of a comma-separated ``text`` in the order given; refuses empty items, non-integers
    (with ``syntax``, naming ``name``) and duplicates."""
    items = [p.strip() for p in text.split(",")]
    if any(not p for p in items):
        raise HeadlensError(f"`{name}` {text!r} has an empty item: separate the numbers by single commas")
    try:
        values = [int(p) for p in items]
    except ValueError:
        raise HeadlensError(f"`{name}` {text!r}: {syntax}") from None
    seen: set[int] = set()
    for v in values:
        if v in seen:
            raise HeadlensError(f"`{name}` {text.strip()}: {v} is given twice")
        seen.add(v)
    return values


def _slice(text: str, num_layers: int, valid: str) -> list[int]:
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
    return list(range(num_layers))[slice(start, stop, step)]


LAYERS_SYNTAX = "use a slice like 7:35, a list like 1,4,9, or all"
KS_SYNTAX = "give positive integers separated by commas, e.g. 8,16,32"


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """Sorted layer indices. ``None``/``all``: every layer; ``7:35`` (a Python slice, step allowed), ``5``, or
    ``1,4,9``. Raises HeadlensError naming ``layers`` and the valid range otherwise (an empty text included)."""
    valid = f"valid layers are 0..{num_layers - 1}"
    if text is None or text.strip() == "all":
        return list(range(num_layers))
    if not text.strip():
        raise HeadlensError(f"`layers` {text!r} is empty: {LAYERS_SYNTAX} (every layer: all, or leave it out)")
    text = text.strip()
    if ":" in text:
        try:
            layers = _slice(text, num_layers, valid)
        except ValueError:
            raise HeadlensError(f"`layers` {text!r}: {LAYERS_SYNTAX}") from None
        if not layers:
            raise HeadlensError(f"`layers` {text} selects no layer ({valid})")
        return layers
    layers = _int_list(text, "layers", LAYERS_SYNTAX)
    for v in layers:
        if not 0 <= v < num_layers:
            raise HeadlensError(f"`layers` {text}: layer {v} is out of range ({valid})")
    return sorted(layers)


def parse_ks(text: str, head_dim: int | None = None) -> list[int]:
    """Sorted latent sizes from ``8,16,32``; each must be in 1..``head_dim`` when it is given."""
    if not text.strip():
        raise HeadlensError(f"`ks` {text!r} is empty: {KS_SYNTAX}")
    ks = sorted(_int_list(text, "ks", KS_SYNTAX))
    if ks[0] <= 0:
        raise HeadlensError(f"`ks` {text!r}: latent sizes must be positive integers, e.g. 8,16,32")
    if head_dim is not None and ks[-1] > head_dim:
        raise HeadlensError(f"`ks` {ks[-1]} is above head_dim {head_dim}: a head's OV circuit has rank <= {head_dim}; "
                            f"choose sizes in 1..{head_dim}")
    return ks
