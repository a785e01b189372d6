"""Where :func:`headlens.compress.measure.measure` looks in the loaded model, and the hooks that sum each planned
layer's errors while the passes run (see :mod:`headlens.compress.measure` for the definitions).

:func:`find_site` locates a planned layer's value projection (or fused qkv), its output projection and the smallest
block holding both; :class:`Recorder` hooks every site and adds the value-path, isolated and accumulated sums into
a :class:`Tally`, re-running a layer's block with only that layer compressed inside the original pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from headlens.compress.apply import Prepared, applied, compressed, value_tensor
from headlens.compress.plan import LayerPlan
from headlens.errors import HeadlensError


@dataclass
class Tally:
    """Running sums over the eval texts."""

    vp_lost: dict = field(default_factory=dict)  # (layer, g) -> sum ||R_g (v - v')||^2
    vp_total: dict = field(default_factory=dict)  # (layer, g) -> sum ||R_g W_V^g x||^2
    o_total: dict = field(default_factory=dict)  # layer -> sum ||o - c||^2
    o_iso: dict = field(default_factory=dict)  # layer -> sum ||o' - o||^2
    o_acc: dict = field(default_factory=dict)  # layer -> sum ||o'' - o||^2
    h_lost: float = 0.0
    h_total: float = 0.0
    kl: list = field(default_factory=list)  # per text (N - 1,) KL
    top1: int = 0
    nll_before: float = 0.0
    nll_after: float = 0.0
    pooled_before: list = field(default_factory=list)  # per text (d,)
    pooled_after: list = field(default_factory=list)
    n_tokens: int = 0
    n_predicted: int = 0


def add_to(d: dict, key, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


def sq_norm(t: torch.Tensor) -> float:
    return float(torch.sum(t * t))


@dataclass
class Site:
    """Where one planned layer is measured in the loaded model."""

    layer: int
    plan: LayerPlan
    value: nn.Module  # the value (or fused qkv) projection
    out_slices: list[slice]  # per kv group, the value module's output features
    W_V: list[torch.Tensor]  # per kv group (hd, d) float64, the model's original value weights
    R: list[torch.Tensor]  # per kv group (hd, hd): ||M_g y|| = ||R_g y||
    o: nn.Module  # the output projection
    block: nn.Module  # the smallest module holding both: re-run for the isolated error
    bias_out: torch.Tensor  # (d,) float64: what ``o`` writes for the value bias alone (W_O b_v + b_o)
    prepared: Prepared | None = None  # this layer's new value blocks, computed once (else at every re-run)


def _common(a: str, b: str) -> str:
    """The longest common dotted prefix of two module paths (``""`` when none)."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
        n += 1
    return ".".join(pa[:n])


