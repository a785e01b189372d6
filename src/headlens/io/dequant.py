"""The stored forms of quantized weights, turned back into numbers (DOMAIN.md, "Quantized checkpoints").

Each function takes the tensors one quantized weight is stored as and returns the weight in float64, in
``nn.Linear`` layout ``(out, in)`` (or the stored layout of a 3-D expert tensor). The products are exact in
float64 wherever the format's numbers allow (an fp8 or 4-bit code times a float32 or float16 scale needs at most
28 bits); where a format defines an intermediate number in a lower precision (bitsandbytes' nested absmax is
float32 arithmetic), it is reproduced in that precision, since that number is what the checkpoint means.

Nothing here reads files or knows names: :mod:`headlens.io.quantized` finds the tensors and the scheme.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64

# FP4 E2M1 values by their 4-bit code (MXFP4, OCP Microscaling spec): sign bit 3, exponent bits 2..1, mantissa 0.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# AutoAWQ packs eight 4-bit columns into an int32 in this order: nibble t holds column AWQ_ORDER[t].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _blocks(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """``scale`` (one value per ``block`` of a ``shape`` matrix, the last blocks possibly partial) spread to every
    element of the matrix, float64."""
    rows, cols = shape
    s = scale.to(F64)
    return s.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def _spread(t: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None,
            g_idx: torch.Tensor | None) -> torch.Tensor:
    """A scale or zero point ``t`` spread over a ``shape`` weight, float64: per ``block``; one value (per tensor);
    one per output row (``(out,)`` or ``(out, 1)``); or ``(out, groups)`` over the inputs, in consecutive groups of
    ``ceil(in / groups)`` or by ``g_idx`` (the group of each input, act-order)."""
    out, inp = shape
    if block is not None:
        return _blocks(t, block, shape)
    s = t.to(F64)
    if s.numel() == 1:
        return s.reshape(1, 1)
    if s.numel() == out:
        return s.reshape(out, 1)
    groups = s.shape[-1]
    g = torch.arange(inp) // math.ceil(inp / groups) if g_idx is None else g_idx.to(torch.int64)
    return s.reshape(out, groups)[:, g]


def scaled(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
           block: tuple[int, int] | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``(values - zero) * scale`` in float64 for a ``(out, in)`` weight stored as fp8 or integer codes ``values``
    (fp8 with ``weight_scale_inv``, compressed-tensors int and fp8 with ``weight_scale`` and
    ``weight_zero_point``); the scale (and zero point) per ``block`` (a ``(ceil(out / b0), ceil(in / b1))`` grid:
    DeepSeek-V3, Qwen3-FP8), per tensor, per output channel, or per group of inputs (see :func:`_spread`)."""
    w = values.to(F64)
    shape = tuple(w.shape)
    s = _spread(scale, shape, block, g_idx)  # type: ignore[arg-type]
    if zero is None:
        return w * s
    return (w - _spread(zero, shape, block, g_idx)) * s  # type: ignore[arg-type]


