"""From a recording to a :class:`~headlens.residual.tracing.graph.LayerGraph`: which modules to show, who
produced each value they read, the skip and branch of every join, and the layer's residual style.

Display granularity: the layer's direct children, expanded only where a child contains a join (BERT's
``attention.output`` and ``output`` hold their own ``LayerNorm(dense(x) + residual)``) or a norm on the stream.
Dropout and Identity modules are transparent. The other operand of a join is traced back, through the real
producer -> consumer edges, to the modules on that skip's branch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from headlens.arch import ArchSpec
from headlens.residual.tracing.exact import TracedSites, traced_sites
from headlens.residual.tracing.graph import Edge, Join, LayerGraph, Node, element_sort
from headlens.residual.tracing.module_info import is_transparent, module_kind, param_summary
from headlens.residual.tracing.recorder import TRACE_TOKENS, Call, Recorder, record_layer
from headlens.residual.tracing.stream import Flow, RawJoin, ancestors, find_stream

_MAX_DEPTH = 200  # lineage steps followed back from one value


@dataclass
class _Display:
    """The displayed calls and their nodes."""

    calls: list[Call]  # displayed calls, call order
    nodes: list[Node]  # one per displayed call
    node_of: dict[int, str]  # call index -> node id

    def node_enclosing(self, all_calls: list[Call], idx: int) -> str | None:
        """The node of call ``idx`` or of the nearest displayed call around it."""
        for a in [idx] + ancestors(all_calls, idx):
            if a in self.node_of:
                return self.node_of[a]
        return None


def _display(calls: list[Call], joins: list[RawJoin], conts: list[tuple[int, tuple]], layer_path: str) -> _Display:
    """Nodes for the layer's direct children, expanded where a join or a stream norm sits inside."""
    expanded: set[int] = set()
    for j in joins:
        expanded.update(s for s in j.scope if s != 0)
    for i, _ in conts:
        expanded.update(a for a in ancestors(calls, i) if a != 0)
    shown = [c for c in calls[1:] if c.parent is not None and (c.parent == 0 or c.parent in expanded)
             and c.idx not in expanded and not is_transparent(c.module)]
    nodes: list[Node] = []
    node_of: dict[int, str] = {}
    name_count: dict[str, int] = {}
    for c in shown:
        name_count[c.name] = name_count.get(c.name, 0) + 1
        label = c.name if name_count[c.name] == 1 else f"{c.name} (call {name_count[c.name]})"
        node = Node(id=f"n{len(nodes)}", name=label, path=f"{layer_path}.{c.name}", cls=type(c.module).__name__,
                    kind=module_kind(c.name, c.module), params=param_summary(c.module), role="other",
                    out_shape=c.out_shape, input_via=c.via, output_kind=c.output_kind)
        nodes.append(node)
        node_of[c.idx] = node.id
    return _Display(shown, nodes, node_of)


class _Producers:
    """Which element (``"in"``, a join, a node) produced each value; lineage is followed back to one."""

    def __init__(self, flow: Flow, rec: Recorder, joins: list[RawJoin], display: _Display):
        self.flow = flow
        self.producer: dict = {flow.root(rec.calls[0].main_key): "in"}
        for n, j in enumerate(joins, start=1):
            self.producer[flow.root(j.result)] = f"j{n}"
        for c in display.calls:
            for k in c.out_keys:
                if k not in c.in_keys:
                    self.producer.setdefault(k, display.node_of[c.idx])
                    self.producer.setdefault(flow.root(k), display.node_of[c.idx])
        self.memo: dict = {}

    def resolve(self, key: tuple, depth: int = 0) -> set[str]:
        """The elements whose outputs the value ``key`` was computed from."""
        if key in self.producer:
            return {self.producer[key]}
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = set()
        if depth > _MAX_DEPTH:
            return set()
        flow = self.flow
        out: set[str] = set()
        if key in flow.alias:
            out = self.resolve(flow.alias[key], depth + 1)
        elif key in flow.parents:
            for p in flow.parents[key]:
                out |= self.resolve(p, depth + 1)
        else:
            latest = flow.latest.get(key[0])
            if latest is not None and latest != key:
                out = self.resolve(latest, depth + 1)
        self.memo[key] = out
        return out

    def sorted(self, key: tuple) -> list[str]:
        return sorted(self.resolve(key), key=element_sort)


