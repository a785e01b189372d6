"""Read one head's value and output blocks (the two factors of its OV circuit), or a whole layer's heads (with
their query and key blocks, the factors of the QK circuit, optionally with the q/k norms' gains folded in).

Where each block lies is the spec's :class:`~headlens.arch.Layout`'s business; this module reads, checks shapes
and finiteness, and converts. For one head only its rows/columns are read (safetensors slices), never the model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from headlens.arch import holds
from headlens.errors import HeadlensError
from headlens.io.checkpoint import Checkpoint


@dataclass
class HeadFactors:
    """``W_OV^h = W_O^h @ W_V^g`` as its two thin factors (float64 unless asked otherwise)."""

    layer: int
    head: int  # query head h
    kv_head: int  # g = h // (H / G)
    W_O: torch.Tensor  # (d, hd)
    W_V: torch.Tensor  # (hd, d); input side scaled by the norm gain when ``norm_folded``
    gain: torch.Tensor | None  # (d,) the pre-attention norm's effective gain, when found
    norm_key: str | None
    norm_folded: bool
    tensor_names: list[str]


def check_layer_head(ck: Checkpoint, layer: int, head: int | None = None) -> None:
    """Raise HeadlensError, naming ``layer``/``head``, unless both are in range for ``ck``."""
    s = ck.shape
    if not 0 <= layer < s.num_layers:
        raise HeadlensError(f"`layer` {layer} out of range: {ck.name} has {s.num_layers} layers "
                            f"(valid 0..{s.num_layers - 1})")
    if head is not None and not 0 <= head < s.num_heads:
        raise HeadlensError(f"`head` {head} out of range: {ck.name} has {s.num_heads} query heads "
                            f"(valid 0..{s.num_heads - 1})")


def _finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise HeadlensError(f"tensor {name} has {bad} non-finite values (NaN/inf) in the requested head")
    return t


def norm_gain(ck: Checkpoint, layer: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor | None, str | None]:
    """The effective gain of the norm whose output feeds ``layer``'s attention, shape (d,), or (None, None) where
    no stored norm does (also when the config moves the spec's norm elsewhere: OPT-350m's post-norm layers)."""
    key = ck.layer_keys(layer).norm
    if key is None or not holds(ck.spec.norm_requires, ck.config):
        return None, None
    g = _finite(ck.tensors.read(key), key).to(dtype)
    if g.shape != (ck.shape.hidden_size,):
        raise HeadlensError(f"norm weight {key} has shape {tuple(g.shape)}, expected ({ck.shape.hidden_size},)")
    return g + ck.spec.norm_offset, key


def check_qk_norms(ck: Checkpoint, layer: int) -> None:
    """Raise a HeadlensError (one line) where ``layer`` holds query/key norm tensors the spec does not place: their
    gains act between W_Q and W_K, and a QK spectrum without them would describe another operator."""
    keys = ck.layer_keys(layer)
    known = {keys.q_norm, keys.k_norm} - {None}
    unknown = [n for n in ck.keymap.qk_norm_tensors(layer) if n not in known]
    if unknown or len(known) == 1:
        names = unknown or sorted(known)
        shown = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
        raise HeadlensError(f"layer {layer} of {ck.name} ({ck.spec.family}) has query/key norms that headlens cannot "
                            f"fold into W_Q/W_K ({shown}), and a QK spectrum without them would describe another "
                            "operator: leave the QK side out (`with_qk`)")


def qk_norm_gains(ck: Checkpoint, layer: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor,
                                                                                            bool] | None:
    """``(gamma_q (H, hd), gamma_k (G, hd), center)``: the query/key norms' effective gains per head (Gemma's
    ``1 + w``) and whether the norm subtracts each head's mean; None where the layer has no q/k norms. Refused
    (:func:`check_qk_norms`) where it has some the spec does not place."""
    check_qk_norms(ck, layer)
    keys, qk = ck.layer_keys(layer), ck.spec.qk_norm
    if keys.q_norm is None or keys.k_norm is None or qk is None:
        return None
    s = ck.shape
    gains = []
    for name, heads in ((keys.q_norm, s.num_heads), (keys.k_norm, s.num_kv_heads)):
        g = _finite(ck.tensors.read(name), name).to(dtype)
        if g.numel() == s.head_dim:  # one norm over each head's hd coordinates (Qwen3, Gemma 3)
            g = g.reshape(1, s.head_dim).expand(heads, s.head_dim)
        elif g.numel() == heads * s.head_dim:  # one gain per coordinate of every head (OLMo 2, OLMoE, Cohere)
            g = g.reshape(heads, s.head_dim)
        else:
            raise HeadlensError(f"q/k norm weight {name} has shape {tuple(g.shape)}, expected ({s.head_dim},) or "
                                f"({heads * s.head_dim},) for {heads} heads of head_dim {s.head_dim}")
        gains.append(g + qk.offset)
    return gains[0], gains[1], qk.center


def _fold_qk_norm(W: torch.Tensor, gain: torch.Tensor, center: bool) -> torch.Tensor:
    """``diag(gamma) C W`` per head: W (n, hd, d), gain (n, hd); C subtracts each head's mean when ``center``."""
    if center:
        W = W - W.mean(dim=1, keepdim=True)
    return W * gain.to(W.dtype)[:, :, None]


