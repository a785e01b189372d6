"""Read one head's value and output blocks (the two factors of its OV circuit) from a checkpoint.

Only the rows/columns of the requested head are read (safetensors slices), never the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    s = ck.shape
    if not 0 <= layer < s.num_layers:
        raise HeadlensError(f"--layer {layer} out of range: {ck.name} has {s.num_layers} layers "
                            f"(valid 0..{s.num_layers - 1})")
    if head is not None and not 0 <= head < s.num_heads:
        raise HeadlensError(f"--head {head} out of range: {ck.name} has {s.num_heads} query heads "
                            f"(valid 0..{s.num_heads - 1})")


def _finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise HeadlensError(f"tensor {name} has {bad} non-finite values (NaN/inf) in the requested head")
    return t


def norm_gain(ck: Checkpoint, layer: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor | None, str | None]:
    """The effective gain of the norm whose output feeds ``layer``'s attention, shape (d,), or (None, None)."""
    key = ck.layer_keys(layer).norm
    if key is None:
        return None, None
    g = _finite(ck.tensors.read(key), key).to(dtype)
    if g.shape != (ck.shape.hidden_size,):
        raise HeadlensError(f"norm weight {key} has shape {tuple(g.shape)}, expected ({ck.shape.hidden_size},)")
    return g + ck.spec.norm_offset, key


