"""What the diagram says about one module: its kind (norm, attention, MLP, linear), its parameter shapes, and
whether it is transparent (dropout, identity: not drawn, its output is its input)."""

from __future__ import annotations

import re

import torch
from torch import nn


def is_transparent(module: nn.Module) -> bool:
    """Whether ``module`` passes its input through (dropout, identity): such modules are not displayed."""
    return isinstance(module, (nn.Dropout, nn.Identity)) or "dropout" in type(module).__name__.lower()


def module_kind(name: str, module: nn.Module | None) -> str:
    """``"norm"`` | ``"attention"`` | ``"mlp"`` | ``"linear"`` | ``"other"``, from the class and the last name part."""
    cls = type(module).__name__.lower() if module is not None else ""
    last = name.rsplit(".", 1)[-1].lower()
    if "norm" in cls or "norm" in last or re.fullmatch(r"ln_?\w*", last):
        return "norm"
    if any(w in cls or w in last for w in ("attention", "attn")):
        return "attention"
    if any(w in cls or w in last for w in ("mlp", "moe", "feedforward", "feed_forward", "ffn", "intermediate",
                                            "experts")):
        return "mlp"
    if isinstance(module, nn.Linear) or cls == "conv1d":
        return "linear"
    return "other"


def _linear_shape(module: nn.Module) -> str | None:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if isinstance(module, nn.Linear):  # weight (out, in)
        return f"{w.shape[1]}→{w.shape[0]}"
    if type(module).__name__ == "Conv1D":  # GPT-2 stores weight (in, out)
        return f"{w.shape[0]}→{w.shape[1]}"
    return None


def param_summary(module: nn.Module | None, limit: int = 8) -> list[str]:
    """Readable parameter shapes: ``q_proj 48→64`` for linears, ``(48)`` for norm gains, else ``name [shape]``;
    at most ``limit`` items, then ``… (+N more)``."""
    if module is None:
        return []
    items: list[str] = []
    for rel, sub in module.named_modules():
        own = dict(sub.named_parameters(recurse=False))
        if not own:
            continue
        prefix = f"{rel} " if rel else ""
        shape = _linear_shape(sub)
        if shape is not None:
            items.append(f"{prefix}{shape}")
        elif "norm" in type(sub).__name__.lower() and "weight" in own and own["weight"].dim() == 1:
            items.append(f"{prefix or 'weight '}({own['weight'].shape[0]})")
        else:
            for pname, p in own.items():
                items.append(f"{rel + '.' if rel else ''}{pname} {list(p.shape)}")
    if len(items) > limit:
        items = items[:limit] + [f"… (+{len(items) - limit} more)"]
    return items
