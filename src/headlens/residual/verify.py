"""The residual identities, checked at run time on the first forward of a capture, one layer at a time.

For every layer, with the sites a :class:`~headlens.residual.plan.SitePlan` hooks:

- sequential layers: ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out``;
- parallel layers: ``resid_post = resid_pre + attn_out + mlp_out``;
- post-norm layers (BERT): ``resid_mid = norm1(resid_pre + attn_out)`` and ``resid_post = norm2(resid_mid + mlp_out)``
  through the layer's real norm modules;
- and between layers: ``resid_pre[l + 1] = resid_post[l]``.

An identity holds when ``||got - want|| <= TOL_EPS * eps * max(||got||, ||want||)``, with ``eps`` of the least
precise tensor involved: one correctly rounded addition is off by at most ``eps / 2`` of the result. A wrong hook
site is off by the size of a whole branch. :class:`SiteStream` holds one layer's tensors at a time (on the model's
device), stores what was asked for, computes the sites a plan derives by difference, and raises HeadlensError
naming the family and the site when an identity fails.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from headlens.errors import HeadlensError
from headlens.residual.plan import SitePlan

TOL_EPS = 16  # tolerance in units of the working precision's machine epsilon


def mismatch(got: torch.Tensor, want: torch.Tensor, *parts: torch.Tensor) -> float | None:
    """The relative error of ``got`` against ``want`` when it is above the tolerance, else None."""
    if got.shape != want.shape:
        return float("inf")
    eps = max(torch.finfo(t.dtype).eps for t in (got, want, *parts) if t.is_floating_point())
    g, w = got.double(), want.double()
    scale = max(float(g.norm()), float(w.norm()), 1e-30)
    rel = float((g - w).norm()) / scale
    return None if rel <= TOL_EPS * eps else rel  # nan and inf fail


def _checks(plan: SitePlan, module: nn.Module, cur: dict[str, torch.Tensor]):
    """(identity text, site to blame, got, want, operands) for the identities the plan's hooks make testable."""
    h = plan.hooks
    pre, post = cur["resid_pre"], cur["resid_post"]
    attn, mlp, mid = cur.get("attn_out"), cur.get("mlp_out"), cur.get("resid_mid")
    out = []
    if plan.parallel:
        if attn is not None and mlp is not None:
            out.append(("resid_post = resid_pre + attn_out + mlp_out", "attn_out/mlp_out", post,
                        pre.double() + attn.double() + mlp.double(), (pre, attn, mlp)))
    elif plan.post_norm:
        if len(plan.post_norms) == 2 and mid is not None and attn is not None and mlp is not None:
            norm1, norm2 = (module.get_submodule(n) for n in plan.post_norms)
            out.append((f"resid_mid = {plan.post_norms[0]}(resid_pre + attn_out)", "resid_mid", mid,
                        norm1(pre + attn), (pre, attn)))
            out.append((f"resid_post = {plan.post_norms[1]}(resid_mid + mlp_out)", "resid_post", post,
                        norm2(mid + mlp), (mid, mlp)))
    else:
        if "resid_mid" in h and "attn_out" in h:
            out.append(("resid_mid = resid_pre + attn_out", "resid_mid", mid, pre.double() + attn.double(),
                        (pre, attn)))
        if "resid_mid" in h and "mlp_out" in h:
            out.append(("resid_post = resid_mid + mlp_out", "mlp_out", post, mid.double() + mlp.double(), (mid, mlp)))
        if "resid_mid" not in h and "attn_out" in h and "mlp_out" in h:
            out.append(("resid_post = resid_pre + attn_out + mlp_out", "attn_out/mlp_out", post,
                        pre.double() + attn.double() + mlp.double(), (pre, attn, mlp)))
    return out


