"""One decoder layer drawn from the model itself: its modules in call order, its norms, and where each skip
connection branches off the residual stream and joins back; which hook captures each residual site.

:func:`trace_layer` runs one short forward of the real HuggingFace model with forward pre/post hooks on the
modules inside ``<layers_path>.<layer>`` and a :class:`torch.overrides.TorchFunctionMode` that records every
torch call made while that layer runs (tensor identities are kept alive so ``id()`` is never reused). From that
record it follows the residual stream: it starts at the layer's input; an addition with exactly one operand on
the stream is a residual *join* and its result is on the stream; a norm applied to a join result that nothing
else reads (post-norm, BERT) continues the stream. The other operand of a join is traced back, through the
real producer -> consumer edges, to the modules on that skip's branch.

Display granularity: the layer's direct children, expanded only where a child contains a join (BERT's
``attention.output`` and ``output`` hold their own ``LayerNorm(dense(x) + residual)``). Dropout and Identity
modules are transparent.

:func:`template_layer_graph` builds the same structure from the spec table (:mod:`headlens.arch`); it is used
only when tracing raises, and the graph then says so.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from headlens.arch import ArchSpec
from headlens.errors import HeadlensError
from headlens.io.files import atomic_path

STYLE_NAMES = {"pre": "pre-norm", "sandwich": "sandwich-norm", "parallel": "parallel", "post": "post-norm"}
STYLE_HELP = {
    "pre": "each branch reads a norm of the stream; its output is added to the stream unnormed",
    "sandwich": "each branch reads a norm of the stream and is normed again before it is added",
    "parallel": "attention and MLP read norms of the same stream tensor; both are added in one join",
    "post": "each join's result is normed, and the norm's output is the stream",
}
TRACE_TOKENS = 5

_ADD_NAMES = {"add", "__add__", "__radd__", "__iadd__", "add_"}
# Calls that only reshape, cast or copy one tensor: their result is the same value on the stream.
_SHAPE_OPS = {
    "view", "reshape", "contiguous", "to", "float", "double", "half", "bfloat16", "type", "type_as", "clone",
    "detach", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "dropout", "dropout_",
    "alpha_dropout", "feature_alpha_dropout", "cpu", "cuda",
}


# ------------------------------------------------------------------------------------------------ graph


@dataclass
class Node:
    """One displayed module of the layer, in call order."""

    id: str  # "n0", "n1", ...
    name: str  # path relative to the layer, e.g. "self_attn", "attention.output.dense"
    path: str  # path in the model, e.g. "model.layers.3.self_attn"
    cls: str  # class name
    kind: str  # "norm" | "attention" | "mlp" | "linear" | "other"
    params: list[str]  # parameter shapes, e.g. ["q_proj 48→64", ...]
    role: str = "branch"  # "branch" (on a skip's branch) | "stream" (a post-norm on the residual stream) | "other"
    out_shape: list[int] | None = None  # shape of its (first) output in the traced forward
    input_via: str | None = None  # how its main input was passed: "args[0]" | "kwargs['hidden_states']"
    output_kind: str | None = None  # "tensor" | "tuple" (then its output[0] is the hidden states)


@dataclass
class Join:
    """One residual addition: the stream (skip) plus what a branch computed from it."""

    id: str  # "j1", "j2", ...
    index: int  # 1-based
    skip_from: str  # element the skip branches off: "in", a previous join "jK", or a post-norm node on the stream
    branch: list[str]  # node ids on the joined branch, call order
    terminals: list[str]  # node ids whose outputs are added (through dropout and branch-merging additions)
    reads_from: list[str]  # stream elements the branch reads
    result: str  # the residual site after this join: "resid_mid", "resid_post", "after join K"


@dataclass
class Edge:
    src: str
    dst: str
    kind: str  # "data" (producer -> consumer) | "skip" (the residual operand of a join)


@dataclass
class LayerGraph:
    """The structure of one layer. Element ids: "in" (layer input), "out" (layer output), nodes, joins."""

    model_class: str
    model_type: str | None
    family: str
    layer: int
    layer_path: str  # real path of the layer in the model, e.g. "layers.3" or "model.layers.3"
    layer_class: str
    source: str  # "trace" | "template"
    source_note: str  # "derived from a traced forward (...)" | "template for <family> (...)"
    style: str  # "pre" | "sandwich" | "parallel" | "post"
    nodes: list[Node]
    joins: list[Join]
    edges: list[Edge]
    order: list[str]  # element ids top to bottom: "in", nodes and joins in call order, "out"
    stream: list[str]  # elements on the residual stream, in order ("in", joins, post-norms)
    mid_consumers: list[str]  # node ids that read the stream between the first and second join (resid_mid)
    input_shape: list[int] | None = None
    input_via: str | None = None  # how the layer's hidden states are passed to it
    output_kind: str | None = None  # "tensor" | "tuple": what the layer returns
    extra: dict = field(default_factory=dict)

    # -- look-ups
    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def node_named(self, name: str) -> Node | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    def names(self, ids) -> list[str]:
        return [self.node(i).name for i in ids]

    def label(self, element: str) -> str:
        if element == "in":
            return "resid_pre (layer input)"
        if element == "out":
            return "resid_post (layer output)"
        if element.startswith("j"):
            return f"join {element[1:]}"
        return self.node(element).name

    @property
    def style_name(self) -> str:
        return STYLE_NAMES.get(self.style, self.style)

    def to_json(self) -> dict:
        return {
            "model_class": self.model_class, "model_type": self.model_type, "family": self.family,
            "layer": self.layer, "layer_path": self.layer_path, "layer_class": self.layer_class,
            "source": self.source, "source_note": self.source_note, "style": self.style,
            "style_name": self.style_name, "input_shape": self.input_shape, "input_via": self.input_via,
            "output_kind": self.output_kind,
            "nodes": [asdict(n) for n in self.nodes],
            "joins": [asdict(j) | {"skip_from_label": self.label(j.skip_from),
                                   "branch_names": self.names(j.branch),
                                   "terminal_names": self.names(j.terminals)} for j in self.joins],
            "edges": [asdict(e) for e in self.edges], "order": self.order, "stream": self.stream,
            "mid_consumers": self.names(self.mid_consumers), **self.extra,
        }


# ---------------------------------------------------------------------------------------- model helpers


def find_layer(model: nn.Module, spec: ArchSpec, layer: int) -> tuple[str, nn.Module]:
    """(real path, module) of ``<...><layers_path>.<layer>``; the language model's in multimodal models."""
    suffix = f"{spec.layers_path}.{layer}"
    found = [(n, m) for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    if not found:
        lists = [(n, m) for n, m in model.named_modules()
                 if (n == spec.layers_path or n.endswith("." + spec.layers_path)) and isinstance(m, nn.ModuleList)]
        if lists:
            n = len(lists[0][1])
            raise HeadlensError(f"layer {layer} is out of range: the model has {n} layers (valid 0..{n - 1})")
        raise HeadlensError(f"module '{suffix}' not found in the loaded {type(model).__name__}")
    lm = [(n, m) for n, m in found if "language_model" in n or "text_model" in n]
    return (lm or found)[0]


def _is_transparent(module: nn.Module) -> bool:
    return isinstance(module, (nn.Dropout, nn.Identity)) or "dropout" in type(module).__name__.lower()


def _kind(name: str, module: nn.Module | None) -> str:
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
    if isinstance(module, nn.Linear):
        return f"{w.shape[1]}→{w.shape[0]}"
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return f"{w.shape[0]}→{w.shape[1]}"
    return None


def param_summary(module: nn.Module | None, limit: int = 8) -> list[str]:
    """Readable parameter shapes: ``q_proj 48→64`` for linears, ``(48)`` for norm gains, else ``name [shape]``."""
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


def _tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors (not parameters) inside args/kwargs/outputs, in order."""
    if isinstance(obj, torch.Tensor):
        return [] if isinstance(obj, nn.Parameter) else [obj]
    if depth > 4:
        return []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o, depth + 1)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o, depth + 1)]
    return []


def _key(t: torch.Tensor) -> tuple[int, int]:
    try:
        version = t._version
    except Exception:  # tensors without a version counter (inference mode)
        version = 0
    return id(t), version


def _main_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | None]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], "args[0]"
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs, "kwargs['hidden_states']"
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return v, f"kwargs[{k!r}]"
    return None, None


# ------------------------------------------------------------------------------------------- recording


class _StopForward(Exception):
    """Raised by the layer's forward hook: the rest of the model need not run."""


@dataclass
class _Call:
    idx: int
    name: str  # relative to the layer ("" for the layer itself)
    module: nn.Module
    parent: int | None
    event: int  # index of its "enter" event
    in_keys: list
    main_key: tuple | None
    via: str | None
    in_shape: list[int] | None = None
    out_keys: list = field(default_factory=list)
    output_kind: str | None = None
    out_shape: list[int] | None = None
    exited: bool = False


@dataclass
class _Op:
    name: str
    in_keys: list
    out_keys: list
    operands: tuple | None  # (a, b) keys of a tensor + tensor addition
    scope: tuple  # open call indices
    out_shape: list[int] | None


class _Recorder(TorchFunctionMode):
    """Records torch calls (and module enters/exits, through hooks) while the traced layer runs."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.stack: list[int] = []
        self.events: list[tuple[str, int]] = []  # ("op", i) | ("enter", call) | ("exit", call)
        self.ops: list[_Op] = []
        self.calls: list[_Call] = []
        self.keep: list[torch.Tensor] = []  # every seen tensor stays alive, so id() is never reused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        ins = _tensors((args, kwargs))
        in_keys = [_key(t) for t in ins]
        name = getattr(func, "__name__", "") or ""
        operands = None
        if name in _ADD_NAMES:
            a = args[0] if args else kwargs.get("input")
            b = args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                operands = (_key(a), _key(b))
        out = func(*args, **kwargs)
        outs = _tensors(out)
        if not outs:  # metadata queries (.shape, .dtype, .size()) are no data flow
            return out
        self.keep.extend(ins)
        self.keep.extend(outs)
        self.ops.append(_Op(name, in_keys, [_key(t) for t in outs], operands, tuple(self.stack),
                            list(outs[0].shape) if outs else None))
        self.events.append(("op", len(self.ops) - 1))
        return out

    def hooks(self, layer: nn.Module) -> list:
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
            ins = _tensors((args, kwargs))
            main, via = _main_input(args, kwargs)
            self.keep.extend(ins)
            call = _Call(len(self.calls), name, module, self.stack[-1] if self.stack else None, len(self.events),
                         [_key(t) for t in ins], _key(main) if main is not None else None, via,
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
            outs = _tensors(output)
            self.keep.extend(outs)
            call.out_keys = [_key(t) for t in outs]
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
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 100
    ids = [(7 + 13 * i) % vocab for i in range(TRACE_TOKENS)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {"input_ids": torch.tensor([ids], device=device)}


def record_layer(model: nn.Module, spec: ArchSpec, layer: int, inputs: dict | None = None) -> tuple[str, _Recorder]:
    """Run one forward of ``model`` and record what layer ``layer`` does."""
    layer_path, layer_module = find_layer(model, spec, layer)
    rec = _Recorder()
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


# -------------------------------------------------------------------------------------------- analysis


class _Flow:
    """Tensor lineage of a recording: aliases (reshapes, casts, dropout) and parents of every op result."""

    def __init__(self, rec: _Recorder):
        self.rec = rec
        self.alias: dict = {}
        self.parents: dict = {}
        self.latest: dict[int, tuple] = {}
        for op in rec.ops:
            for k in op.out_keys:
                if k in op.in_keys:
                    continue
                self.parents.setdefault(k, list(op.in_keys))
                if op.name in _SHAPE_OPS and len(op.in_keys) == 1:
                    self.alias.setdefault(k, op.in_keys[0])
                self._seen(k)
            for k in op.in_keys:
                self._seen(k)
        for c in rec.calls:
            if _is_transparent(c.module) and c.main_key is not None:
                for k in c.out_keys:
                    if k != c.main_key:
                        self.alias.setdefault(k, c.main_key)
            for k in c.in_keys + c.out_keys:
                self._seen(k)

    def _seen(self, k: tuple) -> None:
        prev = self.latest.get(k[0])
        if prev is None or prev[1] < k[1]:
            self.latest[k[0]] = k

    def root(self, k: tuple) -> tuple:
        seen = set()
        while k in self.alias and k not in seen:
            seen.add(k)
            k = self.alias[k]
        return k


def _ancestors(calls: list[_Call], idx: int) -> list[int]:
    out = []
    p = calls[idx].parent
    while p is not None:
        out.append(p)
        p = calls[p].parent
    return out


def _stream_pass(rec: _Recorder, flow: _Flow, banned: set[int]):
    """Walk the events in order: find joins and post-norm continuations (norm calls not in ``banned``)."""
    calls = rec.calls
    layer_call = calls[0]
    stream = {flow.root(layer_call.main_key)}
    joins: list[dict] = []
    join_results: dict = {}
    continuations: list[tuple[int, tuple]] = []  # (norm call idx, join result key it continues)
    in_shape = layer_call.in_shape
    for kind, i in rec.events:
        if kind == "op":
            op = rec.ops[i]
            if op.operands is None or not op.out_keys:
                continue
            a, b = (flow.root(k) for k in op.operands)
            on_a, on_b = a in stream, b in stream
            if on_a == on_b:
                continue
            if in_shape is not None and op.out_shape != in_shape:
                continue
            res = flow.root(op.out_keys[0])
            joins.append(dict(op=i, event=None, residual=op.operands[0] if on_a else op.operands[1],
                              branch=op.operands[1] if on_a else op.operands[0], result=op.out_keys[0],
                              scope=op.scope))
            stream.add(res)
            join_results[res] = len(joins) - 1
        elif kind == "exit":
            c = calls[i]
            if i in banned or c.main_key is None or not c.out_keys or _kind(c.name, c.module) != "norm":
                continue
            src = flow.root(c.main_key)
            if src in join_results:
                out = flow.root(c.out_keys[0])
                stream.add(out)
                continuations.append((i, src))
    # event positions of the joins
    op_event = {i: e for e, (kind, i) in enumerate(rec.events) if kind == "op"}
    for j in joins:
        j["event"] = op_event[j["op"]]
    return joins, continuations


def _used_elsewhere(rec: _Recorder, flow: _Flow, key: tuple, norm_idx: int) -> bool:
    """Whether the join result ``key`` is read by anything but the norm call ``norm_idx`` (and its insides)."""
    calls = rec.calls
    if flow.root(calls[0].out_keys[0]) == key if calls[0].out_keys else False:
        return True
    inside = {norm_idx}
    for c in calls:
        if norm_idx in _ancestors(calls, c.idx):
            inside.add(c.idx)
    for c in calls[1:]:
        if c.idx in inside:
            continue
        if any(flow.root(k) == key for k in c.in_keys):
            return True
    for op in rec.ops:
        if any(s in inside for s in op.scope):
            continue
        if op.name in _SHAPE_OPS and len(op.in_keys) == 1:
            continue  # a reshape/cast of it: its uses are checked through the alias
        if any(flow.root(k) == key for k in op.in_keys):
            return True
    return False


def _analyze(model: nn.Module, spec: ArchSpec, layer: int, layer_path: str, rec: _Recorder) -> LayerGraph:
    calls = rec.calls
    flow = _Flow(rec)
    layer_call = calls[0]
    if layer_call.main_key is None:
        raise RuntimeError("the layer was called without a hidden-states tensor")

    banned: set[int] = set()
    for _ in range(4):
        joins_raw, conts = _stream_pass(rec, flow, banned)
        rejected = {i for i, key in conts if _used_elsewhere(rec, flow, key, i)}
        if rejected <= banned:
            break
        banned |= rejected
    conts = [(i, key) for i, key in conts if i not in banned]
    if not joins_raw:
        raise RuntimeError("no residual addition found in the layer's forward")

    # -- display granularity: direct children, expanded where a join (or a stream norm) sits inside
    expanded: set[int] = set()
    for j in joins_raw:
        expanded.update(s for s in j["scope"] if s != 0)
    for i, _ in conts:
        expanded.update(a for a in _ancestors(calls, i) if a != 0)
    display: list[_Call] = [c for c in calls[1:]
                            if c.parent is not None and (c.parent == 0 or c.parent in expanded)
                            and c.idx not in expanded and not _is_transparent(c.module)]
    display_of: dict[int, str] = {}
    nodes: list[Node] = []
    name_count: dict[str, int] = {}
    for c in display:
        name_count[c.name] = name_count.get(c.name, 0) + 1
        label = c.name if name_count[c.name] == 1 else f"{c.name} (call {name_count[c.name]})"
        node = Node(id=f"n{len(nodes)}", name=label, path=f"{layer_path}.{c.name}", cls=type(c.module).__name__,
                    kind=_kind(c.name, c.module), params=param_summary(c.module), role="other",
                    out_shape=c.out_shape, input_via=c.via, output_kind=c.output_kind)
        nodes.append(node)
        display_of[c.idx] = node.id

    def display_ancestor(idx: int) -> str | None:
        for a in [idx] + _ancestors(calls, idx):
            if a in display_of:
                return display_of[a]
        return None

    # -- producers
    producer: dict = {flow.root(layer_call.main_key): "in"}
    for n, j in enumerate(joins_raw, start=1):
        producer[flow.root(j["result"])] = f"j{n}"
    stream_nodes: dict[str, int] = {}
    for i, _key_ in conts:
        nid = display_ancestor(i)
        if nid is not None:
            stream_nodes[nid] = i
    for c in display:
        for k in c.out_keys:
            if k not in c.in_keys:
                producer.setdefault(k, display_of[c.idx])
                producer.setdefault(flow.root(k), display_of[c.idx])

    memo: dict = {}

    def resolve(key: tuple, depth: int = 0) -> set[str]:
        if key in producer:
            return {producer[key]}
        if key in memo:
            return memo[key]
        memo[key] = set()
        if depth > 200:
            return set()
        out: set[str] = set()
        if key in flow.alias:
            out = resolve(flow.alias[key], depth + 1)
        elif key in flow.parents:
            for p in flow.parents[key]:
                out |= resolve(p, depth + 1)
        else:
            latest = flow.latest.get(key[0])
            if latest is not None and latest != key:
                out = resolve(latest, depth + 1)
        memo[key] = out
        return out

    edges: list[Edge] = []

    def add_edge(src: str, dst: str, kind: str) -> None:
        if src != dst and not any(e.src == src and e.dst == dst and e.kind == kind for e in edges):
            edges.append(Edge(src, dst, kind))

    for c in display:
        nid = display_of[c.idx]
        for k in c.in_keys:
            for src in sorted(resolve(k), key=_element_sort):
                add_edge(src, nid, "data")
    for n, j in enumerate(joins_raw, start=1):
        for src in sorted(resolve(j["branch"]), key=_element_sort):
            add_edge(src, f"j{n}", "data")
        for src in sorted(resolve(j["residual"]), key=_element_sort):
            add_edge(src, f"j{n}", "skip")
    out_srcs = resolve(layer_call.out_keys[0]) if layer_call.out_keys else set()
    for src in sorted(out_srcs, key=_element_sort):
        add_edge(src, "out", "data")

    # -- stream, branches, roles
    stream_ids = {"in"} | {f"j{n}" for n in range(1, len(joins_raw) + 1)} | set(stream_nodes)
    preds: dict[str, list[str]] = {}
    for e in edges:
        if e.kind == "data":
            preds.setdefault(e.dst, []).append(e.src)
    joins: list[Join] = []
    n_joins = len(joins_raw)
    for n, j in enumerate(joins_raw, start=1):
        jid = f"j{n}"
        terminals = [s for s in preds.get(jid, []) if s not in stream_ids]
        branch: set[str] = set()
        reads: list[str] = []
        todo = list(terminals)
        while todo:
            x = todo.pop()
            if x in branch:
                continue
            branch.add(x)
            for p in preds.get(x, []):
                if p in stream_ids:
                    if p not in reads:
                        reads.append(p)
                elif p not in branch:
                    todo.append(p)
        skip = sorted(resolve(j["residual"]), key=_element_sort)
        result = "resid_post" if n == n_joins else ("resid_mid" if n == 1 and n_joins == 2 else f"after join {n}")
        joins.append(Join(id=jid, index=n, skip_from=skip[0] if skip else "in",
                          branch=[x.id for x in nodes if x.id in branch],
                          terminals=[x.id for x in nodes if x.id in terminals],
                          reads_from=sorted(reads, key=_element_sort), result=result))
    for node in nodes:
        if node.id in stream_nodes:
            node.role = "stream"
        elif any(node.id in j.branch for j in joins):
            node.role = "branch"

    # -- order and stream sequence
    position: dict[str, int] = {}
    for c in display:
        position[display_of[c.idx]] = c.event
    for n, j in enumerate(joins_raw, start=1):
        position[f"j{n}"] = j["event"]
    order = ["in"] + sorted(position, key=lambda x: position[x]) + ["out"]
    stream_seq = ["in"] + [x for x in order if x in stream_ids and x != "in"]

    rank = {x: i for i, x in enumerate(order)}
    edges.sort(key=lambda e: (rank[e.dst], rank[e.src], e.kind))
    style = _style(nodes, joins, stream_nodes)
    mid = _mid_consumers(edges, joins, stream_seq)
    return LayerGraph(
        model_class=type(model).__name__, model_type=getattr(getattr(model, "config", None), "model_type", None),
        family=spec.family, layer=layer, layer_path=layer_path, layer_class=type(layer_call.module).__name__,
        source="trace", source_note=f"derived from a traced forward ({TRACE_TOKENS} tokens through the real model)",
        style=style, nodes=nodes, joins=joins, edges=edges, order=order, stream=stream_seq, mid_consumers=mid,
        input_shape=layer_call.in_shape, input_via=layer_call.via, output_kind=layer_call.output_kind,
    )


def _element_sort(x: str) -> tuple:
    if x == "in":
        return (0, 0)
    if x == "out":
        return (3, 0)
    return (1 if x.startswith("n") else 2, int(x[1:]))


def _style(nodes: list[Node], joins: list[Join], stream_nodes) -> str:
    if stream_nodes:
        return "post"
    if any(len(j.terminals) > 1 for j in joins):
        return "parallel"
    kinds = {n.id: n.kind for n in nodes}
    if joins and all(j.terminals and all(kinds[t] == "norm" for t in j.terminals) for j in joins):
        return "sandwich"
    return "pre"


def _mid_consumers(edges: list[Edge], joins: list[Join], stream_seq: list[str]) -> list[str]:
    """Nodes that read the stream between the first and the second join."""
    if len(joins) < 2:
        return []
    first, second = stream_seq.index("j1"), stream_seq.index("j2")
    head = stream_seq[second - 1] if second - 1 >= first else "j1"
    return [e.dst for e in edges if e.src == head and e.kind == "data" and e.dst.startswith("n")]


def trace_layer(model: nn.Module, spec: ArchSpec, layer: int, inputs: dict | None = None) -> LayerGraph:
    """Derive layer ``layer``'s structure from one forward of ``model`` (see the module docstring)."""
    layer_path, rec = record_layer(model, spec, layer, inputs)
    return _analyze(model, spec, layer, layer_path, rec)


# -------------------------------------------------------------------------------------------- template


def _strip_weight(name: str | None) -> str | None:
    return name[: -len(".weight")] if name and name.endswith(".weight") else name


def template_layer_graph(model: nn.Module, spec: ArchSpec, layer: int, reason: str = "") -> LayerGraph:
    """The layer's structure from the spec table (used when tracing fails); shapes read off the model."""
    layer_path, layer_module = find_layer(model, spec, layer)
    subs = dict(layer_module.named_modules())
    config = getattr(model, "config", None)
    style = spec.residual
    if style == "parallel" and spec.parallel_flag and not getattr(config, spec.parallel_flag, True):
        style = "pre"
    nodes: list[Node] = []

    def node(name: str | None, role: str = "branch") -> str:
        name = name or "?"
        module = subs.get(name)
        n = Node(id=f"n{len(nodes)}", name=name, path=f"{layer_path}.{name}",
                 cls=type(module).__name__ if module is not None else "?", kind=_kind(name, module),
                 params=param_summary(module), role=role)
        nodes.append(n)
        return n.id

    def sibling_norm(name: str | None) -> str | None:
        parent = name.rsplit(".", 1)[0] if name and "." in name else ""
        for n, m in subs.items():
            if n and n.rsplit(".", 1)[0] == parent and n != parent and "." in n and "norm" in type(m).__name__.lower():
                return n
        return None

    norm = _strip_weight(spec.norm)
    mlp_name = "mlp" if "mlp" in subs else spec.mlp_out
    order: list[str] = ["in"]
    edges: list[Edge] = []
    joins: list[Join] = []
    stream = ["in"]

    def chain(start: str, ids: list[str]) -> None:
        prev = start
        for i in ids:
            edges.append(Edge(prev, i, "data"))
            prev = i

    if style in ("pre", "sandwich"):
        a = [node(norm), node(spec.attn_module if style == "sandwich" else spec.attn_out)]
        if style == "sandwich":
            a.append(node(spec.attn_out))
        m = [node(spec.mid_input), node(mlp_name if style == "sandwich" else spec.mlp_out)]
        if style == "sandwich":
            m.append(node(spec.mlp_out))
        order += a + ["j1"] + m + ["j2", "out"]
        chain("in", a + ["j1"])
        edges.append(Edge("in", "j1", "skip"))
        chain("j1", m + ["j2"])
        edges.append(Edge("j1", "j2", "skip"))
        edges.append(Edge("j2", "out", "data"))
        joins = [Join("j1", 1, "in", a, [a[-1]], ["in"], "resid_mid"),
                 Join("j2", 2, "j1", m, [m[-1]], ["j1"], "resid_post")]
        stream += ["j1", "j2"]
        mid = [m[0]]
    elif style == "parallel":
        a = [node(norm), node(spec.attn_out)]
        m = [node(spec.mid_input), node(spec.mlp_out)]
        order += a + m + ["j1", "out"]
        chain("in", a + ["j1"])
        chain("in", m + ["j1"])
        edges.append(Edge("in", "j1", "skip"))
        edges.append(Edge("j1", "out", "data"))
        joins = [Join("j1", 1, "in", a + m, [a[-1], m[-1]], ["in"], "resid_post")]
        stream += ["j1"]
        mid = []
    else:  # post
        a = [node(spec.attn_module), node(spec.attn_out)]
        ln1 = node(sibling_norm(spec.attn_out), role="stream")
        m = [node(spec.mid_input), node(spec.mlp_out)]
        ln2 = node(sibling_norm(spec.mlp_out) or _strip_weight(spec.prev_norm), role="stream")
        order += a + ["j1", ln1] + m + ["j2", ln2, "out"]
        chain("in", a + ["j1", ln1] + m + ["j2", ln2, "out"])
        edges.append(Edge("in", "j1", "skip"))
        edges.append(Edge(ln1, "j2", "skip"))
        joins = [Join("j1", 1, "in", a, [a[-1]], ["in"], "resid_mid"),
                 Join("j2", 2, ln1, m, [m[-1]], [ln1], "resid_post")]
        stream += ["j1", ln1, "j2", ln2]
        mid = [m[0]]
    note = f"template for {spec.family}"
    if reason:
        note += f" (tracing failed: {reason})"
    return LayerGraph(
        model_class=type(model).__name__, model_type=getattr(config, "model_type", None), family=spec.family,
        layer=layer, layer_path=layer_path, layer_class=type(layer_module).__name__, source="template",
        source_note=note, style=style, nodes=nodes, joins=joins, edges=edges, order=order, stream=stream,
        mid_consumers=mid,
    )


def build_layer_graph(model: nn.Module, spec: ArchSpec, layer: int) -> LayerGraph:
    """:func:`trace_layer`, or the spec template when tracing raises (the graph's ``source`` says which)."""
    find_layer(model, spec, layer)  # a bad layer index is an error, not a reason to fall back
    try:
        return trace_layer(model, spec, layer)
    except HeadlensError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the trace falls back to the template
        text = str(exc).strip().splitlines()
        return template_layer_graph(model, spec, layer, reason=f"{type(exc).__name__}: {text[0] if text else ''}")


# ------------------------------------------------------------------------------------------ text output


def _node_line(n: Node) -> str:
    shape = f" -> {n.out_shape}" if n.out_shape else ""
    params = f"  [{', '.join(n.params)}]" if n.params else ""
    role = " (on the stream)" if n.role == "stream" else ""
    return f"  {n.name}: {n.cls}{role}{params}{shape}"


def summary_lines(graph: LayerGraph) -> list[str]:
    """The diagram as text: elements top to bottom, then each join's skip and branch."""
    g = graph
    lines = [f"layer {g.layer} of {g.model_class} ({g.layer_class} at {g.layer_path}): {g.style_name} residual, "
             f"{len(g.joins)} join{'s' if len(g.joins) != 1 else ''} — {STYLE_HELP.get(g.style, '')}",
             f"structure {g.source_note}"]
    shape = f" {g.input_shape}" if g.input_shape else ""
    for x in g.order:
        if x == "in":
            lines.append(f"  resid_pre: the layer input{shape}")
        elif x == "out":
            lines.append(f"  resid_post: the layer output{shape}")
        elif x.startswith("j"):
            j = next(j for j in g.joins if j.id == x)
            branch = " + ".join(g.names(j.terminals)) or "?"
            lines.append(f"  ⊕ join {j.index}: skip from {g.label(j.skip_from)} + {branch} -> {j.result}")
        else:
            lines.append(_node_line(g.node(x)))
    for j in g.joins:
        lines.append(f"join {j.index}: skip branches off {g.label(j.skip_from)}; branch "
                     f"[{', '.join(g.names(j.branch))}] reads {', '.join(g.label(r) for r in j.reads_from) or '?'}")
    return lines


# ------------------------------------------------------------------------------------------------ hooks


@dataclass
class HookSite:
    """Which module and hook kind capture one site of the residual stream (or a branch output)."""

    site: str  # "resid_pre" | "resid_mid" | "resid_post" | "attn_out" | "mlp_out" | "final" (the final norm)
    module: str | None  # real path in the model; None when the site does not exist
    hook: str | None  # "forward_pre" | "forward"
    take: str | None  # "args[0]" | "kwargs['hidden_states']" | "first input" | "output" | "output[0]"
    note: str = ""


def _paths(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _take_input(via: str | None) -> str:
    return via if via in ("args[0]", "kwargs['hidden_states']") else "first input"


def _take_output(kind: str | None) -> str:
    return "output[0]" if kind == "tuple" else "output"


def hook_sites(model: nn.Module, spec: ArchSpec, graph: LayerGraph) -> list[HookSite]:
    """The module and hook for every site, with the loaded model's real paths, checked against the trace."""
    g = graph
    paths = _paths(model)
    lp = g.layer_path
    traced = g.source == "trace"

    def rel_node(rel: str | None) -> Node | None:
        return g.node_named(rel) if rel else None

    sites = [HookSite("resid_pre", lp, "forward_pre", _take_input(g.input_via),
                      f"the hidden states entering layer {g.layer} (= output_hidden_states[{g.layer}])")]
    # resid_mid: the module the trace shows reading the stream after the first join
    if len(g.joins) >= 2:
        consumers = [g.node(i) for i in g.mid_consumers]
        chosen = next((n for n in consumers if n.name == spec.mid_input), consumers[0] if consumers else None)
        note = "the stream after the attention join, before the MLP branch"
        if chosen is None and spec.mid_input and f"{lp}.{spec.mid_input}" in paths:
            chosen = rel_node(spec.mid_input)
        if chosen is not None:
            if traced and spec.mid_input and chosen.name != spec.mid_input:
                note += f" (the spec table names {spec.mid_input}; the trace shows {chosen.name} reading it)"
            sites.append(HookSite("resid_mid", chosen.path, "forward_pre", _take_input(chosen.input_via), note))
        elif spec.mid_input and f"{lp}.{spec.mid_input}" in paths:
            sites.append(HookSite("resid_mid", f"{lp}.{spec.mid_input}", "forward_pre", "first input", note))
        else:
            sites.append(HookSite("resid_mid", None, None, None, "no module reads the stream between the joins"))
    else:
        sites.append(HookSite("resid_mid", None, None, None,
                              f"none: a {g.style_name} layer adds attention and MLP to the stream in one join"))
    sites.append(HookSite("resid_post", lp, "forward", _take_output(g.output_kind),
                          f"the hidden states leaving layer {g.layer}"
                          + (" (the layer returns a tensor: output[0] would be the first batch row)"
                             if g.output_kind == "tensor" else "")))
    # branch outputs: the terminals of the joins, checked against the spec
    terminals = [g.node(t) for j in g.joins for t in j.terminals]
    for site, rel, kind, what in (("attn_out", spec.attn_out, "attention", "what attention adds to the stream"),
                                  ("mlp_out", spec.mlp_out, "mlp", "what the MLP adds to the stream")):
        n = rel_node(rel)
        note = what
        if traced and (n is None or n not in terminals):
            alt = _terminal_for(g, kind)
            if alt is not None:
                note += f" (the spec table names {rel}; the trace shows {alt.name} feeding the join)"
                n = alt
        if n is not None:
            sites.append(HookSite(site, n.path, "forward", _take_output(n.output_kind), note))
        elif rel and f"{lp}.{rel}" in paths:
            sites.append(HookSite(site, f"{lp}.{rel}", "forward", "output", note))
        else:
            sites.append(HookSite(site, None, None, None, f"not found ({rel})"))
    prefix = lp[: -len(f"{spec.layers_path}.{g.layer}")]
    if spec.final_norm and f"{prefix}{spec.final_norm}" in paths:
        sites.append(HookSite("final", f"{prefix}{spec.final_norm}", "forward", "output",
                              "the final norm after the last layer"))
    elif spec.final_norm:
        sites.append(HookSite("final", None, None, None,
                              f"{prefix}{spec.final_norm} is not in this {type(model).__name__}"))
    else:
        sites.append(HookSite("final", None, None, None,
                              "none: in a post-norm model each layer's output is already normed"))
    return sites


def _terminal_for(g: LayerGraph, kind: str) -> Node | None:
    for j in g.joins:
        has = any(g.node(b).kind == kind for b in j.branch)
        if has:
            for t in j.terminals:
                tn = g.node(t)
                if tn.kind == kind or len(j.terminals) == 1:
                    return tn
    return None


def _mlp_modules(g: LayerGraph, spec: ArchSpec, sites: list[HookSite]) -> list[str]:
    """The MLP module(s) a notebook would hook: the mlp_out site and any node called ``mlp``."""
    out = [s.module for s in sites if s.site == "mlp_out" and s.module]
    out += [n.path for n in g.nodes if n.name.rsplit(".", 1)[-1] == "mlp" and n.path not in out]
    return out or [f"{g.layer_path}.{spec.mlp_out}"]


def hook_guide(model: nn.Module, spec: ArchSpec, graph: LayerGraph) -> list[str]:
    """Lines: which module and which hook capture each site, with the loaded model's real module paths."""
    sites = hook_sites(model, spec, graph)
    lines = [f"hooks for layer {graph.layer} (module paths in the loaded {type(model).__name__}):"]
    for s in sites:
        if s.module is None:
            lines.append(f"  {s.site:<10} {s.note}")
            continue
        kind = "forward pre-hook" if s.hook == "forward_pre" else "forward hook"
        how = {"args[0]": "its first positional input, args[0]",
               "kwargs['hidden_states']": "kwargs['hidden_states'] (register with with_kwargs=True)",
               "first input": "its first input (args[0], or kwargs['hidden_states'] with with_kwargs=True)",
               "output": "its output", "output[0]": "output[0]"}[s.take or "output"]
        lines.append(f"  {s.site:<10} {kind} on {s.module}: {how} — {s.note}")
    mlps = " or ".join(_mlp_modules(graph, spec, sites))
    layers = graph.layer_path.rsplit(".", 1)[0]
    pre = sites[0]
    lines.append(f"note: a forward hook on the MLP output ({mlps}) gives what the MLP adds to the stream, not "
                 f"the residual stream; the token representations at the input of decoder layer L are resid_pre: "
                 f"a forward pre-hook on {layers}.<L>, {pre.take}")
    return lines


def register_site_hook(model: nn.Module, site: HookSite, fn: Callable[[torch.Tensor], None]):
    """Register the hook ``site`` describes; ``fn`` receives the captured tensor. Returns the handle."""
    if site.module is None:
        raise HeadlensError(f"{site.site} has no module to hook: {site.note}")
    module = model.get_submodule(site.module)
    if site.hook == "forward_pre":
        def pre(_m, args, kwargs):
            if site.take == "kwargs['hidden_states']" or not (args and isinstance(args[0], torch.Tensor)):
                fn(kwargs["hidden_states"])
            else:
                fn(args[0])

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m, _args, output):
        fn(output[0] if site.take == "output[0]" else output)

    return module.register_forward_hook(post)


# ---------------------------------------------------------------------------------------------- mermaid


def _mm_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "&lt;").replace(">", "&gt;")


