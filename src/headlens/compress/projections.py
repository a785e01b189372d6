"""Where one layer's query, key and value heads sit in a loaded HuggingFace model.

The family's :class:`~headlens.layout.Layout` names the stored tensor of each role (``q``, ``k``, ``v``, or the fused
``qkv``) and each head's (rows, cols) block in it; the parameter is found as ``<rel>`` of the model's layer module
(:func:`headlens.residual.modules.find_layer`) and checked against the shape the checkpoint implies, so a model
loaded from another checkpoint is refused in one line. :func:`value_tensor` serves the value latents (their weights
are replaced in place), :func:`head_projection` the key latents (the projections' outputs are read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from headlens.errors import HeadlensError


@dataclass
class ValueTensor:
    """The model parameter that stores one layer's value weights, and where that layer's kv groups lie in it."""

    name: str  # the parameter's full name in the model (e.g. ``model.layers.0.self_attn.v_proj.weight``)
    checkpoint_name: str  # the same tensor's name in the checkpoint
    module: nn.Module  # the module holding it (the value or fused qkv projection: hook it for its input)
    param: nn.Parameter
    blocks: list  # per kv group, the :class:`~headlens.layout.Block` of its rows in ``param``


def value_tensor(model: nn.Module, ck, layer: int) -> ValueTensor:
    """The :class:`ValueTensor` of ``layer`` in ``model`` for the checkpoint ``ck`` it was loaded from.

    Raises HeadlensError (one line) when the model has no such layer or parameter, or when its shape is not the
    one the checkpoint's shape implies (a model from another checkpoint)."""
    where, role, module, param, blocks = _projection(model, ck, layer, "v", "value")
    return ValueTensor(name=where, checkpoint_name=ck.layer_keys(layer).name(role), module=module,
                       param=param, blocks=blocks)


def _projection(model: nn.Module, ck, layer: int, role: str, what: str) -> tuple:
    """(full name, stored role, module, parameter, per-head blocks) of ``role``'s projection ("q", "k" or "v") of
    ``layer`` in ``model``, checked against the shapes ``ck`` implies (one-line HeadlensError naming ``what``)."""
    from headlens.residual.modules import find_layer

    s, layout = ck.shape, ck.spec.layout
    n = s.num_heads if role == "q" else s.num_kv_heads
    blocks = [layout.head_block(role, h, s.num_heads, s.num_kv_heads, s.head_dim) for h in range(n)]
    stored = blocks[0].tensor  # the role itself, or "qkv"
    rel = getattr(layout, stored)
    path, layer_mod = find_layer(model, ck.spec, layer)
    mod_rel, attr = rel.rsplit(".", 1)
    where = f"{path}.{rel}"
    try:
        module = layer_mod.get_submodule(mod_rel)
    except AttributeError:
        module = None
    param = getattr(module, attr, None) if module is not None else None
    if not isinstance(param, torch.Tensor):
        raise HeadlensError(f"`model` has no tensor {where} holding layer {layer}'s {what} weights "
                            f"({ck.layer_keys(layer).name(stored)} in {ck.name})")
    want = layout.shapes(s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size)[stored]
    if tuple(param.shape) != want:
        raise HeadlensError(f"`model` tensor {where} has shape {tuple(param.shape)}, but {ck.name} implies {want}: "
                            "the model was not loaded from this checkpoint")
    return where, stored, module, param, blocks


@dataclass
class HeadProjection:
    """One layer's query or key heads in the model: the (possibly fused) projection module and where each head's
    rows lie in its weight, bias and output (``head_projection``)."""

    module: nn.Module
    param: nn.Parameter
    blocks: list  # per head (query heads for "q", kv heads for "k"), its Block in ``param``

    def _features(self, block) -> slice:
        rows, cols = block.index
        return cols if block.transposed else rows

    def select(self, output: torch.Tensor) -> torch.Tensor:
        """The module's output [B, T, features] narrowed to these heads' features, side by side [B, T, heads*hd]."""
        from headlens.residual.modules import first_tensor

        out = first_tensor(output).detach()
        return torch.cat([out[..., self._features(b)] for b in self.blocks], dim=-1)

    def weights(self) -> list[torch.Tensor]:
        """Per head its (hd, d) Linear-layout block, float64 on the CPU."""
        return [read_block(self.param, b) for b in self.blocks]

    def biases(self) -> list[torch.Tensor] | None:
        """Per head its bias (hd,) float64 on the CPU, or None for a projection without a bias."""
        bias = getattr(self.module, "bias", None)
        if not isinstance(bias, torch.Tensor):
            return None
        return [bias.detach()[self._features(b)].to("cpu", torch.float64) for b in self.blocks]


def head_projection(model: nn.Module, ck, layer: int, role: str) -> HeadProjection:
    """The :class:`HeadProjection` of ``role`` ("q", "k" or "v") of ``layer``, found and checked as :func:`value_tensor`
    finds the values."""
    _, _, module, param, blocks = _projection(model, ck, layer, role, {"q": "query", "k": "key", "v": "value"}[role])
    return HeadProjection(module=module, param=param, blocks=blocks)


def read_block(param: torch.Tensor, block) -> torch.Tensor:
    """The Linear-layout (hd, d) block of ``param``, float64, on the CPU."""
    t = param.detach()[block.index]
    return (t.T if block.transposed else t).to("cpu", torch.float64)
