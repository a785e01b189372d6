"""The one module finder: a layer, a module inside it, or the final norm, by its real path in the loaded model.

Paths come from the spec table (``layers_path``, relative module names); the prefix in front of them
(``model.``, ``transformer.``, ``language_model.model.`` ...) is whatever the loaded model uses. In multimodal
models a vision tower has layers with the same names: the language model's are preferred.
"""

from __future__ import annotations

import torch
from torch import nn

from headlens.arch import ArchSpec
from headlens.errors import HeadlensError


def _language_model_first(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    lm = [(n, m) for n, m in found if "language_model" in n or "text_model" in n]
    return lm or found


def find_layer(model: nn.Module, spec: ArchSpec, layer: int) -> tuple[str, nn.Module]:
    """(real path, module) of decoder/encoder layer ``layer``.

    An index past the end of the layer list is a one-line error naming the valid range.
    """
    suffix = f"{spec.layers_path}.{layer}"
    found = [(n, m) for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    if not found:
        lists = [(n, m) for n, m in model.named_modules()
                 if (n == spec.layers_path or n.endswith("." + spec.layers_path)) and isinstance(m, nn.ModuleList)]
        if lists and layer >= 0:
            n = len(lists[0][1])
            raise HeadlensError(f"layer {layer} is out of range: the model has {n} layers (valid 0..{n - 1})")
        raise HeadlensError(f"layer module '{suffix}' not found in the loaded {type(model).__name__}")
    return _language_model_first(found)[0]


def find_module(model: nn.Module, spec: ArchSpec, layer: int, rel: str) -> nn.Module:
    """The module ``<layer>.<rel>`` of ``model`` (``rel`` relative to the layer, e.g. ``self_attn``)."""
    path, mod = find_layer(model, spec, layer)
    try:
        return mod.get_submodule(rel) if rel else mod
    except AttributeError:
        raise HeadlensError(f"module '{spec.layers_path}.{layer}.{rel}' not found in the loaded "
                            f"{type(model).__name__}") from None


def final_norm(model: nn.Module, spec: ArchSpec) -> tuple[str, nn.Module] | None:
    """(path, module) of the norm after the last layer, or None when the family has none."""
    if not spec.final_norm:
        return None
    layer_list = f"{spec.layers_path}."
    found = [(n, m) for n, m in model.named_modules()
             if (n == spec.final_norm or n.endswith("." + spec.final_norm)) and layer_list not in n]
    return (_language_model_first(found) or [None])[0]


def count_layers(model: nn.Module, spec: ArchSpec) -> int:
    """Number of layers in the model's layer list."""
    path, _ = find_layer(model, spec, 0)
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    return len(parent)


def first_tensor(obj) -> torch.Tensor:
    """The hidden states in a module's output: the tensor itself, ``output[0]``, or ``last_hidden_state``."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    if hasattr(obj, "last_hidden_state"):
        return obj.last_hidden_state
    raise HeadlensError(f"cannot find a tensor in a module output of type {type(obj).__name__}")


def hidden_states_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module received: ``kwargs['hidden_states']`` or its first positional input."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        raise HeadlensError("the hooked module received no hidden_states tensor")
    return x


def find_blocks(model: nn.Module) -> str:
    """The real path of the model's layer list, for a family the spec table does not know: the largest (by
    parameters) ``nn.ModuleList`` of blocks of one class, the language model's first in a multimodal model.

    Raises HeadlensError when the model has no such list."""
    found: list[tuple[str, int]] = []
    for name, m in model.named_modules():
        if not name or not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(b) for b in m}) != 1 or not any(True for _ in m[0].children()):
            continue  # mixed classes, or a list of leaf modules (Linear experts), are not blocks
        found.append((name, sum(p.numel() for p in m.parameters())))
    found = [(n, size) for n, size in found if not any(n.startswith(o + ".") for o, _ in found)]  # outermost
    if not found:
        raise HeadlensError(f"cannot find the layers of {type(model).__name__}: no nn.ModuleList of identical blocks")
    lm = [(n, size) for n, size in found if "language_model" in n or "text_model" in n]
    return max(lm or found, key=lambda item: item[1])[0]