def to_mermaid(graph: LayerGraph) -> str:
    """Mermaid ``flowchart TD``: ⊕ nodes for joins, skips as dotted ``-.->`` edges from branch-off to join."""
    g = graph
    title = f"{g.model_class} layer {g.layer}: {g.style_name} residual, {g.source_note}"
    lines = ["---", f"title: {_mm_text(title)}", "---", "flowchart TD"]
    shape = f"<br/>{g.input_shape}" if g.input_shape else ""
    for x in g.order:
        if x == "in":
            lines.append(f'    in["resid_pre: layer {g.layer} input{shape}"]')
        elif x == "out":
            lines.append(f'    out["resid_post: layer {g.layer} output{shape}"]')
        elif x.startswith("j"):
            lines.append(f'    {x}(("⊕"))')
        else:
            n = g.node(x)
            parts = [f"<b>{_mm_text(n.name)}</b>", _mm_text(n.cls)]
            if n.params:
                parts.append(_mm_text(", ".join(n.params)))
            lines.append(f'    {x}["{"<br/>".join(parts)}"]')
    for e in g.edges:
        if e.kind == "skip":
            lines.append(f"    {e.src} -.->|skip| {e.dst}")
        else:
            lines.append(f"    {e.src} --> {e.dst}")
    lines += ["    classDef norm fill:#fde9b8,stroke:#c9a227",
              "    classDef attention fill:#cfe3fb,stroke:#4a7fc1",
              "    classDef mlp fill:#d3f0d3,stroke:#4a9a4a",
              "    classDef linear fill:#e8ddf6,stroke:#8a6bbf",
              "    classDef stream fill:#eeeeee,stroke:#666666",
              "    classDef join fill:#ffffff,stroke:#c0392b,stroke-width:2px"]
    by_kind: dict[str, list[str]] = {}
    for n in g.nodes:
        by_kind.setdefault(n.kind if n.kind in ("norm", "attention", "mlp", "linear") else "stream", []).append(n.id)
    by_kind.setdefault("stream", []).extend(["in", "out"])
    by_kind["join"] = [j.id for j in g.joins]
    for kind, ids in by_kind.items():
        if ids:
            lines.append(f"    class {','.join(ids)} {kind}")
    return "\n".join(lines) + "\n"


