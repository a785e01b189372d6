"""How a family stores one layer's q/k/v/o projections: the :class:`Layout` record and its splitter.

The spec table (:mod:`headlens.arch`) holds one Layout per storage scheme; every reader goes through its methods
(per-head block slices, whole-layer split, stored shapes, kv-head count from the shapes). HuggingFace
``nn.Linear.weight`` is ``[out, in]``; ``transposed`` layouts (GPT-2's ``Conv1D``) store ``[in, out]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from headlens.errors import HeadlensError

if TYPE_CHECKING:
    import torch

QKV = ("q", "k", "v")
Index = tuple[slice, slice]


@dataclass(frozen=True)
class Block:
    """Where one head's block of a projection lies in the tensor that stores it."""

    tensor: str  # role of the stored tensor: "q", "k", "v", "o" or "qkv"
    index: Index  # (rows, columns) of the stored tensor to read
    transposed: bool  # stored [in, out]: transpose what is read to get the Linear-layout block


@dataclass(frozen=True)
class LayerSplit:
    """One layer's projections split per head, Linear layout, as views of the stored tensors where possible."""

    W_Q: "torch.Tensor | None"  # (H, hd, d); None when q was not read
    W_K: "torch.Tensor | None"  # (G, hd, d); None when k was not read
    W_V: "torch.Tensor"  # (G, hd, d)
    W_O: "torch.Tensor"  # (H, d, hd)


