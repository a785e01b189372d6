"""Where the residual stream runs in a recording: tensor lineage, the joins, and post-norm continuations.

The stream starts at the layer's input. An addition with exactly one operand on the stream (and the layer's
input shape) is a residual *join*; its result is on the stream. A norm applied to a join result that nothing
else reads (post-norm, BERT) continues the stream. Reshapes, casts, copies and dropout are the same value.
"""

from __future__ import annotations

from dataclasses import dataclass

from headlens.residual.tracing.module_info import is_transparent, module_kind
from headlens.residual.tracing.recorder import Call, Recorder, TensorKey

# Calls that only reshape, cast or copy one tensor: their result is the same value on the stream.
SHAPE_OPS = {
    "view", "reshape", "contiguous", "to", "float", "double", "half", "bfloat16", "type", "type_as", "clone",
    "detach", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "dropout", "dropout_",
    "alpha_dropout", "feature_alpha_dropout", "cpu", "cuda",
}
_BAN_ROUNDS = 4  # passes that drop norm continuations whose input something else reads


@dataclass
class RawJoin:
    """One residual addition as recorded."""

    op: int  # index of the addition in Recorder.ops
    residual: TensorKey  # the operand on the stream (the skip)
    branch: TensorKey  # the other operand (what the branch computed)
    result: TensorKey  # the sum, now the stream
    scope: tuple  # calls open when it ran
    event: int = -1  # position of the addition in Recorder.events


class Flow:
    """Tensor lineage of a recording: aliases (reshapes, casts, dropout) and parents of every op result."""

    def __init__(self, rec: Recorder):
        self.rec = rec
        self.alias: dict = {}
        self.parents: dict = {}
        self.latest: dict[int, tuple] = {}
        for op in rec.ops:
            for k in op.out_keys:
                if k in op.in_keys:
                    continue
                self.parents.setdefault(k, list(op.in_keys))
                if op.name in SHAPE_OPS and len(op.in_keys) == 1:
                    self.alias.setdefault(k, op.in_keys[0])
                self._seen(k)
            for k in op.in_keys:
                self._seen(k)
        for c in rec.calls:
            if is_transparent(c.module) and c.main_key is not None:
                for k in c.out_keys:
                    if k != c.main_key:
                        self.alias.setdefault(k, c.main_key)
            for k in c.in_keys + c.out_keys:
                self._seen(k)

    def _seen(self, k: tuple) -> None:
        prev = self.latest.get(k[0])
        if prev is None or prev[1] < k[1]:
            self.latest[k[0]] = k

    def root(self, k: tuple) -> tuple:
        """The value ``k`` is an alias of (following reshapes, casts and dropout)."""
        seen = set()
        while k in self.alias and k not in seen:
            seen.add(k)
            k = self.alias[k]
        return k


def ancestors(calls: list[Call], idx: int) -> list[int]:
    """Indices of the calls enclosing call ``idx``, innermost first."""
    out = []
    p = calls[idx].parent
    while p is not None:
        out.append(p)
        p = calls[p].parent
    return out


def _same_stream_shape(shape: list[int] | None, in_shape: list[int]) -> bool:
    """The layer's input shape, or a flattening of it (OPT adds the MLP on ``(B*N, d)`` rows)."""
    if shape is None or shape == in_shape:
        return shape is not None
    numel = 1
    for n in in_shape:
        numel *= n
    rows = 1
    for n in shape:
        rows *= n
    return bool(shape) and shape[-1] == in_shape[-1] and rows == numel


def _join_of(rec: Recorder, flow: Flow, i: int, stream: set) -> RawJoin | None:
    """The join op ``i`` makes, or None when it is not a stream + branch addition of the layer's shape."""
    op = rec.ops[i]
    if op.operands is None or not op.out_keys:
        return None
    a, b = (flow.root(k) for k in op.operands)
    on_a, on_b = a in stream, b in stream
    if on_a == on_b:
        return None
    in_shape = rec.calls[0].in_shape
    if in_shape is not None and not _same_stream_shape(op.out_shape, in_shape):
        return None
    return RawJoin(op=i, residual=op.operands[0] if on_a else op.operands[1],
                   branch=op.operands[1] if on_a else op.operands[0], result=op.out_keys[0], scope=op.scope)


def _stream_pass(rec: Recorder, flow: Flow, banned: set[int]) -> tuple[list[RawJoin], list[tuple[int, tuple]]]:
    """Walk the events in order: find joins and post-norm continuations (norm calls not in ``banned``).
    Returns (joins, [(norm call index, join result key it continues)])."""
    calls = rec.calls
    stream = {flow.root(calls[0].main_key)}
    joins: list[RawJoin] = []
    join_results: set = set()
    continuations: list[tuple[int, tuple]] = []
    for kind, i in rec.events:
        if kind == "op":
            join = _join_of(rec, flow, i, stream)
            if join is not None:
                joins.append(join)
                res = flow.root(join.result)
                stream.add(res)
                join_results.add(res)
        elif kind == "exit":
            c = calls[i]
            if i in banned or c.main_key is None or not c.out_keys or module_kind(c.name, c.module) != "norm":
                continue
            src = flow.root(c.main_key)
            if src in join_results:
                stream.add(flow.root(c.out_keys[0]))
                continuations.append((i, src))
    op_event = {i: e for e, (kind, i) in enumerate(rec.events) if kind == "op"}
    for j in joins:
        j.event = op_event[j.op]
    return joins, continuations


def _used_elsewhere(rec: Recorder, flow: Flow, key: tuple, norm_idx: int) -> bool:
    """Whether the join result ``key`` is read by anything but the norm call ``norm_idx`` (and its insides)."""
    calls = rec.calls
    if flow.root(calls[0].out_keys[0]) == key if calls[0].out_keys else False:
        return True
    inside = {norm_idx}
    for c in calls:
        if norm_idx in ancestors(calls, c.idx):
            inside.add(c.idx)
    for c in calls[1:]:
        if c.idx in inside:
            continue
        if any(flow.root(k) == key for k in c.in_keys):
            return True
    for op in rec.ops:
        if any(s in inside for s in op.scope):
            continue
        if op.name in SHAPE_OPS and len(op.in_keys) == 1:
            continue  # a reshape/cast of it: its uses are checked through the alias
        if any(flow.root(k) == key for k in op.in_keys):
            return True
    return False


def find_stream(rec: Recorder, flow: Flow) -> tuple[list[RawJoin], list[tuple[int, tuple]]]:
    """The layer's joins and the norm calls that continue the stream after a join (post-norm).

    A norm whose input something else also reads is a branch's norm, not the stream: such norms are banned
    and the walk repeated until nothing changes. Returns (joins, [(norm call index, join result key)]).
    """
    banned: set[int] = set()
    for _ in range(_BAN_ROUNDS):
        joins, conts = _stream_pass(rec, flow, banned)
        rejected = {i for i, key in conts if _used_elsewhere(rec, flow, key, i)}
        if rejected <= banned:
            break
        banned |= rejected
    conts = [(i, key) for i, key in conts if i not in banned]
    if not joins:
        raise RuntimeError("no residual addition found in the layer's forward")
    return joins, conts