def check_layer(plan: SitePlan, layer: int, module: nn.Module, cur: dict[str, torch.Tensor],
                prev_post: torch.Tensor | None, describe: Callable[[str], str]) -> str | None:
    """The first residual identity that fails at ``layer`` (one line naming the family and the site), or None.

    ``cur`` holds the layer's hooked sites, ``prev_post`` the previous layer's resid_post (None for the first)."""
    absent = [s for s in plan.hooks if s not in cur]
    if absent:
        return (f"{plan.family}: the {absent[0]} hook ({describe(absent[0])}) did not fire at layer {layer}, so "
                "the residual sites of this model cannot be checked")
    checks = _checks(plan, module, cur)
    if prev_post is not None:
        checks.insert(0, (f"resid_pre of layer {layer} = resid_post of layer {layer - 1}", "resid_pre",
                          cur["resid_pre"], prev_post, (prev_post,)))
    for identity, site, got, want, parts in checks:
        rel = mismatch(got, want, *parts)
        if rel is not None:
            return (f"{plan.family}: {identity} fails at layer {layer} (relative error {rel:.2e}): the hook for "
                    f"{site} does not give the residual stream; refusing to print numbers from it")
    return None


class SiteStream:
    """The callbacks of one capture: keep each layer's hooked sites until the layer returns, store the requested
    ones (``store``: site -> layer -> tensor), derive the others, and check the identities of ``verify`` layers."""

    def __init__(self, plan: SitePlan, store: dict[str, dict[int, torch.Tensor]], keep: Callable, layers: list[int],
                 verify: list[int], describe: Callable[[str], str]):
        self.plan, self.store, self.keep, self.describe = plan, store, keep, describe
        self.layers = set(layers)
        self.hooked = {s for s in store if s in plan.hooks}
        self.derived = {s for s in store if s in plan.derived}
        self.pending = set(verify)  # layers whose identities are still to check (the first forward)
        self.cur: dict[str, torch.Tensor] = {}
        self.prev: tuple[int, torch.Tensor] | None = None
        self.busy = False  # inside a check: the norm modules it calls must not record
        self.shape: torch.Size | None = None  # the stream's shape, (B, N, d), from the layer's input

    def _holds(self, layer: int) -> bool:
        return layer in self.pending or (layer in self.layers and bool(self.derived))

    def saver(self, layer: int, site: str) -> Callable[[torch.Tensor], None]:
        def save(x: torch.Tensor) -> None:
            if self.busy:
                return
            if site == "resid_pre":
                self.shape = x.shape
            elif self.shape is not None and x.shape != self.shape and x.numel() == self.shape.numel():
                x = x.reshape(self.shape)  # a layer that works on flattened (B*N, d) rows (OPT's MLP)
            if layer in self.layers and site in self.hooked:
                self.store[site][layer] = self.keep(x)
            if self._holds(layer):
                self.cur[site] = x.detach().clone()  # the layer may change it in place later
        return save

    def layer_done(self, layer: int, module: nn.Module):
        """Forward hook on the layer, registered after its site hooks: derive, check, forget the layer."""
        def hook(_module, _args, _output) -> None:
            if self.busy:
                return
            cur, self.cur = self.cur, {}
            if layer in self.layers:
                for site in self.derived:
                    terms = self.plan.derived[site]
                    if any(s not in cur for _, s in terms):
                        raise HeadlensError(f"{self.plan.family}: the hooks {site} is derived from did not fire at "
                                            f"layer {layer}")
                    self.store[site][layer] = self.keep(sum(c * cur[s] for c, s in terms))
            if layer in self.pending:
                self.pending.discard(layer)
                prev = self.prev[1] if self.prev is not None and self.prev[0] == layer - 1 else None
                self.busy = True
                try:
                    with torch.no_grad():
                        problem = check_layer(self.plan, layer, module, cur, prev, self.describe)
                finally:
                    self.busy = False
                if problem is not None:
                    raise HeadlensError(problem)
            self.prev = (layer, cur["resid_post"]) if self.pending and "resid_post" in cur else None
        return hook
