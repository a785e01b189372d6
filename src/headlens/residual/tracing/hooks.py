"""Which module and which hook capture each residual site of one layer, with the loaded model's real paths.

The spec's answer comes from the one hook-site table (:mod:`headlens.residual.sites`); the traced graph checks
it: ``resid_mid`` is the module the trace shows reading the stream after the first join, and ``attn_out`` /
``mlp_out`` are the modules whose outputs feed the joins. Where the trace disagrees with the table, the note
says so and the trace wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from headlens.arch import ArchSpec
from headlens.errors import HeadlensError
from headlens.residual.capture import register
from headlens.residual.sites import SiteHook, site_hook
from headlens.residual.tracing.graph import LayerGraph, Node

_MID_NOTE = "the stream after the attention join, before the MLP branch"
_BRANCH_SITES = (("attn_out", "attention", "what attention adds to the stream"),
                 ("mlp_out", "mlp", "what the MLP adds to the stream"))
_HOW = {"args[0]": "its first positional input, args[0]",
        "kwargs['hidden_states']": "kwargs['hidden_states'] (register with with_kwargs=True)",
        "first input": "its first input (args[0], or kwargs['hidden_states'] with with_kwargs=True)",
        "output": "its output", "output[0]": "output[0]"}


@dataclass
class HookSite:
    """Which module and hook kind capture one site of the residual stream (or a branch output)."""

    site: str  # "resid_pre" | "resid_mid" | "resid_post" | "attn_out" | "mlp_out" | "final" (the final norm)
    module: str | None  # real path in the model; None when the site does not exist
    hook: str | None  # "forward_pre" | "forward"
    take: str | None  # "args[0]" | "kwargs['hidden_states']" | "first input" | "output" | "output[0]"
    note: str = ""  # what the site holds, or why there is none


def _take_input(via: str | None) -> str:
    return via if via in ("args[0]", "kwargs['hidden_states']") else "first input"


def _take_output(kind: str | None) -> str:
    return "output[0]" if kind == "tuple" else "output"


def _table_module(spec: ArchSpec, site: str) -> str | None:
    """The module the hook-site table names for ``site`` (relative to the layer), or None."""
    hook = site_hook(spec, site)
    return hook.module if isinstance(hook, SiteHook) else None


def _layer_sites(g: LayerGraph, spec: ArchSpec) -> tuple[HookSite, HookSite]:
    """resid_pre and resid_post: the table's hooks on the layer itself, taken as the trace saw them."""
    pre, post = site_hook(spec, "resid_pre"), site_hook(spec, "resid_post")
    assert isinstance(pre, SiteHook) and isinstance(post, SiteHook) and pre.module == post.module == ""
    tensor_note = " (the layer returns a tensor: output[0] would be the first batch row)"
    return (HookSite("resid_pre", g.layer_path, pre.hook, _take_input(g.input_via),
                     f"the hidden states entering layer {g.layer} (= output_hidden_states[{g.layer}])"),
            HookSite("resid_post", g.layer_path, post.hook, _take_output(g.output_kind),
                     f"the hidden states leaving layer {g.layer}" + (tensor_note if g.output_kind == "tensor" else "")))


def _mid_site(g: LayerGraph, spec: ArchSpec, paths: dict[str, nn.Module]) -> HookSite:
    """resid_mid: the table's module when the trace shows it reading the stream between the joins."""
    if len(g.joins) < 2:
        return HookSite("resid_mid", None, None, None,
                        f"none: a {g.style_name} layer adds attention and MLP to the stream in one join")
    rel = _table_module(spec, "resid_mid")  # two joins: the layer is not parallel
    lp = g.layer_path
    consumers = [g.node(i) for i in g.mid_consumers]
    chosen = next((n for n in consumers if n.name == rel), consumers[0] if consumers else None)
    note = _MID_NOTE
    if chosen is None and rel and f"{lp}.{rel}" in paths:
        chosen = g.node_named(rel)
    if chosen is not None:
        if g.source == "trace" and rel and chosen.name != rel:
            note += f" (the spec table names {rel}; the trace shows {chosen.name} reading it)"
        return HookSite("resid_mid", chosen.path, "forward_pre", _take_input(chosen.input_via), note)
    if rel and f"{lp}.{rel}" in paths:
        return HookSite("resid_mid", f"{lp}.{rel}", "forward_pre", "first input", note)
    return HookSite("resid_mid", None, None, None, "no module reads the stream between the joins")


def _terminal_for(g: LayerGraph, kind: str) -> Node | None:
    for j in g.joins:
        has = any(g.node(b).kind == kind for b in j.branch)
        if has:
            for t in j.terminals:
                tn = g.node(t)
                if tn.kind == kind or len(j.terminals) == 1:
                    return tn
    return None


