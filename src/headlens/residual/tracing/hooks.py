"""Which module and which hook capture each residual site of one layer, with the loaded model's real paths.

The answer is the site plan every capture uses (:mod:`headlens.residual.plan`): the spec's hook-site table checked
against the traced graph. ``resid_mid`` is the module the trace shows carrying the stream after the first join, and
``attn_out`` / ``mlp_out`` the modules whose outputs are added, or a difference of sites where no module outputs
what is added. Where the trace disagrees with the table, the note says so and the trace wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from headlens.arch import ArchSpec
from headlens.errors import HeadlensError
from headlens.residual.capture import register
from headlens.residual.plan import SitePlan, plan_from
from headlens.residual.sites import SiteHook, site_hook
from headlens.residual.tracing.graph import LayerGraph

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


def _layer_sites(g: LayerGraph) -> tuple[HookSite, HookSite]:
    """resid_pre and resid_post: hooks on the layer itself, taken as the trace saw them."""
    tensor_note = " (the layer returns a tensor: output[0] would be the first batch row)"
    return (HookSite("resid_pre", g.layer_path, "forward_pre", _take_input(g.input_via),
                     f"the hidden states entering layer {g.layer} (= output_hidden_states[{g.layer}])"),
            HookSite("resid_post", g.layer_path, "forward", _take_output(g.output_kind),
                     f"the hidden states leaving layer {g.layer}" + (tensor_note if g.output_kind == "tensor" else "")))


_WHAT = {"resid_mid": _MID_NOTE, **{site: what for site, _kind, what in _BRANCH_SITES}}


def _planned_site(g: LayerGraph, plan: SitePlan, site: str, paths: dict[str, nn.Module]) -> HookSite:
    """One of resid_mid / attn_out / mlp_out as the plan obtains it, with the loaded model's real path."""
    if site in plan.missing:
        if site == "resid_mid" and plan.parallel:
            return HookSite(site, None, None, None,
                            f"none: a {g.style_name} layer adds attention and MLP to the stream in one join")
        return HookSite(site, None, None, None, f"none: {plan.missing[site]}")
    if site in plan.derived:
        terms = " ".join(("+ " if c > 0 else "- ") + s for c, s in plan.derived[site]).lstrip("+ ")
        return HookSite(site, None, None, None, f"{terms}: no module outputs it (the layer scales the branch before "
                                               f"the add); hook those sites and take the difference")
    hook = plan.hooks[site]
    note = _WHAT[site]
    if site == "resid_mid" and plan.post_norms:
        note = f"the stream after {plan.post_norms[0]} (the attention join, normed), before the MLP branch"
    note += "".join(f" ({n.split(': ', 1)[1]})" for n in plan.notes if n.startswith(site + ":"))
    node = g.node_named(hook.module)
    path = f"{g.layer_path}.{hook.module}"
    if path not in paths:
        return HookSite(site, None, None, None, f"not found ({hook.module})")
    if hook.hook == "forward_pre":
        return HookSite(site, path, hook.hook, _take_input(node.input_via if node else None), note)
    return HookSite(site, path, hook.hook, _take_output(node.output_kind if node else None), note)


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


def graph_plan(model: nn.Module, spec: ArchSpec, graph: LayerGraph) -> SitePlan:
    """The site plan of the traced graph (the one capture uses), or the spec table's for a template graph."""
    reason = "" if graph.traced is not None else graph.source_note
    return plan_from(model, spec, graph.traced, reason)


def hook_sites(model: nn.Module, spec: ArchSpec, graph: LayerGraph) -> list[HookSite]:
    """The module and hook for every site (resid_pre, resid_mid, resid_post, attn_out, mlp_out, final), with the
    loaded model's real paths, from the same site plan as every capture (:mod:`headlens.residual.plan`)."""
    paths = dict(model.named_modules())
    plan = graph_plan(model, spec, graph)
    pre, post = _layer_sites(graph)
    sites = [pre, _planned_site(graph, plan, "resid_mid", paths), post]
    sites += [_planned_site(graph, plan, site, paths) for site, _kind, _what in _BRANCH_SITES]
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