def _edges(rec: Recorder, joins: list[RawJoin], display: _Display, prod: _Producers) -> list[Edge]:
    """Data edges into every node, each join and the output, and each join's skip edge (unsorted)."""
    edges: list[Edge] = []

    def add_edge(src: str, dst: str, kind: str) -> None:
        if src != dst and not any(e.src == src and e.dst == dst and e.kind == kind for e in edges):
            edges.append(Edge(src, dst, kind))

    for c in display.calls:
        nid = display.node_of[c.idx]
        for k in c.in_keys:
            for src in prod.sorted(k):
                add_edge(src, nid, "data")
    for n, j in enumerate(joins, start=1):
        for src in prod.sorted(j.branch):
            add_edge(src, f"j{n}", "data")
        for src in prod.sorted(j.residual):
            add_edge(src, f"j{n}", "skip")
    layer_call = rec.calls[0]
    out_srcs = prod.sorted(layer_call.out_keys[0]) if layer_call.out_keys else []
    for src in out_srcs:
        add_edge(src, "out", "data")
    return edges


def _branch(terminals: list[str], preds: dict[str, list[str]], stream_ids: set[str]) -> tuple[set[str], list[str]]:
    """The nodes upstream of ``terminals`` up to the stream, and the stream elements they read."""
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
    return branch, reads


def _joins(raw: list[RawJoin], edges: list[Edge], nodes: list[Node], stream_ids: set[str],
           prod: _Producers) -> list[Join]:
    """Each join's terminals (what is added), branch, the stream it reads and where its skip branches off."""
    preds: dict[str, list[str]] = {}
    for e in edges:
        if e.kind == "data":
            preds.setdefault(e.dst, []).append(e.src)
    joins: list[Join] = []
    for n, j in enumerate(raw, start=1):
        jid = f"j{n}"
        terminals = [s for s in preds.get(jid, []) if s not in stream_ids]
        branch, reads = _branch(terminals, preds, stream_ids)
        skip = prod.sorted(j.residual)
        result = "resid_post" if n == len(raw) else ("resid_mid" if n == 1 and len(raw) == 2 else f"after join {n}")
        joins.append(Join(id=jid, index=n, skip_from=skip[0] if skip else "in",
                          branch=[x.id for x in nodes if x.id in branch],
                          terminals=[x.id for x in nodes if x.id in terminals],
                          reads_from=sorted(reads, key=element_sort), result=result))
    return joins


def _order(display: _Display, raw: list[RawJoin]) -> list[str]:
    """Element ids top to bottom: the input, nodes and joins in event order, the output."""
    position: dict[str, int] = {}
    for c in display.calls:
        position[display.node_of[c.idx]] = c.event
    for n, j in enumerate(raw, start=1):
        position[f"j{n}"] = j.event
    return ["in"] + sorted(position, key=lambda x: position[x]) + ["out"]


def _style(nodes: list[Node], joins: list[Join], stream_nodes, traced: TracedSites) -> str:
    if stream_nodes:
        return "post"
    if traced.parallel or any(len(j.terminals) > 1 for j in joins):
        return "parallel"
    kinds = {n.id: n.kind for n in nodes}
    if joins and all(j.terminals and all(kinds[t] == "norm" for t in j.terminals) for j in joins):
        return "sandwich"
    return "pre"