def _branch_site(g: LayerGraph, spec: ArchSpec, site: str, kind: str, what: str,
                 paths: dict[str, nn.Module]) -> HookSite:
    """attn_out / mlp_out: the table's module, or the module the trace shows feeding the join."""
    hook = site_hook(spec, site)
    assert isinstance(hook, SiteHook) and hook.hook == "forward"
    rel = hook.module
    n = g.node_named(rel) if rel else None
    note = what
    terminals = [g.node(t) for j in g.joins for t in j.terminals]
    if g.source == "trace" and (n is None or n not in terminals):
        alt = _terminal_for(g, kind)
        if alt is not None:
            note += f" (the spec table names {rel}; the trace shows {alt.name} feeding the join)"
            n = alt
    if n is not None:
        return HookSite(site, n.path, hook.hook, _take_output(n.output_kind), note)
    if rel and f"{g.layer_path}.{rel}" in paths:
        return HookSite(site, f"{g.layer_path}.{rel}", hook.hook, "output", note)
    return HookSite(site, None, None, None, f"not found ({rel})")


def _final_site(model: nn.Module, g: LayerGraph, spec: ArchSpec, paths: dict[str, nn.Module]) -> HookSite:
    """final: the table's final norm, at the same prefix as the layer list."""
    hook = site_hook(spec, "final")
    if not isinstance(hook, SiteHook):
        return HookSite("final", None, None, None, "none: in a post-norm model each layer's output is already normed")
    prefix = g.layer_path[: -len(f"{spec.layers_path}.{g.layer}")]
    path = f"{prefix}{hook.module}"
    if path in paths:
        return HookSite("final", path, hook.hook, "output", "the final norm after the last layer")
    return HookSite("final", None, None, None, f"{path} is not in this {type(model).__name__}")


def hook_sites(model: nn.Module, spec: ArchSpec, graph: LayerGraph) -> list[HookSite]:
    """The module and hook for every site (resid_pre, resid_mid, resid_post, attn_out, mlp_out, final), with the
    loaded model's real paths, checked against the trace."""
    paths = dict(model.named_modules())
    pre, post = _layer_sites(graph, spec)
    sites = [pre, _mid_site(graph, spec, paths), post]
    sites += [_branch_site(graph, spec, site, kind, what, paths) for site, kind, what in _BRANCH_SITES]
    sites.append(_final_site(model, graph, spec, paths))
    return sites


def _mlp_modules(g: LayerGraph, spec: ArchSpec, sites: list[HookSite]) -> list[str]:
    """The MLP module(s) a notebook would hook: the mlp_out site and any node called ``mlp``."""
    out = [s.module for s in sites if s.site == "mlp_out" and s.module]
    out += [n.path for n in g.nodes if n.name.rsplit(".", 1)[-1] == "mlp" and n.path not in out]
    return out or [f"{g.layer_path}.{spec.mlp_out}"]


def hook_guide(model: nn.Module, spec: ArchSpec, graph: LayerGraph,
               sites: list[HookSite] | None = None) -> list[str]:
    """Lines: which module and which hook capture each site, with the loaded model's real module paths.
    ``sites`` defaults to :func:`hook_sites` of the graph."""
    sites = hook_sites(model, spec, graph) if sites is None else sites
    lines = [f"hooks for layer {graph.layer} (module paths in the loaded {type(model).__name__}):"]
    for s in sites:
        if s.module is None:
            lines.append(f"  {s.site:<10} {s.note}")
            continue
        kind = "forward pre-hook" if s.hook == "forward_pre" else "forward hook"
        lines.append(f"  {s.site:<10} {kind} on {s.module}: {_HOW[s.take or 'output']} — {s.note}")
    mlps = " or ".join(_mlp_modules(graph, spec, sites))
    layers = graph.layer_path.rsplit(".", 1)[0]
    pre = sites[0]
    lines.append(f"note: a forward hook on the MLP output ({mlps}) gives what the MLP adds to the stream, not "
                 f"the residual stream; the token representations at the input of decoder layer L are resid_pre: "
                 f"a forward pre-hook on {layers}.<L>, {pre.take}")
    return lines


def register_site_hook(model: nn.Module, site: HookSite, fn: Callable[[torch.Tensor], None]):
    """Register the hook ``site`` describes (through :func:`headlens.residual.capture.register`); ``fn`` receives
    the captured hidden states. Returns the handle."""
    if site.module is None:
        raise HeadlensError(f"{site.site} has no module to hook: {site.note}")
    assert site.hook in ("forward_pre", "forward"), site.hook
    return register(model.get_submodule(site.module), SiteHook(site.site, site.module, site.hook), fn)