def check_stored_shapes(ck: Checkpoint, layer: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise HeadlensError unless the stored tensors (role -> shape) have the shapes ``ck.shape`` implies."""
    s = ck.shape
    want = ck.spec.layout.shapes(s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size)
    bad = [role for role, shape in shapes.items() if tuple(shape) != want[role]]
    if bad:
        shown = [r for r in ck.spec.layout.stored() if r in ("v", "o", "qkv") or r in bad]
        listed = ", ".join(f"W_{r.upper()} {tuple(shapes[r])}" for r in shown if r in shapes)
        raise HeadlensError(f"unexpected shapes in layer {layer}: {listed}")


def _read_block(ck: Checkpoint, layer: int, role: str, head: int) -> tuple[torch.Tensor, str]:
    """(block, tensor name): ``role``'s block of head ``head`` in ``layer`` as stored, Linear layout:
    (hd, d) for q/k/v (``head`` is then a kv head for k/v), (d, hd) for o. Reads only that block's bytes."""
    s, keys = ck.shape, ck.layer_keys(layer)
    block = ck.spec.layout.head_block(role, head, s.num_heads, s.num_kv_heads, s.head_dim)
    name = keys.name(block.tensor)
    check_stored_shapes(ck, layer, {block.tensor: ck.tensors.shape(name)})
    t = ck.tensors.read(name, block.index)
    return (t.T if block.transposed else t), name


def read_head(
    ck: Checkpoint,
    layer: int,
    head: int,
    fold_norm: bool = False,
    load_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> HeadFactors:
    """W_O^h (d x hd) and W_V^g (hd x d) of query head ``head`` in ``layer``, read block by block.

    Weights are first cast to ``load_dtype`` (what the model would run in), then to ``compute_dtype``.
    """
    check_layer_head(ck, layer, head)
    s = ck.shape
    hd, d, g = s.head_dim, s.hidden_size, s.kv_head(head)
    v, v_name = _read_block(ck, layer, "v", g)  # (hd, d)
    o, o_name = _read_block(ck, layer, "o", head)  # (d, hd)
    if tuple(v.shape) != (hd, d) or tuple(o.shape) != (d, hd):
        raise HeadlensError(f"unexpected head block shapes W_V {tuple(v.shape)}, W_O {tuple(o.shape)} "
                            f"for head_dim={hd}, hidden={d} in layer {layer}")
    v = _finite(v, v_name).to(load_dtype).to(compute_dtype)
    o = _finite(o, o_name).to(load_dtype).to(compute_dtype)
    gain, norm_key = norm_gain(ck, layer, compute_dtype)
    if fold_norm:
        if gain is None:
            raise HeadlensError(f"`fold_norm`: no norm weight feeding layer {layer}'s attention was found "
                                f"in {ck.name}")
        v = v * gain.to(load_dtype).to(compute_dtype)[None, :]  # W_V diag(gamma)
    return HeadFactors(layer=layer, head=head, kv_head=g, W_O=o.contiguous(), W_V=v.contiguous(), gain=gain,
                       norm_key=norm_key, norm_folded=fold_norm, tensor_names=[v_name, o_name])


def read_qk_blocks(ck: Checkpoint, layer: int, head: int, load_dtype: torch.dtype = torch.float32,
                   compute_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(W_Q^h (hd, d), W_K^g (hd, d), the tensor names): the query block of query head ``head`` and the key block of
    the kv head g it reads, Linear layout, read block by block; rounded to ``load_dtype``, then ``compute_dtype``."""
    check_layer_head(ck, layer, head)
    s = ck.shape
    hd, d, g = s.head_dim, s.hidden_size, s.kv_head(head)
    q, q_name = _read_block(ck, layer, "q", head)  # (hd, d)
    k, k_name = _read_block(ck, layer, "k", g)  # (hd, d)
    if tuple(q.shape) != (hd, d) or tuple(k.shape) != (hd, d):
        raise HeadlensError(f"unexpected head block shapes W_Q {tuple(q.shape)}, W_K {tuple(k.shape)} "
                            f"for head_dim={hd}, hidden={d} in layer {layer}")
    q = _finite(q, q_name).to(load_dtype).to(compute_dtype)
    k = _finite(k, k_name).to(load_dtype).to(compute_dtype)
    return q.contiguous(), k.contiguous(), list(dict.fromkeys([q_name, k_name]))


@dataclass
class LayerFactors:
    """Every head's blocks of one layer, batched (Linear layout, float64 unless asked otherwise)."""

    layer: int
    W_Q: torch.Tensor | None  # (H, hd, d)
    W_K: torch.Tensor | None  # (G, hd, d)
    W_V: torch.Tensor  # (G, hd, d); input side scaled by the norm gain when ``norm_folded``
    W_O: torch.Tensor  # (H, d, hd)
    norm_folded: bool
    qk_rank_bound: int | None = None  # hd - 1 where folded q/k LayerNorms centre each head (Cohere): the QK forms'
    #                                   last singular value is exactly 0, below what a Gram route resolves


def find_non_finite(ck: Checkpoint, layer: int, with_qk: bool = True) -> None:
    """Raise a HeadlensError naming the first of ``layer``'s attention tensors with a NaN or inf."""
    for name, t in read_layer_raw(ck, layer, with_qk).items():
        _finite(t, name)
    raise HeadlensError(f"layer {layer}: a Gram product of its attention weights overflowed (the weights are "
                        "finite but huge); rerun with `dtype` float64")


def read_layer_raw(ck: Checkpoint, layer: int, with_qk: bool = True) -> dict[str, torch.Tensor]:
    """The stored tensors :func:`read_layer` needs (name -> tensor), as stored (no conversion): cheap to run
    in a thread."""
    check_layer_head(ck, layer)
    keys = ck.layer_keys(layer)
    names = [keys.name(role) for role in ck.spec.layout.stored(with_qk)]
    return {n: ck.tensors.read(n) for n in names}


class Buffers:
    """Conversion targets reused from one layer to the next (:func:`read_layer`'s ``buffers``).

    A layer's float64 factors are tens of MB each: allocated afresh per layer, every one is a new ``mmap`` whose
    pages the kernel faults in and zeroes (on a 36-layer Qwen3-4B shape, ~6 GB of page faults, seconds of system
    time). Reusing them is safe only when the previous layer's factors are no longer used when the next layer is
    read, as in the sweep's layer loop (:func:`headlens.circuits.sweep_layer.iter_layers`): a buffer that anything
    still refers to (the caller kept the previous factors, or a view of them) is not reused but replaced.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, torch.Tensor] = {}

    def like(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor shaped and strided as ``t`` (a permuted view keeps its layout), in ``dtype``."""
        key = (tuple(t.shape), tuple(t.stride()), dtype)
        buf = self._free.get(key)
        if buf is None or sys.getrefcount(buf) > 3:  # held elsewhere (here: the dict, `buf`, the call's argument)
            buf = self._free[key] = torch.empty_like(t, dtype=dtype)
        return buf


def _convert(t: torch.Tensor, load_dtype: torch.dtype, compute_dtype: torch.dtype,
             buffers: Buffers | None = None) -> torch.Tensor:
    """Round to ``load_dtype`` (what the model runs in), then widen; one pass when the rounding is exact. With
    ``buffers`` the result is written into a reused tensor of the same layout."""
    exact = {torch.float32: (torch.bfloat16, torch.float16, torch.float32),
             torch.float64: (torch.bfloat16, torch.float16, torch.float32, torch.float64)}
    src = t if t.dtype in exact.get(load_dtype, ()) else t.to(load_dtype)
    if buffers is None:
        return src.to(compute_dtype)
    return buffers.like(t, compute_dtype).copy_(src)


def read_layer(ck: Checkpoint, layer: int, with_qk: bool = True, fold_norm: bool = False,
               load_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = torch.float64,
               raw: dict[str, torch.Tensor] | None = None, qk_dtype: torch.dtype | None = None,
               check_finite: bool = True, buffers: Buffers | None = None, fold_qk_norm: bool = False) -> LayerFactors:
    """All heads' W_Q (H, hd, d), W_K (G, hd, d), W_V (G, hd, d), W_O (H, d, hd) of ``layer``, split by the
    spec's layout.

    ``raw`` takes tensors already read by :func:`read_layer_raw`; ``qk_dtype`` (default ``compute_dtype``)
    is the precision of W_Q and W_K. ``check_finite=False`` leaves the NaN/inf check to the caller (the
    sweep checks its Gram matrices instead, which contain a non-finite value whenever a weight is one).
    ``buffers`` (:class:`Buffers`) receives the converted factors, overwriting the previous call's.
    ``fold_qk_norm`` folds the query/key norms' gains (and Cohere's centring) into W_Q and W_K
    (:func:`qk_norm_gains`: ``W_Q^h <- diag(gamma_q^h) W_Q^h``); their per-token scale is left out.
    """
    check_layer_head(ck, layer)
    s, layout, keys = ck.shape, ck.spec.layout, ck.layer_keys(layer)
    raw = raw if raw is not None else read_layer_raw(ck, layer, with_qk)
    qk_dtype = qk_dtype or compute_dtype
    stored = {}
    for role in layout.stored(with_qk):
        name = keys.name(role)
        stored[role] = raw[name] if not check_finite else _finite(raw[name], name)
    check_stored_shapes(ck, layer, {role: tuple(t.shape) for role, t in stored.items()})
    split = layout.split(stored, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size)
    b = buffers
    W_V = _convert(split.W_V, load_dtype, compute_dtype, b)  # (G, hd, d)
    W_O = _convert(split.W_O, load_dtype, compute_dtype, b)  # (H, d, hd)
    W_Q = _convert(split.W_Q, load_dtype, qk_dtype, b) if with_qk and split.W_Q is not None else None  # (H, hd, d)
    W_K = _convert(split.W_K, load_dtype, qk_dtype, b) if with_qk and split.W_K is not None else None  # (G, hd, d)
    bound = None
    if fold_qk_norm and W_Q is not None and W_K is not None:
        qk = qk_norm_gains(ck, layer, qk_dtype)
        if qk is not None:
            W_Q, W_K = _fold_qk_norm(W_Q, qk[0], qk[2]), _fold_qk_norm(W_K, qk[1], qk[2])
            bound = s.head_dim - 1 if qk[2] else None
    if fold_norm:
        gain, _ = norm_gain(ck, layer, compute_dtype)
        if gain is None:
            raise HeadlensError(f"`fold_norm`: no norm weight feeding layer {layer}'s attention in {ck.name}")
        W_V = W_V * gain
        W_Q = W_Q * gain.to(W_Q.dtype) if W_Q is not None else None
        W_K = W_K * gain.to(W_K.dtype) if W_K is not None else None
    return LayerFactors(layer=layer, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, norm_folded=fold_norm, qk_rank_bound=bound)