@dataclass(frozen=True)
class Layout:
    """How a family stores one layer's q/k/v/o projections (names relative to the layer).

    Either ``q``, ``k`` and ``v`` are separate tensors, or ``qkv`` fuses them; the methods turn that into the
    slice of one head's block (:meth:`head_block`), the split of a whole layer (:meth:`split`), the expected
    stored shapes (:meth:`shapes`) and the kv-head count the stored shapes imply (:meth:`kv_heads`).
    """

    name: str  # a label: "separate", "fused_concat", "conv1d", "interleaved"
    o: str  # output projection: [d, H*hd] ([H*hd, d] when ``transposed``)
    q: str | None = None  # separate query projection [H*hd, d]
    k: str | None = None  # separate key projection [G*hd, d]
    v: str | None = None  # separate value projection [G*hd, d]
    qkv: str | None = None  # fused projection: [(H + 2G)*hd, d] rows ([d, (H + 2G)*hd] when ``transposed``)
    # Fused rows interleaved per kv group g: [q of the H/G query heads g serves; k_g; v_g] instead of blocks
    # q | k | v. With ``grouped=False`` (G = H) that is per head [q_h; k_h; v_h] (GPT-NeoX, Bloom).
    interleaved: bool = False
    transposed: bool = False  # every tensor stored [in, out], as GPT-2's Conv1D does
    grouped: bool = True  # a fused qkv may hold G < H kv heads (Phi-3, Falcon); False: it always holds H (G = H)

    def __post_init__(self) -> None:
        separate = self.q is not None and self.k is not None and self.v is not None
        if separate == (self.qkv is not None) or (self.qkv is None and self.interleaved):
            raise ValueError(f"layout {self.name}: give q, k and v, or one fused qkv")

    @property
    def fused(self) -> bool:
        """True when one tensor ``qkv`` holds q, k and v."""
        return self.qkv is not None

    @property
    def anchor_role(self) -> str:
        """The role of the tensor every layer has and shape inference reads with ``o``: ``v``, or ``qkv``."""
        return "qkv" if self.fused else "v"

    @property
    def anchor(self) -> str:
        """The relative name of the :attr:`anchor_role` tensor."""
        name = getattr(self, self.anchor_role)
        assert name is not None
        return name

    def stored(self, with_qk: bool = True) -> tuple[str, ...]:
        """Roles of the stored tensors a whole-layer read needs, in reading order."""
        if self.fused:
            return ("qkv", "o")
        return ("v", "o", "q", "k") if with_qk else ("v", "o")

    def shapes(self, H: int, G: int, hd: int, d: int) -> dict[str, tuple[int, int]]:
        """The stored shape of every tensor of the layout (role -> shape) for H query and G kv heads."""
        def stored(rows: int, cols: int) -> tuple[int, int]:  # Linear layout [rows, cols] as stored
            return (cols, rows) if self.transposed else (rows, cols)

        out = stored(d, H * hd)
        if not self.fused:
            return {"q": stored(H * hd, d), "k": stored(G * hd, d), "v": stored(G * hd, d), "o": out}
        return {"qkv": stored((H + 2 * G) * hd, d), "o": out}

    def _rows(self, role: str, head: int, H: int, G: int, hd: int) -> slice:
        """Linear-layout rows of query head (q) or kv head (k, v) ``head`` in the tensor that stores ``role``."""
        if not self.fused:
            start = head * hd
        elif self.interleaved:  # per kv group g: [q_{g*n} .. q_{g*n+n-1}; k_g; v_g], n = H/G query heads
            n = H // G
            group, offset = (head // n, head % n) if role == "q" else (head, n + QKV.index(role) - 1)
            start = (group * (n + 2) + offset) * hd
        else:  # q (H heads) | k (G heads) | v (G heads)
            start = ({"q": 0, "k": H, "v": H + G}[role] + head) * hd
        return slice(start, start + hd)

    def head_block(self, role: str, head: int, H: int, G: int, hd: int) -> Block:
        """Where ``role``'s block of one head is stored: query head ``head`` for q and o, kv head ``head``
        for k and v. Reading ``index`` (then ``.T`` when ``transposed``) gives ``(hd, d)`` for q/k/v and
        ``(d, hd)`` for o."""
        whole = slice(None)
        if role == "o":
            cols = slice(head * hd, (head + 1) * hd)
            return Block("o", (cols, whole) if self.transposed else (whole, cols), self.transposed)
        rows = self._rows(role, head, H, G, hd)
        tensor = "qkv" if self.fused else role
        return Block(tensor, (whole, rows) if self.transposed else (rows, whole), self.transposed)

    def split(self, stored: Mapping[str, "torch.Tensor"], H: int, G: int, hd: int, d: int) -> LayerSplit:
        """Per-head W_Q (H, hd, d), W_K (G, hd, d), W_V (G, hd, d), W_O (H, d, hd) from the stored tensors
        (role -> tensor, shapes as :meth:`shapes` says). W_Q/W_K are None when a separate q/k was not read."""
        def linear(role: str) -> "torch.Tensor | None":  # the stored tensor in Linear layout [out, in]
            t = stored.get(role)
            return t.T if t is not None and self.transposed else t

        W_O = linear("o").reshape(d, H, hd).permute(1, 0, 2)  # (d, H*hd) -> (H, d, hd)
        if not self.fused:
            q, k = linear("q"), linear("k")
            return LayerSplit(W_Q=q.reshape(H, hd, d) if q is not None else None,  # (H, hd, d)
                              W_K=k.reshape(G, hd, d) if k is not None else None,  # (G, hd, d)
                              W_V=linear("v").reshape(G, hd, d), W_O=W_O)  # (G, hd, d)
        qkv = linear("qkv")  # ((H + 2G)*hd, d)
        if self.interleaved:
            n = H // G
            per = qkv.reshape(G, n + 2, hd, d)  # (G, [q_1 .. q_n, k, v], hd, d)
            q = per[:, :n].reshape(H, hd, d)  # (H, hd, d): query head g*n + i is per[g, i]; strided, copied
            k, v = per[:, n].contiguous(), per[:, n + 1].contiguous()  # each (G, hd, d)
            return LayerSplit(W_Q=q, W_K=k, W_V=v, W_O=W_O)
        q, k, v = qkv[: H * hd], qkv[H * hd: (H + G) * hd], qkv[(H + G) * hd:]
        return LayerSplit(W_Q=q.reshape(H, hd, d), W_K=k.reshape(G, hd, d), W_V=v.reshape(G, hd, d),  # (., hd, d)
                          W_O=W_O)

    def widths(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int]:
        """(hidden size d, total head width H*hd, Linear-layout rows of the value or fused block) from the
        stored 2-D shapes of ``o`` and ``v``/``qkv`` (role -> shape)."""
        o, rows_of = shapes["o"], shapes[self.anchor_role]
        width, d = o if self.transposed else o[::-1]
        return d, width, rows_of[1] if self.transposed else rows_of[0]

    def kv_heads(self, rows: int, H: int, hd: int) -> int:
        """G from the Linear-layout rows of the value (or fused) block, for H query heads of dim ``hd``.

        Raises HeadlensError, pointing at ``num_heads``, when the rows do not fit the layout."""
        if not self.fused:
            if rows % hd:
                raise HeadlensError(f"value projection has {rows} rows, not a multiple of head_dim {hd}: "
                                    f"check `num_heads`")
            return rows // hd
        if not self.grouped:  # q, k, v fused for every head: no GQA
            if rows != 3 * H * hd:
                raise HeadlensError(f"fused qkv has {rows} outputs, expected 3 * {H} * {hd}: check `num_heads`")
            return H
        extra = rows - H * hd
        if rows % hd or extra <= 0 or extra % (2 * hd):
            raise HeadlensError(f"fused qkv projection has {rows} rows, which is not (H + 2G) * head_dim for "
                                f"H={H}, head_dim={hd}: check `num_heads`")
        return extra // (2 * hd)