def _label_sites(joins: list[Join], nodes: list[Node], stream_nodes: dict[str, int], traced: TracedSites) -> None:
    """Name the site each join gives where it really is: after the post-norm that follows it (BERT), and none
    between the two joins of a parallel layer (``residual + attn + mlp`` added left to right)."""
    if traced.parallel and len(joins) == 2:
        joins[0].result = "after join 1 (not a site: the MLP reads the layer input)"
        return
    by_name = {n.name: n for n in nodes if n.id in stream_nodes}
    if traced.post_norms and len(traced.post_norms) == len(joins):
        for j, norm in zip(joins, traced.post_norms):
            node = by_name.get(norm)
            if node is None:
                return
            node.site, j.result = j.result, f"normed by {norm} into {j.result}"


def _mid_consumers(edges: list[Edge], joins: list[Join], stream_seq: list[str]) -> list[str]:
    """Nodes that read the stream between the first and the second join."""
    if len(joins) < 2:
        return []
    first, second = stream_seq.index("j1"), stream_seq.index("j2")
    head = stream_seq[second - 1] if second - 1 >= first else "j1"
    return [e.dst for e in edges if e.src == head and e.kind == "data" and e.dst.startswith("n")]


def analyze(model: nn.Module, spec: ArchSpec, layer: int, layer_path: str, rec: Recorder) -> LayerGraph:
    """The layer graph of a recording: stream and joins, displayed nodes, edges, branches, order and style."""
    calls = rec.calls
    layer_call = calls[0]
    if layer_call.main_key is None:
        raise RuntimeError("the layer was called without a hidden-states tensor")
    flow = Flow(rec)
    raw, conts = find_stream(rec, flow)
    display = _display(calls, raw, conts, layer_path)
    stream_nodes: dict[str, int] = {}
    for i, _key in conts:
        nid = display.node_enclosing(calls, i)
        if nid is not None:
            stream_nodes[nid] = i
    prod = _Producers(flow, rec, raw, display)
    edges = _edges(rec, raw, display, prod)
    stream_ids = {"in"} | {f"j{n}" for n in range(1, len(raw) + 1)} | set(stream_nodes)
    nodes = display.nodes
    joins = _joins(raw, edges, nodes, stream_ids, prod)
    for node in nodes:
        if node.id in stream_nodes:
            node.role = "stream"
        elif any(node.id in j.branch for j in joins):
            node.role = "branch"
    order = _order(display, raw)
    stream_seq = ["in"] + [x for x in order if x in stream_ids and x != "in"]
    rank = {x: i for i, x in enumerate(order)}
    edges.sort(key=lambda e: (rank[e.dst], rank[e.src], e.kind))
    traced = traced_sites(rec, flow, raw, conts)
    _label_sites(joins, nodes, stream_nodes, traced)
    style = _style(nodes, joins, stream_nodes, traced)
    return LayerGraph(
        model_class=type(model).__name__, model_type=getattr(getattr(model, "config", None), "model_type", None),
        family=spec.family, layer=layer, layer_path=layer_path, layer_class=type(layer_call.module).__name__,
        source="trace", source_note=f"derived from a traced forward ({TRACE_TOKENS} tokens through the real model)",
        style=style, nodes=nodes, joins=joins, edges=edges, order=order, stream=stream_seq,
        mid_consumers=[] if traced.parallel else _mid_consumers(edges, joins, stream_seq),
        input_shape=layer_call.in_shape, input_via=layer_call.via, output_kind=layer_call.output_kind, traced=traced,
    )


def trace_layer(model: nn.Module, spec: ArchSpec, layer: int, inputs: dict | None = None) -> LayerGraph:
    """Layer ``layer``'s structure derived from one forward of ``model`` (``inputs``, or a few fixed token ids).

    Returns a :class:`LayerGraph` with ``source="trace"``. Raises RuntimeError when the recording shows no
    residual stream (then :func:`~headlens.residual.tracing.diagram.build_layer_graph` falls back to the template).
    """
    layer_path, rec = record_layer(model, spec, layer, inputs)
    return analyze(model, spec, layer, layer_path, rec)