def save_mermaid(graph: LayerGraph, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(to_mermaid(graph), encoding="utf-8")
    return Path(path)


# -------------------------------------------------------------------------------------------------- PNG

_COLORS = {"norm": ("#fde9b8", "#c9a227"), "attention": ("#cfe3fb", "#4a7fc1"), "mlp": ("#d3f0d3", "#4a9a4a"),
           "linear": ("#e8ddf6", "#8a6bbf"), "other": ("#f4f4f4", "#888888"), "site": ("#e6e6e6", "#555555")}


def _lanes(intervals: list[tuple[int, int, int]]) -> dict[int, int]:
    """Greedy lane per edge index so that overlapping vertical spans get different lanes."""
    lanes: dict[int, int] = {}
    used: list[list[tuple[int, int]]] = []
    for idx, a, b in sorted(intervals, key=lambda t: (t[2] - t[1], t[1])):
        for lane, spans in enumerate(used):
            if all(b <= s or a >= e for s, e in spans):
                spans.append((a, b))
                lanes[idx] = lane
                break
        else:
            used.append([(a, b)])
            lanes[idx] = len(used) - 1
    return lanes


def _side_path(x0: float, y0: float, x1: float, y1: float, reach: float):
    """Out from (x0, y0) sideways to x=reach, along it, and back in to (x1, y1), with rounded corners."""
    from matplotlib.path import Path as MPath

    sign = 1.0 if reach > 0 else -1.0
    c = min(0.35, abs(y1 - y0) / 2)
    down = -1.0 if y1 < y0 else 1.0
    verts = [(x0, y0), (reach - sign * c, y0), (reach, y0), (reach, y0 + down * c), (reach, y1 - down * c),
             (reach, y1), (reach - sign * c, y1), (x1, y1)]
    codes = [MPath.MOVETO, MPath.LINETO, MPath.CURVE3, MPath.CURVE3, MPath.LINETO, MPath.CURVE3, MPath.CURVE3,
             MPath.LINETO]
    return MPath(verts, codes)


def save_diagram_png(graph: LayerGraph, path: str | Path) -> Path:
    """Boxes top to bottom in call order, norms coloured apart, skips as dashed curves on the right."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Patch

    g = graph
    step = 1.45
    y = {x: -i * step for i, x in enumerate(g.order)}
    box_w, box_h, r = 7.2, 1.0, 0.26
    half = {x: (r if x.startswith("j") else box_w / 2) for x in g.order}
    index = {x: i for i, x in enumerate(g.order)}
    side_edges: dict[str, list[tuple[int, int, int]]] = {"left": [], "right": []}
    straight: list[int] = []
    for k, e in enumerate(g.edges):
        if e.src not in index or e.dst not in index:
            continue
        a, b = index[e.src], index[e.dst]
        if e.kind == "data" and b == a + 1:
            straight.append(k)
        else:
            side_edges["right" if e.kind == "skip" else "left"].append((k, min(a, b), max(a, b)))
    lanes = {side: _lanes(items) for side, items in side_edges.items()}
    n_left = 1 + max(lanes["left"].values(), default=-1)
    n_right = 1 + max(lanes["right"].values(), default=-1)
    xmax = box_w / 2 + 0.7 + 0.5 * max(n_right, 1) + 0.6
    xmin = -(box_w / 2 + 0.7 + 0.5 * max(n_left, 1) + 0.3)
    height = (len(g.order) - 1) * step + 2.2
    width = xmax - xmin
    fig, ax = plt.subplots(figsize=(width * 0.78 + 0.4, height * 0.78 + 1.0))
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(-(len(g.order) - 1) * step - 1.2, 1.0)
    ax.set_aspect("equal")
    ax.axis("off")

    for x in g.order:
        cy = y[x]
        if x.startswith("j"):
            ax.add_patch(Circle((0, cy), r, facecolor="white", edgecolor="#c0392b", lw=2, zorder=3))
            ax.text(0, cy - 0.02, "+", ha="center", va="center", fontsize=15, fontweight="bold", color="#c0392b",
                    zorder=4)
            j = next(j for j in g.joins if j.id == x)
            ax.text(-r - 0.15, cy + 0.3, f"join {j.index} → {j.result}", ha="right", va="center", fontsize=8.5,
                    color="#c0392b")
            continue
        if x in ("in", "out"):
            face, edge = _COLORS["site"]
            title = "resid_pre: layer input" if x == "in" else "resid_post: layer output"
            sub = str(g.input_shape) if g.input_shape else ""
            strong = True
        else:
            n = g.node(x)
            face, edge = _COLORS.get(n.kind, _COLORS["other"])
            title = f"{n.name}  ({n.cls})"
            sub = ", ".join(n.params)
            strong = n.role == "stream"
            if strong:
                title += "  — on the stream"
        ax.add_patch(FancyBboxPatch((-box_w / 2, cy - box_h / 2), box_w, box_h,
                                    boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=face, edgecolor=edge,
                                    lw=2.0 if strong else 1.1, zorder=2))
        sub_lines = textwrap.wrap(sub, width=88)
        if len(sub_lines) > 2:
            sub_lines = [sub_lines[0], textwrap.shorten(" ".join(sub_lines[1:]), width=88, placeholder=" …")]
        ax.text(0, cy + (0.2 if sub_lines else 0), title, ha="center", va="center", fontsize=9.5,
                fontweight="bold", zorder=4)
        if sub_lines:
            ax.text(0, cy - 0.2 - (0.07 if len(sub_lines) > 1 else 0), "\n".join(sub_lines), ha="center",
                    va="center", fontsize=7, color="#333333", zorder=4, linespacing=1.15)

    for k in straight:
        e = g.edges[k]
        ax.add_patch(FancyArrowPatch((0, y[e.src] - (r if e.src.startswith("j") else box_h / 2)),
                                     (0, y[e.dst] + (r if e.dst.startswith("j") else box_h / 2)),
                                     arrowstyle="-|>", mutation_scale=12, color="#333333", lw=1.2, zorder=1))
    for side, items in side_edges.items():
        sign = 1 if side == "right" else -1
        for k, _a, _b in items:
            e = g.edges[k]
            skip = e.kind == "skip"
            reach = sign * (box_w / 2 + 0.7 + 0.5 * lanes[side][k])
            y0 = y[e.src] - 0.12
            y1 = y[e.dst] + (0.12 if not e.dst.startswith("j") else 0)
            curve = _side_path(sign * half[e.src], y0, sign * (half[e.dst] + 0.02), y1, reach)
            ax.add_patch(FancyArrowPatch(path=curve, arrowstyle="-|>", mutation_scale=13,
                                         color="#c0392b" if skip else "#555555", lw=1.7 if skip else 1.1,
                                         linestyle=(0, (4, 2.5)) if skip else "-", zorder=1))
            if skip:
                ax.text(reach + 0.22, (y0 + y1) / 2, "skip", rotation=90, ha="center", va="center", fontsize=8,
                        color="#c0392b")

    ax.set_title(f"{g.model_class} layer {g.layer} ({g.layer_class}): {g.style_name} residual, "
                 f"{len(g.joins)} join{'s' if len(g.joins) != 1 else ''}\n{g.source_note}", fontsize=10)
    handles = [Patch(facecolor=_COLORS[k][0], edgecolor=_COLORS[k][1], label=k)
               for k in ("norm", "attention", "mlp", "linear") if any(n.kind == k for n in g.nodes)]
    handles += [Line2D([0], [0], color="#333333", lw=1.2, label="data flow"),
                Line2D([0], [0], color="#c0392b", lw=1.7, ls="--", label="skip (residual) → ⊕ join")]
    ax.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, -0.01))
    fig.tight_layout()
    from headlens.report.figures import save_figure

    return save_figure(fig, path, dpi=110)
