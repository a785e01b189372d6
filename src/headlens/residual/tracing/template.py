"""A layer's structure from the spec table (:mod:`headlens.arch`), used only when tracing fails.

Each residual style has its fixed shape: pre-norm and sandwich-norm layers have two joins with the branch
modules the spec names, a parallel layer one join of both branches, a post-norm layer two joins each followed
by a norm on the stream. Parameter shapes are read off the loaded model; the graph's ``source`` is
``"template"`` and its note says why tracing failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from headlens.arch import ArchSpec
from headlens.residual.modules import find_layer
from headlens.residual.sites import is_parallel
from headlens.residual.tracing.graph import Edge, Join, LayerGraph, Node
from headlens.residual.tracing.module_info import module_kind, param_summary


def _strip_weight(name: str | None) -> str | None:
    return name[: -len(".weight")] if name and name.endswith(".weight") else name


@dataclass
class _Builder:
    """Collects the template's nodes and edges for one layer."""

    layer_path: str  # real path of the layer
    subs: dict[str, nn.Module]  # the layer's modules by relative name
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)

    def node(self, name: str | None, role: str = "branch") -> str:
        """Add a node for the module ``name`` (``"?"`` when the spec names none); returns its id."""
        name = name or "?"
        module = self.subs.get(name)
        n = Node(id=f"n{len(self.nodes)}", name=name, path=f"{self.layer_path}.{name}",
                 cls=type(module).__name__ if module is not None else "?", kind=module_kind(name, module),
                 params=param_summary(module), role=role)
        self.nodes.append(n)
        return n.id

    def chain(self, start: str, ids: list[str]) -> None:
        """Data edges ``start -> ids[0] -> ids[1] ...``."""
        prev = start
        for i in ids:
            self.edges.append(Edge(prev, i, "data"))
            prev = i

    def sibling_norm(self, name: str | None) -> str | None:
        """The first norm module next to ``name`` (same parent), e.g. BERT's ``attention.output.LayerNorm``."""
        parent = name.rsplit(".", 1)[0] if name and "." in name else ""
        for n, m in self.subs.items():
            if n and n.rsplit(".", 1)[0] == parent and n != parent and "." in n and "norm" in type(m).__name__.lower():
                return n
        return None


@dataclass
class _Shape:
    """What one style contributes to the graph."""

    order: list[str]  # element ids top to bottom
    joins: list[Join]  # the style's joins
    stream: list[str]  # elements on the stream
    mid: list[str]  # resid_mid consumers


def _pre_or_sandwich(b: _Builder, spec: ArchSpec, style: str) -> _Shape:
    sandwich = style == "sandwich"
    mlp_name = "mlp" if "mlp" in b.subs else spec.mlp_out
    a = [b.node(_strip_weight(spec.norm)), b.node(spec.attn_module if sandwich else spec.attn_out)]
    if sandwich:
        a.append(b.node(spec.attn_out))
    m = [b.node(spec.mid_input), b.node(mlp_name if sandwich else spec.mlp_out)]
    if sandwich:
        m.append(b.node(spec.mlp_out))
    b.chain("in", a + ["j1"])
    b.edges.append(Edge("in", "j1", "skip"))
    b.chain("j1", m + ["j2"])
    b.edges.append(Edge("j1", "j2", "skip"))
    b.edges.append(Edge("j2", "out", "data"))
    joins = [Join("j1", 1, "in", a, [a[-1]], ["in"], "resid_mid"),
             Join("j2", 2, "j1", m, [m[-1]], ["j1"], "resid_post")]
    return _Shape(["in"] + a + ["j1"] + m + ["j2", "out"], joins, ["in", "j1", "j2"], [m[0]])


def _parallel(b: _Builder, spec: ArchSpec) -> _Shape:
    a = [b.node(_strip_weight(spec.norm)), b.node(spec.attn_out)]
    m = [b.node(spec.mid_input), b.node(spec.mlp_out)]
    b.chain("in", a + ["j1"])
    b.chain("in", m + ["j1"])
    b.edges.append(Edge("in", "j1", "skip"))
    b.edges.append(Edge("j1", "out", "data"))
    joins = [Join("j1", 1, "in", a + m, [a[-1], m[-1]], ["in"], "resid_post")]
    return _Shape(["in"] + a + m + ["j1", "out"], joins, ["in", "j1"], [])


def _post(b: _Builder, spec: ArchSpec) -> _Shape:
    a = [b.node(spec.attn_module), b.node(spec.attn_out)]
    ln1 = b.node(b.sibling_norm(spec.attn_out), role="stream")
    m = [b.node(spec.mid_input), b.node(spec.mlp_out)]
    ln2 = b.node(b.sibling_norm(spec.mlp_out) or _strip_weight(spec.prev_norm), role="stream")
    b.chain("in", a + ["j1", ln1] + m + ["j2", ln2, "out"])
    b.edges.append(Edge("in", "j1", "skip"))
    b.edges.append(Edge(ln1, "j2", "skip"))
    joins = [Join("j1", 1, "in", a, [a[-1]], ["in"], "resid_mid"),
             Join("j2", 2, ln1, m, [m[-1]], [ln1], "resid_post")]
    return _Shape(["in"] + a + ["j1", ln1] + m + ["j2", ln2, "out"], joins, ["in", "j1", ln1, "j2", ln2], [m[0]])


def template_style(spec: ArchSpec, config) -> str:
    """The spec's residual style, ``"pre"`` for a parallel family whose config turns the parallel residual off."""
    if spec.residual != "parallel" or not spec.parallel_flag:
        return spec.residual
    if config is None or not hasattr(config, spec.parallel_flag):
        return "parallel"  # the flag's default in the families that have one
    return "parallel" if is_parallel(spec, config) else "pre"


def template_layer_graph(model: nn.Module, spec: ArchSpec, layer: int, reason: str = "") -> LayerGraph:
    """The layer's structure from the spec table (used when tracing fails); shapes read off the model.

    Returns a :class:`LayerGraph` with ``source="template"``; ``reason`` (why tracing failed) goes in its note.
    """
    layer_path, layer_module = find_layer(model, spec, layer)
    config = getattr(model, "config", None)
    style = template_style(spec, config)
    b = _Builder(layer_path, dict(layer_module.named_modules()))
    if style in ("pre", "sandwich"):
        shape = _pre_or_sandwich(b, spec, style)
    elif style == "parallel":
        shape = _parallel(b, spec)
    else:
        shape = _post(b, spec)
    note = f"template for {spec.family}"
    if reason:
        note += f" (tracing failed: {reason})"
    return LayerGraph(
        model_class=type(model).__name__, model_type=getattr(config, "model_type", None), family=spec.family,
        layer=layer, layer_path=layer_path, layer_class=type(layer_module).__name__, source="template",
        source_note=note, style=style, nodes=b.nodes, joins=shape.joins, edges=b.edges, order=shape.order,
        stream=shape.stream, mid_consumers=shape.mid,
    )
