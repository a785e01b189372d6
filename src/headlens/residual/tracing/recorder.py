"""Record what one layer does during a real forward: every module entered and left inside it (forward pre/post
hooks) and every torch call made meanwhile (a :class:`torch.overrides.TorchFunctionMode`).

Tensors are identified by ``(id(t), t._version)``; every tensor seen is kept alive until the recording is
dropped, so an ``id()`` is never reused. The layer's own forward hook stops the forward (the rest of the model
need not run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from headlens.arch import ArchSpec
from headlens.residual.modules import find_layer

TRACE_TOKENS = 5  # tokens of the traced forward

ADD_NAMES = {"add", "__add__", "__radd__", "__iadd__", "add_"}

TensorKey = tuple[int, int]  # (id(tensor), tensor._version)


def tensors_in(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors (not parameters) inside args/kwargs/outputs, in order."""
    if isinstance(obj, torch.Tensor):
        return [] if isinstance(obj, nn.Parameter) else [obj]
    if depth > 4:
        return []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o, depth + 1)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o, depth + 1)]
    return []


def tensor_key(t: torch.Tensor) -> TensorKey:
    """``(id(t), version)``: the same tensor object after an in-place change is a new value."""
    try:
        version = t._version
    except Exception:  # tensors without a version counter (inference mode)
        version = 0
    return id(t), version


def main_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | None]:
    """The module's hidden-states input and how it was passed: ``args[0]``, ``kwargs['hidden_states']``, ..."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], "args[0]"
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs, "kwargs['hidden_states']"
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return v, f"kwargs[{k!r}]"
    return None, None


class _StopForward(Exception):
    """Raised by the layer's forward hook: the rest of the model need not run."""


@dataclass
class Call:
    """One module call inside the layer (the layer itself is call 0)."""

    idx: int  # position in Recording.calls
    name: str  # relative to the layer ("" for the layer itself)
    module: nn.Module  # the module called
    parent: int | None  # index of the enclosing call
    event: int  # index of its "enter" event
    in_keys: list  # keys of every tensor it received
    main_key: tuple | None  # key of its hidden-states input
    via: str | None  # how that input was passed (see main_input)
    in_shape: list[int] | None = None  # shape of the hidden-states input
    out_keys: list = field(default_factory=list)  # keys of every tensor it returned
    output_kind: str | None = None  # "tensor" | "tuple" | the output's class name
    out_shape: list[int] | None = None  # shape of its first output tensor
    exited: bool = False  # whether its forward hook ran


@dataclass
class Op:
    """One torch call with tensor results, made while the layer ran."""

    name: str  # the function's __name__, e.g. "add", "view"
    in_keys: list  # keys of its tensor inputs
    out_keys: list  # keys of its tensor outputs
    operands: tuple | None  # (a, b) keys of a tensor + tensor addition
    scope: tuple  # indices of the calls open when it ran
    out_shape: list[int] | None  # shape of its first output


class Recorder(TorchFunctionMode):
    """Records torch calls (and module enters/exits, through hooks) while the traced layer runs."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.stack: list[int] = []
        self.events: list[tuple[str, int]] = []  # ("op", i) | ("enter", call) | ("exit", call)
        self.ops: list[Op] = []
        self.calls: list[Call] = []
        self.keep: list[torch.Tensor] = []  # every seen tensor stays alive, so id() is never reused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        ins = tensors_in((args, kwargs))
        in_keys = [tensor_key(t) for t in ins]
        name = getattr(func, "__name__", "") or ""
        operands = None
        if name in ADD_NAMES:
            a = args[0] if args else kwargs.get("input")
            b = args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                operands = (tensor_key(a), tensor_key(b))
        out = func(*args, **kwargs)
        outs = tensors_in(out)
        if not outs:  # metadata queries (.shape, .dtype, .size()) are no data flow
            return out
        self.keep.extend(ins)
        self.keep.extend(outs)
        self.ops.append(Op(name, in_keys, [tensor_key(t) for t in outs], operands, tuple(self.stack),
                           list(outs[0].shape) if outs else None))
        self.events.append(("op", len(self.ops) - 1))
        return out

    def hooks(self, layer: nn.Module) -> list:
        """Register the enter/exit hooks on ``layer`` and every module inside it; returns the handles."""
        handles = []
        for name, module in layer.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(self._post(name), with_kwargs=True, prepend=True))
        return handles

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            if name == "" and not self.calls:
                self.active = True
            if not self.active:
                return None
            ins = tensors_in((args, kwargs))
            main, via = main_input(args, kwargs)
            self.keep.extend(ins)
            call = Call(len(self.calls), name, module, self.stack[-1] if self.stack else None, len(self.events),
                        [tensor_key(t) for t in ins], tensor_key(main) if main is not None else None, via,
                        list(main.shape) if main is not None else None)
            self.calls.append(call)
            self.events.append(("enter", call.idx))
            self.stack.append(call.idx)
            return None

        return hook

    def _post(self, name: str):
        def hook(module, args, kwargs, output):
            if not self.active or not self.stack:
                return None
            call = self.calls[self.stack.pop()]
            outs = tensors_in(output)
            self.keep.extend(outs)
            call.out_keys = [tensor_key(t) for t in outs]
            call.out_shape = list(outs[0].shape) if outs else None
            call.output_kind = ("tensor" if isinstance(output, torch.Tensor) else
                                "tuple" if isinstance(output, (tuple, list)) else type(output).__name__)
            call.exited = True
            self.events.append(("exit", call.idx))
            if call.idx == 0:
                self.active = False
                raise _StopForward
            return None

        return hook


def _trace_input(model: nn.Module) -> dict:
    """``{"input_ids": (1, TRACE_TOKENS)}`` of fixed token ids below the vocabulary size."""
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 100
    ids = [(7 + 13 * i) % vocab for i in range(TRACE_TOKENS)]
    from headlens.io.placement import input_device

    device = input_device(model)
    input_ids = torch.tensor([ids], device=device)  # (1, TRACE_TOKENS)
    assert input_ids.shape == (1, TRACE_TOKENS), input_ids.shape
    return {"input_ids": input_ids}


def record_layer(model: nn.Module, spec: ArchSpec, layer: int, inputs: dict | None = None) -> tuple[str, Recorder]:
    """Run one forward of ``model`` (``inputs``, or TRACE_TOKENS fixed token ids) and record what layer ``layer``
    does. Returns (the layer's real path, the recording). The model's hooks and training mode are restored."""
    layer_path, layer_module = find_layer(model, spec, layer)
    rec = Recorder()
    handles = rec.hooks(layer_module)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), rec:
            try:
                model(**(inputs or _trace_input(model)))
            except _StopForward:
                pass
    finally:
        rec.active = False
        for h in handles:
            h.remove()
        model.train(was_training)
    if not rec.calls or not rec.calls[0].exited:
        raise RuntimeError(f"layer {layer} ({layer_path}) did not run during the forward pass")
    return layer_path, rec