def read_head(
    ck: Checkpoint,
    layer: int,
    head: int,
    fold_norm: bool = False,
    load_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> HeadFactors:
    """W_O^h (d x hd) and W_V^g (hd x d) of query head ``head`` in ``layer``.

    Weights are first cast to ``load_dtype`` (what the model would run in), then to ``compute_dtype``.
    """
    check_layer_head(ck, layer, head)
    s, spec, keys = ck.shape, ck.spec, ck.layer_keys(layer)
    hd, d, H, G = s.head_dim, s.hidden_size, s.num_heads, s.num_kv_heads
    g = s.kv_head(head)
    cols_h = slice(head * hd, (head + 1) * hd)
    if spec.layout == "separate":
        assert keys.v
        v = ck.tensors.read(keys.v, (slice(g * hd, (g + 1) * hd), slice(None)))  # (hd, d)
        o = ck.tensors.read(keys.o, (slice(None), cols_h))  # (d, hd)
        names = [keys.v, keys.o]
    elif spec.layout == "fused_concat":  # rows: q (H*hd) | k (G*hd) | v (G*hd)
        assert keys.qkv
        start = (H + G) * hd + g * hd
        v = ck.tensors.read(keys.qkv, (slice(start, start + hd), slice(None)))
        o = ck.tensors.read(keys.o, (slice(None), cols_h))
        names = [keys.qkv, keys.o]
    elif spec.layout == "conv1d":  # Conv1D stores [in, out]: transpose to Linear layout
        assert keys.qkv
        start = 2 * H * hd + g * hd
        v = ck.tensors.read(keys.qkv, (slice(None), slice(start, start + hd))).T  # (hd, d)
        o = ck.tensors.read(keys.o, (cols_h, slice(None))).T  # (d, hd)
        names = [keys.qkv, keys.o]
    elif spec.layout == "interleaved":  # rows per head: [q_h; k_h; v_h], each hd rows
        assert keys.qkv
        start = g * 3 * hd + 2 * hd
        v = ck.tensors.read(keys.qkv, (slice(start, start + hd), slice(None)))
        o = ck.tensors.read(keys.o, (slice(None), cols_h))
        names = [keys.qkv, keys.o]
    else:  # pragma: no cover - the table only holds the layouts above
        raise AssertionError(spec.layout)
    if tuple(v.shape) != (hd, d) or tuple(o.shape) != (d, hd):
        raise HeadlensError(f"unexpected head block shapes W_V {tuple(v.shape)}, W_O {tuple(o.shape)} "
                            f"for head_dim={hd}, hidden={d} in layer {layer}")
    v = _finite(v, names[0]).to(load_dtype).to(compute_dtype)
    o = _finite(o, names[1]).to(load_dtype).to(compute_dtype)
    gain, norm_key = norm_gain(ck, layer, compute_dtype)
    if fold_norm:
        if gain is None:
            raise HeadlensError(f"--fold-norm: no norm weight feeding layer {layer}'s attention was found "
                                f"in {ck.name}")
        v = v * gain.to(load_dtype).to(compute_dtype)[None, :]  # W_V diag(gamma)
    return HeadFactors(layer=layer, head=head, kv_head=g, W_O=o.contiguous(), W_V=v.contiguous(), gain=gain,
                       norm_key=norm_key, norm_folded=fold_norm, tensor_names=names)


@dataclass
class LayerFactors:
    """Every head's blocks of one layer, batched (Linear layout, float64 unless asked otherwise)."""

    layer: int
    W_Q: torch.Tensor | None  # (H, hd, d)
    W_K: torch.Tensor | None  # (G, hd, d)
    W_V: torch.Tensor  # (G, hd, d); input side scaled by the norm gain when ``norm_folded``
    W_O: torch.Tensor  # (H, d, hd)
    norm_folded: bool


def find_non_finite(ck: Checkpoint, layer: int, with_qk: bool = True) -> None:
    """Raise a HeadlensError naming the first of ``layer``'s attention tensors with a NaN or inf."""
    for name, t in read_layer_raw(ck, layer, with_qk).items():
        _finite(t, name)
    raise HeadlensError(f"layer {layer}: a Gram product of its attention weights overflowed (the weights are "
                        "finite but huge); rerun with --dtype float64")


def read_layer_raw(ck: Checkpoint, layer: int, with_qk: bool = True) -> dict[str, torch.Tensor]:
    """The stored tensors :func:`read_layer` needs, as stored (no conversion): cheap to run in a thread."""
    check_layer_head(ck, layer)
    keys = ck.layer_keys(layer)
    names = [keys.v, keys.o] + ([keys.q, keys.k] if with_qk else []) if ck.spec.layout == "separate" \
        else [keys.qkv, keys.o]
    return {n: ck.tensors.read(n) for n in names if n}


def _convert(t: torch.Tensor, load_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.Tensor:
    """Round to ``load_dtype`` (what the model runs in), then widen; one pass when the rounding is exact."""
    exact = {torch.float32: (torch.bfloat16, torch.float16, torch.float32),
             torch.float64: (torch.bfloat16, torch.float16, torch.float32, torch.float64)}
    if t.dtype in exact.get(load_dtype, ()):
        return t.to(compute_dtype)
    return t.to(load_dtype).to(compute_dtype)


def read_layer(ck: Checkpoint, layer: int, with_qk: bool = True, fold_norm: bool = False,
               load_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = torch.float64,
               raw: dict[str, torch.Tensor] | None = None, qk_dtype: torch.dtype | None = None,
               check_finite: bool = True) -> LayerFactors:
    """All heads' W_Q, W_K, W_V, W_O of ``layer``, split per head for every layout in the spec table.

    ``raw`` takes tensors already read by :func:`read_layer_raw`; ``qk_dtype`` (default ``compute_dtype``)
    is the precision of W_Q and W_K. ``check_finite=False`` leaves the NaN/inf check to the caller (the
    sweep checks its Gram matrices instead, which contain a non-finite value whenever a weight is one).
    """
    check_layer_head(ck, layer)
    s, spec, keys = ck.shape, ck.spec, ck.layer_keys(layer)
    hd, d, H, G = s.head_dim, s.hidden_size, s.num_heads, s.num_kv_heads
    raw = raw if raw is not None else read_layer_raw(ck, layer, with_qk)
    qk_dtype = qk_dtype or compute_dtype

    def get(name: str | None, what: str) -> torch.Tensor:
        assert name is not None
        return raw[name] if not check_finite else _finite(raw[name], name)

    q = k = None
    if spec.layout == "separate":
        v = get(keys.v, "v")  # (G*hd, d)
        o = get(keys.o, "o")  # (d, H*hd)
        if with_qk:
            q, k = get(keys.q, "q"), get(keys.k, "k")
    else:
        qkv = get(keys.qkv, "qkv")
        if spec.layout == "fused_concat":  # rows q | k | v
            q, k, v = qkv[: H * hd], qkv[H * hd: (H + G) * hd], qkv[(H + G) * hd:]
        elif spec.layout == "conv1d":  # (d, 3*H*hd) -> Linear layout (3*H*hd, d)
            qkv = qkv.T
            q, k, v = qkv[: H * hd], qkv[H * hd: 2 * H * hd], qkv[2 * H * hd:]
        else:  # interleaved: (H * [q_h; k_h; v_h], d)
            per = qkv.reshape(H, 3, hd, d)
            q, k, v = (per[:, i].reshape(H * hd, d) for i in range(3))
        o = get(keys.o, "o")
        if spec.layout == "conv1d":
            o = o.T  # c_proj is (H*hd, d)
        if not with_qk:
            q = k = None
    if tuple(v.shape) != (G * hd, d) or tuple(o.shape) != (d, H * hd):
        raise HeadlensError(f"unexpected shapes in layer {layer}: W_V {tuple(v.shape)}, W_O {tuple(o.shape)}")
    W_V = _convert(v, load_dtype, compute_dtype).reshape(G, hd, d)
    W_O = _convert(o, load_dtype, compute_dtype).reshape(d, H, hd).permute(1, 0, 2)  # (H, d, hd)
    W_Q = _convert(q, load_dtype, qk_dtype).reshape(H, hd, d) if q is not None else None
    W_K = _convert(k, load_dtype, qk_dtype).reshape(G, hd, d) if k is not None else None
    if fold_norm:
        gain, _ = norm_gain(ck, layer, compute_dtype)
        if gain is None:
            raise HeadlensError(f"--fold-norm: no norm weight feeding layer {layer}'s attention in {ck.name}")
        W_V = W_V * gain
        W_Q = W_Q * gain.to(W_Q.dtype) if W_Q is not None else None
        W_K = W_K * gain.to(W_K.dtype) if W_K is not None else None
    return LayerFactors(layer=layer, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, norm_folded=fold_norm)
