"""The diagram of one model layer, the library side of ``headlens diagram``: open the model, trace the layer
(or fall back to the spec template), and say which hook captures each residual site.

:func:`trace_model_layer` returns a :class:`DiagramResult`; :mod:`headlens.report.diagram` draws its graph as
a PNG and as Mermaid text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from headlens.arch import ArchSpec
from headlens.errors import HeadlensError
from headlens.io.source import ModelSource
from headlens.residual.modules import find_layer
from headlens.residual.target import RunTarget, open_run_target
from headlens.residual.tracing.graph import LayerGraph, summary_lines
from headlens.residual.tracing.hooks import HookSite, hook_guide, hook_sites
from headlens.residual.tracing.lineage import trace_layer
from headlens.residual.tracing.template import template_layer_graph


@dataclass
class DiagramResult:
    """What ``headlens diagram`` shows for one layer."""

    model_name: str  # the checkpoint's short name (used in output file names)
    model_info: dict  # the checkpoint's description (name, source, family, shape)
    model_text: str  # the model as print(model) shows it
    graph: LayerGraph  # the layer's structure (traced, or the template)
    hook_sites: list[HookSite]  # which module and hook capture each site
    hook_guide: list[str]  # the hook guide, as printed

    def lines(self) -> list[str]:
        """What the command prints before the file lines: the model, a blank line, the summary, the hook guide."""
        return [self.model_text, "", *summary_lines(self.graph), *self.hook_guide]

    def to_json(self, files: dict[str, str] | None = None) -> dict:
        """The JSON document of the diagram; ``files`` names the files written (``png``, ``mermaid``, ``json``)."""
        return {"model": self.model_info, "graph": self.graph.to_json(),
                "hooks": [vars(s) for s in self.hook_sites], "hook_guide": self.hook_guide, "files": dict(files or {})}

    def __repr__(self) -> str:
        from headlens.results import short_repr

        return short_repr(self, f"{self.model_name} layer {self.graph.layer}: {self.graph.model_class}, "
                                f"{self.graph.source}", self.hook_guide[:1] + [f"{s.site}: {s.hook} on {s.module}"
                                                                              for s in self.hook_sites],
                          "lines() (what the command prints), graph, hook_sites, model_text, to_json()")


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


_BARE = ("a diagram runs the model, so it needs a HuggingFace model directory with config.json: pass `weights` DIR "
         "or `hf_repo`, not a bare state dict")


def open_diagram_target(source: ModelSource, layer: int) -> RunTarget:
    """The model directory to trace, once ``layer`` is in range (where the config says how many layers there are).
    Any model whose blocks can be found is traced, also one whose family the spec table does not know."""
    target = open_run_target(source, _BARE)
    n = target.num_layers
    if n is not None and not 0 <= layer < n:
        raise HeadlensError(f"`layer` {layer} out of range: {target.name} has {n} layers (valid 0..{n - 1})")
    return target


def trace_model_layer(source: ModelSource, layer: int, dtype: torch.dtype = torch.float32,
                      before_load: Callable[[RunTarget], None] | None = None) -> DiagramResult:
    """Load the model of ``source`` in ``dtype``, trace layer ``layer`` and build its hook guide.

    ``before_load`` is called with the target (its ``name`` names the files) once it has passed its checks, before
    the model is loaded (the command line creates its output directories there, so a bad directory fails before a
    large model loads). Returns a :class:`DiagramResult`.
    """
    from headlens import params

    params.instance(source, "source", ModelSource, 'e.g. headlens.ModelSource(embedded="tiny-lm")')
    layer = params.integer(layer, "layer")  # type: ignore[assignment]
    target = open_diagram_target(source, layer)
    if before_load is not None:
        before_load(target)
    model = source.model(target.directory, dtype)
    spec = target.spec_for(model)
    graph = build_layer_graph(model, spec, layer)
    sites = hook_sites(model, spec, graph)
    return DiagramResult(model_name=target.name, model_info=target.info, model_text=str(model), graph=graph,
                         hook_sites=sites, hook_guide=hook_guide(model, spec, graph, sites))
