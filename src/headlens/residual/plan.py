"""The residual sites of a loaded model, from one source that is right for every family.

The hook-site table (:mod:`headlens.residual.sites`, from the spec table) says which module gives each site; a
traced forward of one layer (:mod:`headlens.residual.tracing.exact`) says which module *really* gives it. Where they
disagree, or the family has no spec of its own (the generic fallback, or a model opened by its blocks alone), the
trace wins and the plan notes it:

- OLMo 2 norms each sublayer's output before the add and has no pre-MLP norm: ``resid_mid`` is the MLP's input,
  ``attn_out`` the output of ``post_attention_layernorm``;
- GLM-4 norms each branch after it (``post_self_attn_layernorm``, ``post_mlp_layernorm``);
- Granite multiplies each branch by ``residual_multiplier`` before the add, so no module outputs what is added:
  ``attn_out = resid_mid - resid_pre`` and ``mlp_out = resid_post - resid_mid``, by difference;
- parallel layers (one join, or ``residual + attn + mlp`` added left to right) have no ``resid_mid``.

The table alone is used only when tracing fails. :func:`headlens.residual.capture.record_sites` captures through a
plan and checks the residual identities on its first forward (:mod:`headlens.residual.verify`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from headlens.arch import SPECS, ArchSpec
from headlens.errors import HeadlensError
from headlens.residual.sites import SiteHook, is_parallel, site_hook

LAYER_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
Derived = tuple[tuple[int, str], ...]  # ((+1, "resid_mid"), (-1, "resid_pre")): a signed sum of other sites


@dataclass
class SitePlan:
    """How to obtain each per-layer site of one model: a hook, a signed sum of hooked sites, or a reason why not."""

    family: str  # the family as messages name it, e.g. "OLMo 2" or "olmo2 (generic spec)"
    source: str  # "trace" | "spec table (tracing failed: ...)"
    parallel: bool  # attention and MLP are added to the same stream value: no resid_mid
    hooks: dict[str, SiteHook] = field(default_factory=dict)  # sites a hook captures
    derived: dict[str, Derived] = field(default_factory=dict)  # sites computed from hooked ones
    missing: dict[str, str] = field(default_factory=dict)  # site -> why the model has no such site
    post_norm: bool = False  # each join's result is normed, and the norm's output is the stream (BERT)
    post_norms: tuple[str, ...] = ()  # those norms, one per join, relative to the layer (when known)
    notes: list[str] = field(default_factory=list)  # where the trace corrected the table

    def describe(self, site: str, spec: ArchSpec) -> str:
        """How ``site`` is obtained, as the commands print it."""
        if site in self.hooks:
            return self.hooks[site].describe(spec)
        if site in self.derived:
            terms = " ".join(("+ " if c > 0 else "- ") + s for c, s in self.derived[site]).lstrip("+ ")
            return f"{terms} (no module outputs it: computed by difference from hooked sites)"
        return self.missing.get(site, "not available")


def family_name(model: nn.Module, spec: ArchSpec) -> str:
    """The family's readable name; for a model without its own spec, its ``model_type`` and the spec used."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in SPECS and SPECS[model_type] is spec:
        return spec.family
    return f"{model_type or type(model).__name__} ({spec.family})"


def _trace(model: nn.Module, spec: ArchSpec):
    """The traced sites of layer 0, or (None, reason) when tracing fails."""
    from headlens.residual.tracing.lineage import trace_layer

    try:
        graph = trace_layer(model, spec, 0)
    except HeadlensError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed trace falls back to the table
        text = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {text[0] if text else ''}"
    return graph.traced, ""


def _from_table(spec: ArchSpec, config, family: str, reason: str) -> SitePlan:
    parallel = is_parallel(spec, config)
    plan = SitePlan(family=family, source=f"spec table (tracing failed: {reason})", parallel=parallel)
    for site in LAYER_SITES:
        hook = site_hook(spec, site, parallel)
        if isinstance(hook, str):
            plan.missing[site] = hook
        else:
            plan.hooks[site] = hook
    plan.post_norm = spec.residual == "post"
    return plan


def _note(plan: SitePlan, spec: ArchSpec, site: str, traced: str | None, parallel: bool) -> None:
    table = site_hook(spec, site, parallel)
    named = table.module if isinstance(table, SiteHook) else None
    got = traced if traced is not None else "no module (derived by difference)"
    if named != traced:
        plan.notes.append(f"{site}: the spec table names {named or 'nothing'}; the trace shows {got}")


def _from_trace(spec: ArchSpec, traced, family: str) -> SitePlan:
    plan = SitePlan(family=family, source="trace", parallel=traced.parallel, post_norm=bool(traced.post_norms),
                    post_norms=tuple(traced.post_norms))
    plan.hooks["resid_pre"] = SiteHook("resid_pre", "", "forward_pre")
    plan.hooks["resid_post"] = SiteHook("resid_post", "", "forward")
    for site, module in (("attn_out", traced.attn_out), ("mlp_out", traced.mlp_out)):
        if module is not None:
            plan.hooks[site] = SiteHook(site, module, "forward")
        _note(plan, spec, site, module, traced.parallel)
    if traced.parallel:
        plan.missing["resid_mid"] = (f"{family} layers add attention and MLP to the same stream in parallel: "
                                     "there is no resid_mid")
    elif traced.resid_mid is not None:
        module, kind = traced.resid_mid
        plan.hooks["resid_mid"] = SiteHook("resid_mid", module, kind)
        if kind == "forward_pre":
            _note(plan, spec, "resid_mid", module, False)
    elif "attn_out" in plan.hooks and not plan.post_norm:
        plan.derived["resid_mid"] = ((1, "resid_pre"), (1, "attn_out"))
    else:
        plan.missing["resid_mid"] = f"no module of a {family} layer carries the stream between its two joins"
    _fill_by_difference(plan, family)
    return plan


def _fill_by_difference(plan: SitePlan, family: str) -> None:
    """attn_out / mlp_out that no module outputs: the difference of the stream around their join, where it is one."""
    have = set(plan.hooks) | set(plan.derived)
    for site, after, before in (("attn_out", "resid_mid", "resid_pre"), ("mlp_out", "resid_post", "resid_mid")):
        if site in plan.hooks:
            continue
        if not plan.parallel and not plan.post_norm and after in plan.hooks and before in plan.hooks:
            plan.derived[site] = ((1, after), (-1, before))
        elif site not in have:
            plan.missing[site] = f"no module of a {family} layer outputs {site}, and it is no difference of sites"


def plan_from(model: nn.Module, spec: ArchSpec, traced, reason: str = "") -> SitePlan:
    """The plan for traced sites (:class:`~headlens.residual.tracing.exact.TracedSites`), or from the spec's
    table when ``traced`` is None (``reason``: why tracing failed)."""
    family = family_name(model, spec)
    if traced is None:
        return _from_table(spec, getattr(model, "config", None), family, reason)
    return _from_trace(spec, traced, family)


def site_plan(model: nn.Module, spec: ArchSpec) -> SitePlan:
    """The :class:`SitePlan` of ``model``: the traced structure of its first layer, checked against the spec's
    hook-site table (the table alone when tracing fails)."""
    traced, reason = _trace(model, spec)
    return plan_from(model, spec, traced, reason)
