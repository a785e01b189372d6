"""Which modules give each residual site *exactly*, read off a recording: the traced answer to the hook-site table.

A hook gives a site only when the hooked tensor is the very value the layer adds or carries (up to reshapes, casts
and dropout). The trace knows: the operand of each join, the stream value after it (after its post-norm, in BERT),
and every module's input and output keys. So:

- ``attn_out`` / ``mlp_out``: the module whose output *is* the branch operand of a join; in a single parallel join
  the two modules whose outputs are summed into it. None when no module's output is added as it is (Granite
  multiplies each branch by ``residual_multiplier`` before the add: the site is then derived by difference);
- ``resid_mid``: a module whose hidden-states input is the stream after the first join (forward pre-hook), else one
  whose output is (forward hook);
- ``parallel``: the layer adds attention and MLP to one stream value: one join, or a second join whose branch never
  reads the first join's result (Cohere, StableLM, Phi-1/2 add ``residual + attn + mlp`` left to right);
- ``post_norms``: the norm that continues the stream after each join (post-norm BERT).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from headlens.residual.tracing.module_info import is_transparent, module_kind
from headlens.residual.tracing.recorder import ADD_NAMES, Recorder
from headlens.residual.tracing.stream import Flow, RawJoin, ancestors

_MAX_WALK = 20000  # lineage steps followed back when asking whether one value depends on another


@dataclass
class TracedSites:
    """What the trace shows for the site table (module names relative to the layer)."""

    parallel: bool  # attention and MLP are added to the same stream value (no resid_mid)
    attn_out: str | None = None  # forward hook, output: exactly what attention adds; None: derive it
    mlp_out: str | None = None  # forward hook, output: exactly what the MLP adds; None: derive it
    resid_mid: tuple[str, str] | None = None  # (module, "forward_pre" | "forward"); None: no module carries it
    post_norms: list[str] = field(default_factory=list)  # post-norm layers: the norm after each join
    n_joins: int = 0  # residual additions found

    def to_json(self) -> dict:
        return {"parallel": self.parallel, "attn_out": self.attn_out, "mlp_out": self.mlp_out,
                "resid_mid": list(self.resid_mid) if self.resid_mid else None, "post_norms": self.post_norms,
                "n_joins": self.n_joins}


class _Exact:
    """Look-ups over one recording: the modules whose input or output is a value, and value dependencies."""

    def __init__(self, rec: Recorder, flow: Flow):
        self.rec, self.flow = rec, flow
        self.op_of = {k: op for op in rec.ops for k in op.out_keys if k not in op.in_keys}
        calls = [c for c in rec.calls[1:] if c.exited and not is_transparent(c.module)]
        names = [c.name for c in calls]
        self.calls = [c for c in calls if names.count(c.name) == 1]  # a module called twice is no site

    def _outermost(self, calls) -> str | None:
        calls = sorted(calls, key=lambda c: (len(ancestors(self.rec.calls, c.idx)), c.idx))
        return calls[0].name if calls else None

    def output_of(self, key) -> str | None:
        """The outermost module whose (first) output is the value ``key``."""
        root = self.flow.root(key)
        return self._outermost([c for c in self.calls if c.out_keys and c.output_kind in ("tensor", "tuple")
                                and self.flow.root(c.out_keys[0]) == root])

    def input_of(self, key) -> str | None:
        """The outermost module whose hidden-states input (args[0] or kwargs['hidden_states']) is ``key``."""
        root = self.flow.root(key)
        return self._outermost([c for c in self.calls if c.main_key is not None and c.via in
                                ("args[0]", "kwargs['hidden_states']") and self.flow.root(c.main_key) == root])

    def summands(self, key) -> list:
        """The two operands of the tensor addition that produced ``key`` (through aliases), or []."""
        op = self.op_of.get(self.flow.root(key))
        if op is None or op.name not in ADD_NAMES or op.operands is None:
            return []
        return list(op.operands)

    def depends_on(self, key, target) -> bool:
        """Whether the value ``key`` was computed from the value ``target``."""
        flow, target = self.flow, self.flow.root(target)
        todo, seen, steps = [key], set(), 0
        while todo and steps < _MAX_WALK:
            k = flow.root(todo.pop())
            steps += 1
            if k == target:
                return True
            if k in seen:
                continue
            seen.add(k)
            todo.extend(flow.parents.get(k, []))
            latest = flow.latest.get(k[0])
            if not flow.parents.get(k) and latest is not None and latest != k:
                todo.append(latest)
        return False


def _assign(names: list[str | None], rec_calls) -> tuple[str | None, str | None]:
    """(attention module, MLP module) among the modules whose outputs are added, by kind then by order."""
    kinds = {n: module_kind(n, next((c.module for c in rec_calls if c.name == n), None)) for n in names if n}
    attn = next((n for n in names if n and kinds[n] == "attention"), None)
    mlp = next((n for n in names if n and kinds[n] == "mlp"), None)
    if attn is None and mlp is None and len(names) == 2:
        attn, mlp = names
    return attn, mlp


def traced_sites(rec: Recorder, flow: Flow, joins: list[RawJoin], conts: list[tuple[int, tuple]]) -> TracedSites:
    """The exact site modules of a recording (its joins from :func:`~.stream.find_stream`)."""
    ex = _Exact(rec, flow)
    norm_after = {key: i for i, key in conts}
    stream = [flow.root(rec.calls[0].main_key)]  # the value on the stream after each join (post-norm included)
    post_norms: list[str] = []
    for j in joins:
        res = flow.root(j.result)
        if res in norm_after:
            norm = rec.calls[norm_after[res]]
            post_norms.append(norm.name)
            res = flow.root(norm.out_keys[0])
        stream.append(res)
    out = TracedSites(parallel=False, post_norms=post_norms if len(post_norms) == len(joins) else [],
                      n_joins=len(joins))
    if len(joins) == 1:
        out.parallel = True
        parts = ex.summands(joins[0].branch)
        out.attn_out, out.mlp_out = _assign([ex.output_of(k) for k in parts], rec.calls) if parts else (None, None)
        return out
    if len(joins) != 2:
        return out
    first, second = joins
    if not ex.depends_on(second.branch, stream[1]):  # residual + attn + mlp, added left to right
        out.parallel = True
        out.attn_out, out.mlp_out = _assign([ex.output_of(first.branch), ex.output_of(second.branch)], rec.calls)
        return out
    out.attn_out, out.mlp_out = ex.output_of(first.branch), ex.output_of(second.branch)
    reader = ex.input_of(stream[1])
    if reader is not None:
        out.resid_mid = (reader, "forward_pre")
    else:
        maker = ex.output_of(stream[1])
        out.resid_mid = (maker, "forward") if maker is not None else None
    return out
