"""Layer tracing: one layer of the real model drawn from a traced forward, and which hook captures each site.

Rooms, in the order data flows through them:

- :mod:`.recorder`: one forward with hooks on every module of the layer and a TorchFunctionMode that records
  every torch call while it runs;
- :mod:`.stream`: tensor lineage of that recording and where the residual stream runs (joins, post-norms);
- :mod:`.lineage`: the displayed modules, their producers, each join's skip and branch -> :class:`LayerGraph`
  (:func:`trace_layer`);
- :mod:`.module_info`: a module's kind and parameter shapes; :mod:`.graph`: the graph model and its text;
- :mod:`.template`: the same graph from the spec table, when tracing fails;
- :mod:`.hooks`: the hook guide, from the hook-site table checked against the graph;
- :mod:`.diagram`: :func:`trace_model_layer`, what ``headlens diagram`` computes, as a :class:`DiagramResult`.

Drawing (Mermaid, PNG) lives in :mod:`headlens.report.diagram`.
"""

from headlens.residual.tracing.diagram import DiagramResult, build_layer_graph, trace_model_layer
from headlens.residual.tracing.graph import STYLE_HELP, STYLE_NAMES, Edge, Join, LayerGraph, Node, summary_lines
from headlens.residual.tracing.hooks import HookSite, hook_guide, hook_sites, register_site_hook
from headlens.residual.tracing.lineage import trace_layer
from headlens.residual.tracing.module_info import param_summary
from headlens.residual.tracing.recorder import TRACE_TOKENS, record_layer
from headlens.residual.tracing.template import template_layer_graph

__all__ = [
    "DiagramResult", "Edge", "HookSite", "Join", "LayerGraph", "Node", "STYLE_HELP", "STYLE_NAMES", "TRACE_TOKENS",
    "build_layer_graph", "hook_guide", "hook_sites", "param_summary", "record_layer", "register_site_hook",
    "summary_lines", "template_layer_graph", "trace_layer", "trace_model_layer",
]
