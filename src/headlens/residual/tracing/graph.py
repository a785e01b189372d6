"""The structure of one layer as data: displayed modules (nodes), residual joins, edges, and its text summary.

Element ids name everything in the graph: ``"in"`` (the layer input, resid_pre), ``"out"`` (the layer output,
resid_post), ``"n0"``, ``"n1"`` ... (displayed modules, in call order) and ``"j1"``, ``"j2"`` ... (residual
joins). Both :func:`~headlens.residual.tracing.lineage.trace_layer` and the spec template build a
:class:`LayerGraph`; the Mermaid text and the PNG (:mod:`headlens.report.diagram`) draw it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from headlens.residual.tracing.exact import TracedSites

STYLE_NAMES = {"pre": "pre-norm", "sandwich": "sandwich-norm", "parallel": "parallel", "post": "post-norm"}
STYLE_HELP = {
    "pre": "each branch reads a norm of the stream; its output is added to the stream unnormed",
    "sandwich": "each branch reads a norm of the stream and is normed again before it is added",
    "parallel": "attention and MLP read norms of the same stream tensor; both are added in one join",
    "post": "each join's result is normed, and the norm's output is the stream",
}


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
    site: str | None = None  # the residual site its output is (a post-norm's "resid_mid" / "resid_post")


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
    """One arrow of the diagram between two element ids."""

    src: str  # element the value comes from
    dst: str  # element that reads it
    kind: str  # "data" (producer -> consumer) | "skip" (the residual operand of a join)


@dataclass
class LayerGraph:
    """The structure of one layer. Element ids: "in" (layer input), "out" (layer output), nodes, joins."""

    model_class: str  # class of the loaded model, e.g. "Qwen3Model"
    model_type: str | None  # its config's model_type
    family: str  # the spec table's family name
    layer: int  # layer index
    layer_path: str  # real path of the layer in the model, e.g. "layers.3" or "model.layers.3"
    layer_class: str  # class of the layer module
    source: str  # "trace" | "template"
    source_note: str  # "derived from a traced forward (...)" | "template for <family> (...)"
    style: str  # "pre" | "sandwich" | "parallel" | "post"
    nodes: list[Node]  # displayed modules in call order
    joins: list[Join]  # residual joins in call order
    edges: list[Edge]  # data and skip edges, sorted top to bottom by destination
    order: list[str]  # element ids top to bottom: "in", nodes and joins in call order, "out"
    stream: list[str]  # elements on the residual stream, in order ("in", joins, post-norms)
    mid_consumers: list[str]  # node ids that read the stream between the first and second join (resid_mid)
    input_shape: list[int] | None = None  # shape of the layer's hidden-states input in the traced forward
    input_via: str | None = None  # how the layer's hidden states are passed to it
    output_kind: str | None = None  # "tensor" | "tuple": what the layer returns
    traced: TracedSites | None = None  # the modules that give each site exactly (None: from the template)
    extra: dict = field(default_factory=dict)  # further JSON fields, merged into to_json()

    # -- look-ups
    def node(self, node_id: str) -> Node:
        """The node with id ``node_id`` (KeyError if none)."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def node_named(self, name: str) -> Node | None:
        """The node whose layer-relative name is ``name``, or None."""
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    def names(self, ids) -> list[str]:
        """Layer-relative names of the nodes ``ids``."""
        return [self.node(i).name for i in ids]

    def label(self, element: str) -> str:
        """How the text output names ``element``: ``resid_pre (layer input)``, ``join 2``, a node's name."""
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
        """Every field as JSON-ready values, with the joins' and mid consumers' node names spelled out."""
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
            "mid_consumers": self.names(self.mid_consumers),
            "traced_sites": self.traced.to_json() if self.traced else None, **self.extra,
        }


def element_sort(x: str) -> tuple:
    """Sort key for element ids: the input, then nodes, then joins (each by number), then the output."""
    if x == "in":
        return (0, 0)
    if x == "out":
        return (3, 0)
    return (1 if x.startswith("n") else 2, int(x[1:]))


# ------------------------------------------------------------------------------------------ text output


def _node_line(n: Node) -> str:
    shape = f" -> {n.out_shape}" if n.out_shape else ""
    params = f"  [{', '.join(n.params)}]" if n.params else ""
    role = " (on the stream)" if n.role == "stream" else ""
    site = f" = {n.site}" if n.site else ""
    return f"  {n.name}: {n.cls}{role}{params}{shape}{site}"


def summary_lines(graph: LayerGraph) -> list[str]:
    """The diagram as text lines: a heading, the elements top to bottom, then each join's skip and branch."""
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