def unpack_bits(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Unsigned ``bits``-bit integers packed along ``dim`` of an int32 tensor, as int64 with ``count`` entries along
    ``dim``. Element ``i`` starts at bit ``i * bits`` of the little-endian bit stream of the 32-bit words along
    ``dim`` (an element may straddle two words: GPTQ's 3-bit and compressed-tensors' dense packing), which for 2, 4
    and 8 bits is "32 / bits values per word, the first in the lowest bits"."""
    words = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # (..., n_words) as unsigned
    starts = torch.arange(count, dtype=torch.int64) * bits
    first, shift = starts // 32, starts % 32
    if count and (count * bits - 1) // 32 >= words.shape[-1]:
        raise ValueError(f"{words.shape[-1]} words hold fewer than {count} values of {bits} bits")
    second = torch.clamp(first + 1, max=words.shape[-1] - 1)
    both = words[..., first] | (words[..., second] << 32)  # 64 bits: the element never passes bit 63
    return ((both >> shift) & ((1 << bits) - 1)).movedim(-1, dim)


def gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
         bits: int, group_size: int, zero_offset: int) -> torch.Tensor:
    """GPTQ: ``qweight`` int32 ``(in * bits / 32, out)`` packed along the inputs, ``qzeros`` int32
    ``(groups, out * bits / 32)`` packed along the outputs, ``scales`` ``(groups, out)``, ``g_idx`` ``(in,)`` the
    group of each input row (act-order permutes it; ``None``: consecutive groups of ``group_size``, -1 for one
    group). ``zero_offset`` is 1 for the
    original format (``checkpoint_format`` gptq: zeros stored minus one), 0 for gptq_v2.
    ``W[o, i] = (q[i, o] - z[g[i], o]) * s[g[i], o]``; returns ``(out, in)`` float64."""
    out = scales.shape[1]
    inp = qweight.shape[0] * 32 // bits
    q = unpack_bits(qweight, bits, inp, dim=0)  # (in, out)
    z = unpack_bits(qzeros, bits, out, dim=1) + zero_offset  # (groups, out)
    size = inp if group_size == -1 else group_size
    g = torch.arange(inp) // size if g_idx is None else g_idx.to(torch.int64)
    w = (q - z[g]).to(F64) * scales.to(F64)[g]
    return w.T.contiguous()


def awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """AWQ (GEMM layout): ``qweight`` int32 ``(in, out / 8)`` with eight 4-bit columns per word in AutoAWQ's order
    (:data:`AWQ_ORDER`), ``qzeros`` int32 ``(groups, out / 8)`` in the same order, ``scales`` ``(groups, out)``;
    ``W[o, i] = (q[i, o] - z[i // group_size, o]) * s[i // group_size, o]``; returns ``(out, in)`` float64."""
    def columns(packed: torch.Tensor) -> torch.Tensor:
        nibbles = unpack_bits(packed, 4, packed.shape[1] * 8, dim=1)  # nibble order
        cols = torch.empty_like(nibbles)
        for t, c in enumerate(AWQ_ORDER):  # nibble t of each word is column c of its eight
            cols[:, c::8] = nibbles[:, t::8]
        return cols

    q, z = columns(qweight), columns(qzeros)  # (in, out), (groups, out)
    g = torch.arange(q.shape[0]) // group_size
    w = (q - z[g]).to(F64) * scales.to(F64)[g]
    return w.T.contiguous()


def bnb_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """bitsandbytes LLM.int8(): ``weight`` int8 ``(out, in)``, ``SCB`` float32 ``(out,)`` the absmax of each row:
    ``W = w * SCB / 127``, float64."""
    return weight.to(F64) * (scb.to(F64).reshape(-1, 1) / 127.0)


def bnb_absmax(absmax: torch.Tensor, nested_absmax: torch.Tensor | None = None,
               nested_quant_map: torch.Tensor | None = None, nested_blocksize: int = 256,
               nested_offset: float = 0.0) -> torch.Tensor:
    """The per-block absmax of a bitsandbytes 4-bit weight. Nested ("double quantization"): ``absmax`` is uint8
    codes into ``nested_quant_map``, scaled by ``nested_absmax`` per ``nested_blocksize`` codes, plus
    ``nested_offset``, all float32 as bitsandbytes computes it (``dequantize_blockwise`` then ``+= offset``)."""
    if nested_absmax is None:
        return absmax.to(torch.float32)
    codes = nested_quant_map.to(torch.float32)[absmax.reshape(-1).to(torch.int64)]  # type: ignore[union-attr]
    block_of = torch.arange(codes.numel()) // nested_blocksize
    return codes * nested_absmax.to(torch.float32)[block_of] + torch.tensor(nested_offset, dtype=torch.float32)


def bnb_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, shape: tuple[int, ...],
             blocksize: int) -> torch.Tensor:
    """bitsandbytes nf4/fp4: ``packed`` bytes (any storage dtype, viewed as uint8) holding two 4-bit codes each,
    the first in the high nibble; value ``quant_map[code] * absmax[block]`` for blocks of ``blocksize`` values of
    the flattened weight; returns the weight of ``shape``, float64."""
    raw = packed.contiguous().view(torch.uint8).reshape(-1).to(torch.int64)
    n = math.prod(shape)
    codes = torch.stack((raw >> 4, raw & 0xF), dim=1).reshape(-1)[:n]
    values = quant_map.to(F64)[codes] * absmax.to(F64)[torch.arange(n) // blocksize]
    return values.reshape(shape)


def mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 (OCP Microscaling, gpt-oss experts): ``blocks`` uint8 ``(..., G, 16)``, 32 FP4 E2M1 codes per block,
    the first in the low nibble; ``scales`` uint8 ``(..., G)``, E8M0 exponents (bias 127). Returns ``(..., G * 32)``
    float64: ``FP4[code] * 2 ** (scale - 127)``."""
    lut = torch.tensor(FP4_E2M1, dtype=F64)
    b = blocks.contiguous().view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)  # (..., G, 32)
    exp = scales.contiguous().view(torch.uint8).to(F64) - 127.0
    values = lut[codes] * torch.exp2(exp)[..., None]
    return values.reshape(*b.shape[:-2], b.shape[-2] * b.shape[-1] * 2)
