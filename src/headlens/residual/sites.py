"""The hook-site table: which module and which hook give each residual-stream site, per family.

One table serves every command that hooks the stream (capture, ``sphere``, ``sweep`` calibration, ``diagram``'s
hook guide). It is derived from the spec table (:mod:`headlens.arch`): module names are relative to one layer,
so they hold for any prefix the loaded model uses. ``diagram`` checks these entries against the traced
structure of the real layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from headlens.arch import ArchSpec

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "final")


@dataclass(frozen=True)
class SiteHook:
    """How to capture one site: a forward pre-hook (the module's hidden-states input) or a forward hook (its
    output, or ``output[0]`` when it returns a tuple)."""

    site: str  # one of SITES
    module: str  # relative to the layer ("" is the layer itself); for "final", relative to the layer list's parent
    hook: str  # "forward_pre" | "forward"

    def describe(self, spec: ArchSpec, final_path: str | None = None) -> str:
        """The line headlens prints for this site, e.g. ``forward pre-hook on layers.<l> (its hidden_states input)``."""
        if self.site == "final":
            return f"forward hook on {final_path or self.module} (output)"
        lp = f"{spec.layers_path}.<l>"
        if self.module == "":
            return (f"forward pre-hook on {lp} (its hidden_states input)" if self.hook == "forward_pre"
                    else f"forward hook on {lp} (its output)")
        if self.hook == "forward_pre":
            return f"forward pre-hook on {lp}.{self.module} (its input)"
        return f"forward hook on {lp}.{self.module} (output)"


def is_parallel(spec: ArchSpec, config) -> bool:
    """Whether this model's layers add attention and MLP to the stream in parallel (no resid_mid)."""
    if spec.residual == "parallel" and not spec.parallel_flag:
        return True
    if not spec.parallel_flag:
        return False
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return bool(get(spec.parallel_flag, False))


def site_hook(spec: ArchSpec, site: str, parallel: bool = False) -> SiteHook | str:
    """The hook for ``site`` in this family, or a one-line reason why the family has no such site."""
    if site == "resid_pre":
        return SiteHook(site, "", "forward_pre")
    if site == "resid_post":
        return SiteHook(site, "", "forward")
    if site == "resid_mid":
        if parallel or not spec.mid_input:
            return f"{spec.family} layers add attention and MLP to the same stream in parallel: there is no resid_mid"
        return SiteHook(site, spec.mid_input, "forward_pre")
    if site == "attn_out":
        return SiteHook(site, spec.attn_out, "forward")
    if site == "mlp_out":
        return SiteHook(site, spec.mlp_out, "forward")
    if site == "final":
        if not spec.final_norm:
            return f"{spec.family} has no final norm after the last layer"
        return SiteHook(site, spec.final_norm, "forward")
    raise ValueError(site)


def attention_input_hook(spec: ArchSpec) -> SiteHook:
    """The attention input of a layer: the first input of its attention module (the pre-attention norm's output
    in pre-norm families, the previous layer's output in post-norm BERT)."""
    return SiteHook("attn_in", spec.attn_module, "forward_pre")