def find_site(model: nn.Module, ck, plan: LayerPlan) -> Site:
    from headlens.residual.modules import find_layer, find_module

    s, layout = ck.shape, ck.spec.layout
    layer = plan.layer
    vt = value_tensor(model, ck, layer)
    device = vt.param.device  # where the value module's inputs and outputs live (a device map may split layers)
    path, layer_mod = find_layer(model, ck.spec, layer)
    v_rel = vt.name[len(path) + 1:].rsplit(".", 1)[0]
    o_rel = layout.o.rsplit(".", 1)[0]
    o = find_module(model, ck.spec, layer, o_rel)  # one-line HeadlensError when the family's module is absent
    if not hasattr(o, "weight"):
        raise HeadlensError(f"layer {layer}'s output projection {path}.{o_rel} holds no weight")
    common = _common(v_rel, o_rel)
    block = layer_mod.get_submodule(common) if common else layer_mod
    slices, W_V = [], []
    for b in vt.blocks:
        rows, cols = b.index
        slices.append(cols if b.transposed else rows)
        t = vt.param.detach()[b.index]
        W_V.append((t.T if b.transposed else t).to(device, torch.float64, copy=True))  # never a view: the
        # parameter is overwritten while the latents are in place
    bias = getattr(vt.module, "bias", None)
    n = s.num_heads // s.num_kv_heads
    parts = []
    for h in range(s.num_heads):
        sl = slices[h // n]
        parts.append(bias.detach()[sl].clone() if isinstance(bias, torch.Tensor) else
                     torch.zeros(s.head_dim, dtype=vt.param.dtype, device=vt.param.device))
    z = torch.cat(parts).to(o.weight.dtype).reshape(1, 1, -1)
    with torch.no_grad():
        bias_out = as_rows(o(z))[0]
    return Site(layer=layer, plan=plan, value=vt.module, out_slices=slices, W_V=W_V,
                 R=[g.R.to(device, torch.float64) for g in plan.groups], o=o, block=block, bias_out=bias_out)


def as_rows(t) -> torch.Tensor:
    """A module output as float64 (tokens, features), copied (never aliasing a live buffer)."""
    from headlens.residual.modules import first_tensor

    t = first_tensor(t).detach()
    return t.reshape(-1, t.shape[-1]).to(torch.float64, copy=True)


class Recorder:
    """Forward hooks on every site of every configuration, summing the per-layer errors as the passes run.

    ``configs`` holds, per configuration, its sites by layer and its :class:`Tally`. ``mode`` names the pass:
    ``orig``, the unmodified model (run once per text for all configurations); ``iso``, a layer's block re-run
    inside the original pass with only that layer of configuration ``current`` compressed; ``acc``, every
    planned layer of configuration ``current`` compressed. Between the hooks a text keeps only what it still
    needs: per layer the value module's input and output and the output projection's original output (N x d
    each), shared by every configuration."""

    STAGES = ("x", "v", "o", "iso", "acc")  # what each text must have recorded at every site of a configuration

    def __init__(self, model: nn.Module, ck, configs: list[tuple[dict[int, Site], "Tally"]]):
        self.model, self.ck = model, ck
        self.configs = configs
        self.layers = sorted({layer for sites, _ in configs for layer in sites})
        self.mode = "orig"
        self.current = 0  # the configuration being re-run or compressed
        self.batch: list[int] = []  # the configurations of a batched re-run, in batch order
        self.batched: dict[int, bool] = {}  # layer -> the batched re-run agreed with the one-by-one re-runs
        self.check: dict[int, torch.Tensor] = {}  # layer -> what the output projection wrote in the check run
        self._last_o: torch.Tensor | None = None  # what the output projection wrote in the last one-by-one re-run
        self._stacks: dict = {}  # (layer, batch) -> the batch's value weights, stacked (see _stacked_weights)
        self.kept: dict[tuple[str, int], torch.Tensor] = {}
        self.hits: set[tuple] = set()
        self.handles: list = []

    def _first(self, layer: int) -> Site:
        return next(sites[layer] for sites, _ in self.configs if layer in sites)

    def __enter__(self) -> "Recorder":
        try:
            for layer in self.layers:
                s = self._first(layer)  # every configuration's site of a layer hooks the same modules
                self.handles.append(s.value.register_forward_hook(self._value(layer), with_kwargs=True))
                self.handles.append(s.o.register_forward_hook(self._out(layer)))
                self.handles.append(s.block.register_forward_hook(self._rerun(layer), with_kwargs=True))
                self._hook_shared_projections(layer)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _hook_shared_projections(self, layer: int) -> None:
        """In a batched re-run every row of the batch holds the same input, and only the values differ between
        configurations: the separate query and key projections then run on one row and their output is repeated
        over the batch (a pre-hook narrows the input, a hook widens the output), instead of computing the same
        product once per configuration. Fused qkv projections run on the whole batch."""
        from headlens.residual.modules import find_module, hidden_states_input

        layout = self.ck.spec.layout
        if layout.fused or layout.q is None or layout.k is None:
            return
        for rel in (layout.q, layout.k):
            try:
                mod = find_module(self.model, self.ck.spec, layer, rel.rsplit(".", 1)[0])
            except HeadlensError:
                return

            def narrow(_m, args, kwargs):
                if self.mode not in ("iso-batch", "iso-check"):
                    return None
                x = hidden_states_input(args, kwargs)[:1]
                return ((), {**kwargs, "hidden_states": x}) if "hidden_states" in kwargs else ((x, *args[1:]), kwargs)

            def widen(_m, _args, _kwargs, output):
                if self.mode not in ("iso-batch", "iso-check") or not isinstance(output, torch.Tensor):
                    return None
                return output.expand(len(self.batch), *output.shape[1:])

            self.handles.append(mod.register_forward_pre_hook(narrow, with_kwargs=True))
            self.handles.append(mod.register_forward_hook(widen, with_kwargs=True))

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.kept.clear()
        return False

    @contextlib.contextmanager
    def quiet(self):
        """Every hook inert inside the block (mode ``off``): a call that is no pass of the measurement (the key
        side's re-calls of an attention module on the cache route) records nothing and triggers no re-run."""
        mode, self.mode = self.mode, "off"
        try:
            yield
        finally:
            self.mode = mode

    def start_text(self) -> None:
        self.kept.clear()
        self.hits.clear()
        self.mode = "orig"

    def check_text(self) -> None:
        """Refuse (one line) when some hooked module was not called in one of the passes."""
        names = {"x": "value projection", "v": "value projection", "o": "output projection",
                 "iso": "value or output projection (isolated re-run)", "acc": "output projection (compressed pass)"}
        for c, (sites, _) in enumerate(self.configs):
            for layer in sites:
                for stage in self.STAGES:
                    key = (stage, layer) if stage in ("x", "v", "o") else (stage, layer, c)
                    if key not in self.hits:
                        raise HeadlensError(f"layer {layer}'s {names[stage]} was not called during the forward pass")

    def _value(self, layer: int):
        from headlens.residual.modules import hidden_states_input

        def hook(_m, args, kwargs, output):
            if self.mode == "orig":
                self.kept[("x", layer)] = as_rows(hidden_states_input(args, kwargs))
                self.kept[("v", layer)] = as_rows(output)
                self.hits.update({("x", layer), ("v", layer)})
            elif self.mode in ("iso-batch", "iso-check"):
                return self._batched_values(layer, _m, args, kwargs)
            elif self.mode == "iso" and ("v", layer) in self.kept and ("iso-v", layer, self.current) not in self.hits:
                sites, tally = self.configs[self.current]
                s = sites[layer]
                x, v, v_iso = self.kept[("x", layer)], self.kept[("v", layer)], as_rows(output)
                for g, sl in enumerate(s.out_slices):
                    add_to(tally.vp_lost, (layer, g), sq_norm(s.R[g] @ (v[:, sl] - v_iso[:, sl]).T))
                    add_to(tally.vp_total, (layer, g), sq_norm(s.R[g] @ (s.W_V[g] @ x.T)))
                self.hits.add(("iso-v", layer, self.current))
        return hook

    def _batched_values(self, layer: int, module, args, kwargs) -> torch.Tensor:
        """The value module's output in a batched re-run: row i computed with configuration ``batch[i]``'s value
        weights from the (identical) original input; its value-path sums are added in ``iso-batch`` mode."""
        from headlens.residual.modules import hidden_states_input

        X = hidden_states_input(args, kwargs)
        stacked = self._stacked_weights(layer, module)
        if stacked is not None:  # one batched product: row i with configuration batch[i]'s whole value weight
            weight, transposed, bias = stacked
            out_all = torch.bmm(X, weight if transposed else weight.transpose(1, 2))
            if bias is not None:
                out_all = out_all + bias
            outs = list(out_all.split(1))
        else:
            outs = []
            for i, c in enumerate(self.batch):
                with applied(self.configs[c][0][layer].prepared):  # type: ignore[arg-type]
                    outs.append(module.forward(X[i:i + 1]))  # forward, not __call__: this hook stays out of it
        if self.mode == "iso-batch" and stacked is not None and self._shared_R(layer):
            self._batched_value_path(layer, out_all)
            return out_all
        for c, out in zip(self.batch, outs):
            sites, tally = self.configs[c]
            s = sites[layer]
            if self.mode == "iso-batch":
                x, v, v_iso = self.kept[("x", layer)], self.kept[("v", layer)], as_rows(out)
                for g, sl in enumerate(s.out_slices):
                    add_to(tally.vp_lost, (layer, g), sq_norm(s.R[g] @ (v[:, sl] - v_iso[:, sl]).T))
                    add_to(tally.vp_total, (layer, g), sq_norm(s.R[g] @ (s.W_V[g] @ x.T)))
                self.hits.add(("iso-v", layer, c))
        return torch.cat(outs)

    def _shared_R(self, layer: int) -> bool:
        """Whether every configuration of the batch measures layer ``layer``'s groups with the same triangular
        factors R_g (they come from the stacked W_O alone, so they should; checked once per layer and batch)."""
        key = ("R", layer, tuple(self.batch))
        if key not in self._stacks:
            first = self.configs[self.batch[0]][0][layer].R
            self._stacks[key] = all(len(self.configs[c][0][layer].R) == len(first) and all(
                torch.equal(a, b) for a, b in zip(self.configs[c][0][layer].R, first)) for c in self.batch)
        return bool(self._stacks[key])

    def _batched_value_path(self, layer: int, out_all: torch.Tensor) -> None:
        """The value-path sums of every configuration of the batch at once: ``||R_g (v - v'_c)||^2`` from the
        (C, N, F) batched values, and ``||R_g W_V^g x||^2`` (the same for every configuration) once."""
        s0 = self.configs[self.batch[0]][0][layer]
        x, v = self.kept[("x", layer)], self.kept[("v", layer)]
        diff = v.unsqueeze(0) - out_all.detach().to(torch.float64).reshape(len(self.batch), -1, out_all.shape[-1])
        for g, sl in enumerate(s0.out_slices):
            lost = (diff[:, :, sl] @ s0.R[g].T).pow(2).sum(dim=(1, 2))
            total = sq_norm(s0.R[g] @ (s0.W_V[g] @ x.T))
            for i, c in enumerate(self.batch):
                tally = self.configs[c][1]
                add_to(tally.vp_lost, (layer, g), float(lost[i]))
                add_to(tally.vp_total, (layer, g), total)
        for c in self.batch:
            self.hits.add(("iso-v", layer, c))

    def _stacked_weights(self, layer: int, module) -> tuple[torch.Tensor, bool, torch.Tensor | None] | None:
        """(the value module's weight with each configuration of the batch written in, stacked (C, ...), whether it
        is stored [in, out] as GPT-2's Conv1D, the bias) for a plain Linear or Conv1D value module with one weight
        tensor; None otherwise (the batch then runs the module once per configuration). Built once per layer and
        batch."""
        key = (layer, tuple(self.batch))
        if key in self._stacks:
            return self._stacks[key]
        weight = getattr(module, "weight", None)
        kind = type(module).__name__
        got = None
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and (isinstance(module, nn.Linear) or kind == "Conv1D"):
            ws = []
            for c in self.batch:
                w = weight.detach().clone()
                for param, block, value in self.configs[c][0][layer].prepared.writes[layer]:  # type: ignore[union-attr]
                    if param is not weight:
                        ws = []
                        break
                    w[block.index] = value  # type: ignore[index]
                else:
                    ws.append(w)
                    continue
                break
            if len(ws) == len(self.batch):
                bias = getattr(module, "bias", None)
                got = (torch.stack(ws), kind == "Conv1D", bias.detach() if isinstance(bias, torch.Tensor) else None)
        self._stacks[key] = got
        return got

    def _out(self, layer: int):
        def hook(_m, _args, output):
            if self.mode in ("iso-batch", "iso-check"):
                from headlens.residual.modules import first_tensor

                o_all = first_tensor(output).detach()
                if self.mode == "iso-check":
                    self.check[layer] = o_all.to(torch.float64, copy=True)
                    return
                ref = self.kept[("o", layer)]
                for i, c in enumerate(self.batch):
                    add_to(self.configs[c][1].o_iso, layer, sq_norm(as_rows(o_all[i:i + 1]) - ref))
                    self.hits.add(("iso", layer, c))
                return
            o = as_rows(output)
            if self.mode == "orig":
                self.kept[("o", layer)] = o
                for sites, tally in self.configs:
                    if layer in sites:
                        add_to(tally.o_total, layer, sq_norm(o - sites[layer].bias_out))
                self.hits.add(("o", layer))
                return
            ref = self.kept.get(("o", layer))
            sites, tally = self.configs[self.current]
            if ref is None or layer not in sites:
                return
            if self.mode == "iso" and ("iso-v", layer, self.current) in self.hits \
                    and ("iso", layer, self.current) not in self.hits:
                self._last_o = o
                add_to(tally.o_iso, layer, sq_norm(o - ref))
                self.hits.add(("iso", layer, self.current))
            elif self.mode == "acc" and ("acc", layer, self.current) not in self.hits:
                add_to(tally.o_acc, layer, sq_norm(o - ref))
                self.hits.add(("acc", layer, self.current))
        return hook

    def _one_by_one(self, module, args, kwargs, layer: int, cs: list[int]) -> list[torch.Tensor]:
        """Re-run the block once per configuration in ``cs`` (``iso`` mode); returns what the output projection
        wrote each time (float64 rows)."""
        seen = []
        for c in cs:
            self.mode, self.current = "iso", c
            site = self.configs[c][0][layer]
            with (applied(site.prepared) if site.prepared is not None else
                  compressed(self.model, self.ck, [site.plan])):
                module.forward(*args, **kwargs)  # not module(...): the block's own hooks (this one, and
                # transformers' output-capturing hooks, which would record the re-run) stay out of it
            seen.append(self._last_o)
        return seen

    def _batched(self, module, args, kwargs, cs: list[int], mode: str) -> None:
        """Re-run the block once with the original input repeated len(cs) times along the batch, row i with
        configuration cs[i]'s values (the value module's hook swaps them in): one call instead of len(cs)."""
        from headlens.residual.modules import hidden_states_input

        x = hidden_states_input(args, kwargs)
        xb = x.expand(len(cs), *x.shape[1:]).contiguous()
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": xb}
        else:
            args = (xb, *args[1:])
        self.mode, self.batch = mode, cs
        try:
            module.forward(*args, **kwargs)
        finally:
            self.batch = []

    def _rerun(self, layer: int):
        def hook(module, args, kwargs, _output):
            if self.mode != "orig":
                return None
            cs = [c for c, (sites, _) in enumerate(self.configs) if layer in sites]
            can_batch = len(cs) > 1 and all(self.configs[c][0][layer].prepared is not None for c in cs)
            try:
                if can_batch and self.batched.get(layer):
                    self._batched(module, args, kwargs, cs, "iso-batch")
                else:
                    seen = self._one_by_one(module, args, kwargs, layer, cs)
                    if can_batch and layer not in self.batched:  # once per layer: does a batched re-run agree?
                        self.batched[layer] = self._agrees(module, args, kwargs, layer, cs, seen)
            finally:
                self.mode = "orig"
            self.kept.pop(("x", layer), None)  # every configuration has its value-path sums: drop the inputs
            self.kept.pop(("v", layer), None)
            return None
        return hook

    def _agrees(self, module, args, kwargs, layer: int, cs: list[int], seen: list) -> bool:
        """Whether a batched re-run (``iso-check``: nothing added) writes what the one-by-one re-runs wrote, to
        1e-3 of each configuration's isolated error plus round-off: a family whose block does not broadcast its
        other inputs over a larger batch, or computes something else with it, keeps the one-by-one re-runs."""
        try:
            self._batched(module, args, kwargs, cs, "iso-check")
        except Exception:  # noqa: BLE001 (any failure of the batched form means: do not use it)
            return False
        got = self.check.pop(layer, None)
        ref = self.kept[("o", layer)]
        if got is None or got.shape[0] != len(cs):
            return False
        eps = float(torch.finfo(first_param_dtype(module)).eps)
        for i, o in enumerate(seen):
            b = got[i].reshape(-1, got.shape[-1])
            if o is None or b.shape != o.shape:
                return False
            tol = 1e-3 * float(torch.linalg.norm(o - ref)) + 100 * eps * float(torch.linalg.norm(ref))
            if float(torch.linalg.norm(b - o)) > tol:
                return False
        return True


def first_param_dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32
