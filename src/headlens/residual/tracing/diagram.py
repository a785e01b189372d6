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
from headlens.circuits.heads import check_layer_head
from headlens.errors import HeadlensError
from headlens.io.checkpoint import Checkpoint
from headlens.io.source import ModelSource
from headlens.residual.modules import find_layer
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

    def to_json(self, files: dict[str, str]) -> dict:
        """The JSON document of the diagram; ``files`` names the files written (``png``, ``mermaid``, ``json``)."""
        return {"model": self.model_info, "graph": self.graph.to_json(),
                "hooks": [vars(s) for s in self.hook_sites], "hook_guide": self.hook_guide, "files": files}


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


def open_diagram_checkpoint(source: ModelSource, layer: int) -> Checkpoint:
    """The checkpoint, once ``layer`` is in range and it has a HuggingFace directory to build the model from."""
    ck = source.checkpoint(full=True)
    check_layer_head(ck, layer)
    if ck.directory is None or not (ck.directory / "config.json").exists():
        raise HeadlensError("a diagram runs the model, so it needs a HuggingFace model directory with config.json: "
                            "pass `weights` DIR or `hf_repo`, not a bare state dict")
    return ck


def trace_model_layer(source: ModelSource, layer: int, dtype: torch.dtype = torch.float32,
                      before_load: Callable[[Checkpoint], None] | None = None) -> DiagramResult:
    """Load the model of ``source`` in ``dtype``, trace layer ``layer`` and build its hook guide.

    ``before_load`` is called with the checkpoint once it has passed its checks, before the model is loaded (the
    command line creates its output directories there, so a bad directory fails before a large model loads).
    Returns a :class:`DiagramResult`.
    """
    ck = open_diagram_checkpoint(source, layer)
    if before_load is not None:
        before_load(ck)
    model = source.model(ck.directory, dtype)
    graph = build_layer_graph(model, ck.spec, layer)
    sites = hook_sites(model, ck.spec, graph)
    return DiagramResult(model_name=ck.name, model_info=ck.describe(), model_text=str(model), graph=graph,
                         hook_sites=sites, hook_guide=hook_guide(model, ck.spec, graph, sites))
