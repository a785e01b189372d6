"""Quantized checkpoints: which tensors store one weight, by which scheme, and the weights they mean.

A quantized checkpoint stores a weight as several tensors (fp8 codes and block scales, packed int4 words with
zero points and group scales, ...). :func:`storage_of` groups a checkpoint's stored tensor names into *logical*
tensors (the names an unquantized checkpoint would have), :class:`Layout` adds what the scheme says
(``quantization_config`` in config.json, or the tensors themselves where they describe it), and
:class:`DequantizingSource` shows the checkpoint as its logical tensors, dequantized in float64 on read
(:mod:`headlens.io.dequant`).

Never a number from an unknown format: an integer or fp8 tensor that no known scheme explains is refused when read,
naming it and its dtype; a ``quantization_config`` whose method headlens does not know is refused at open, naming it
and the methods it knows.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headlens.errors import HeadlensError
from headlens.io import dequant
from headlens.io.tensors import Index, TensorSource

# quant_method values headlens dequantizes; the README's "Quantized checkpoints" table says what each covers.
KNOWN_METHODS = ("fp8", "fbgemm_fp8", "gptq", "awq", "bitsandbytes", "compressed-tensors", "mxfp4")

FLOAT8 = tuple(d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                               "float8_e5m2fnuz", "float8_e8m0fnu")) if d is not None)

# companion suffixes of a weight ``X.weight`` stored quantized, by the tensor that marks the scheme
_BNB4 = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
         "quant_state.bitsandbytes__fp4")
# runtime scales that describe activations or the KV cache, not weights: hidden from the logical view
_RUNTIME = ("input_scale", "input_global_scale", "input_zero_point", "output_scale", "output_zero_point", "k_scale",
            "v_scale", "q_scale", "activation_scale", "weight_global_scale")


def is_numeric_float(dtype: torch.dtype) -> bool:
    """Whether a stored tensor of ``dtype`` holds its numbers as they are (float16/32/64, bfloat16)."""
    return dtype.is_floating_point and dtype not in FLOAT8


# ------------------------------------------------------------------------------------------------ names


@dataclass
class Stored:
    """One logical weight stored quantized: the stored tensors by role, and how to read them."""

    name: str  # logical name, e.g. model.layers.0.self_attn.v_proj.weight
    kind: str  # fp8-scale-inv | scaled | bnb-int8 | bnb-4bit | packed-qweight | ct-packed | mxfp4
    parts: dict[str, str]  # role -> stored tensor name (weight, scale, zero, g_idx, shape, ...)
    scheme: "Scheme | None" = None  # set by Layout
    shape: tuple[int, ...] = ()  # the logical shape, set by Layout
    params: dict[str, Any] = field(default_factory=dict)  # what dequantizing needs: block, bits, group size, ...


def storage_of(names: list[str]) -> tuple[dict[str, Stored], set[str]]:
    """({logical name: Stored} for the weights stored quantized, every stored name that is a part of one or a runtime
    scale). Purely by name: works on a shard index before any shard is read."""
    have = set(names)
    out: dict[str, Stored] = {}
    parts: set[str] = set()

    def add(logical: str, kind: str, roles: dict[str, str]) -> None:
        found = {role: n for role, n in roles.items() if n in have}
        out[logical] = Stored(logical, kind, found)
        parts.update(found.values())

    for n in names:
        base, dot, leaf = n.rpartition(".")
        pre = base + dot
        if leaf == "qweight":
            add(pre + "weight", "packed-qweight", {"qweight": n, "qzeros": pre + "qzeros", "scales": pre + "scales",
                                                    "g_idx": pre + "g_idx"})
        elif leaf == "weight_packed":
            add(pre + "weight", "ct-packed", {"packed": n, "scale": pre + "weight_scale",
                                              "zero": pre + "weight_zero_point", "shape": pre + "weight_shape",
                                              "g_idx": pre + "weight_g_idx"})
        elif leaf == "weight" and pre + "weight_scale_inv" in have:
            add(n, "fp8-scale-inv", {"weight": n, "scale": pre + "weight_scale_inv"})
        elif leaf == "weight" and pre + "weight_scale" in have:
            add(n, "scaled", {"weight": n, "scale": pre + "weight_scale", "zero": pre + "weight_zero_point",
                              "g_idx": pre + "weight_g_idx"})
        elif leaf == "weight" and pre + "SCB" in have:
            add(n, "bnb-int8", {"weight": n, "scb": pre + "SCB", "format": pre + "weight_format"})
        elif leaf == "weight" and n + ".absmax" in have:
            add(n, "bnb-4bit", {"weight": n, **{s: f"{n}.{s}" for s in _BNB4}})
        elif n.endswith("_blocks") and n[: -len("_blocks")] + "_scales" in have:
            add(n[: -len("_blocks")], "mxfp4", {"blocks": n, "scales": n[: -len("_blocks")] + "_scales"})
    for n in names:
        if n.rpartition(".")[2] in _RUNTIME:
            parts.add(n)
    return out, parts


def logical_names(names: list[str]) -> list[str]:
    """The names an unquantized checkpoint would have, in stored order: every stored name that is not a part of a
    quantized weight, plus each quantized weight's logical name at the place of its first part."""
    stored, parts = storage_of(names)
    first = {}
    for s in stored.values():
        first.setdefault(min(s.parts.values(), key=names.index), s.name)
    out: list[str] = []
    for n in names:
        if n in first:
            out.append(first[n])
        elif n not in parts:
            out.append(n)
    return list(dict.fromkeys(out))


def stored_names(wanted: set[str], names: list[str]) -> set[str]:
    """The stored tensors that hold the logical tensors ``wanted`` (a shard download of just those)."""
    stored, _ = storage_of(names)
    out = set()
    for n in wanted:
        out.update(stored[n].parts.values() if n in stored else (n,))
    return out


# ----------------------------------------------------------------------------------------------- schemes


@dataclass(frozen=True)
class Scheme:
    """How a group of weights is quantized, as the output names it: the method and what it says about the numbers
    (what one tensor needs beyond that is its :attr:`Stored.params`)."""

    method: str  # fp8, gptq, awq, bitsandbytes, compressed-tensors, mxfp4, fbgemm_fp8
    detail: str  # e.g. "block 128x128", "int4, group 128, act-order", "nf4, block 64, nested absmax"

    @property
    def label(self) -> str:
        """``fp8 block 128x128``: the weights line."""
        return f"{self.method} {self.detail}".strip()

    @property
    def paren(self) -> str:
        """``fp8 (block 128x128)``: the load line."""
        return f"{self.method} ({self.detail})" if self.detail else self.method


@dataclass
class Quantization:
    """What a checkpoint's quantization is, for the output (``weights: ...`` and the JSON's ``quantization``)."""

    method: str | None  # quantization_config.quant_method (None: recognised from the tensors alone)
    schemes: list[str]  # labels, most frequent first
    tensors: int  # weights stored quantized
    parens: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "; ".join(self.schemes)

    def load_line(self, dtype: torch.dtype) -> str:
        return f"dequantized from {'; '.join(self.parens)} to {str(dtype).replace('torch.', '')}"

    def to_json(self) -> dict:
        return {"method": self.method, "schemes": self.schemes, "quantized_tensors": self.tensors,
                "dequantized": True}


def weights_line(model: dict) -> str | None:
    """``weights: fp8 block 128x128, dequantized`` for a checkpoint description (``Checkpoint.describe()``) whose
    weights are stored quantized; None otherwise."""
    q = model.get("quantization") if isinstance(model, dict) else None
    if not q:
        return None
    schemes = "; ".join(q.get("schemes") or []) or f"{q.get('method')} (no weight stored quantized)"
    return f"weights: {schemes}, dequantized"


def quantization_config(config: dict | None, directory: Path | None = None) -> dict | None:
    """The checkpoint's quantization settings: config.json's ``quantization_config`` (or its ``text_config``'s), else
    an AutoGPTQ-era ``quantize_config.json`` beside it; None when neither exists."""
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if q is not None:
            if not isinstance(q, dict):
                raise HeadlensError(f"config.json's quantization_config is {type(q).__name__}, not an object")
            return q
    if directory is not None and (directory / "quantize_config.json").is_file():
        try:
            q = json.loads((directory / "quantize_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise HeadlensError(f"{directory / 'quantize_config.json'} is not valid JSON ({exc})") from None
        if isinstance(q, dict):
            return {"quant_method": "gptq", **q}
    return None


def check_method(qcfg: dict | None) -> str | None:
    """The quant_method of ``qcfg``, refused (one line) unless headlens knows it."""
    if qcfg is None:
        return None
    method = qcfg.get("quant_method")
    if method is None and (qcfg.get("load_in_8bit") or qcfg.get("load_in_4bit")):
        method = "bitsandbytes"
    method = str(method).lower() if method is not None else None
    if method == "bitsandbytes_8bit" or method == "bitsandbytes_4bit":
        method = "bitsandbytes"
    if method not in KNOWN_METHODS:
        raise HeadlensError(f"the checkpoint's quantization_config names quant_method {json.dumps(qcfg.get('quant_method'))}, "
                            f"which headlens cannot dequantize (it knows: {', '.join(KNOWN_METHODS)})")
    return method


# ------------------------------------------------------------------------------------------------ layout


def _int(qcfg: dict, key: str, default: Any = None) -> Any:
    value = qcfg.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise HeadlensError(f"quantization_config.{key} is {json.dumps(value)}, not an integer")
    return value


class Layout:
    """Every quantized weight of a checkpoint with its scheme and logical shape, checked against the stored shapes
    and dtypes (one line naming the tensor when they do not fit the scheme)."""

    def __init__(self, source: TensorSource, config: dict | None, directory: Path | None = None):
        names = source.keys()
        self.source = source
        self.qcfg = quantization_config(config, directory)
        self.method = check_method(self.qcfg)
        self.stored, self.parts = storage_of(names)
        for s in self.stored.values():
            self._resolve(s)

    # ------------------------------------------------------------------ per kind

    def _need(self, s: Stored, *roles: str) -> None:
        missing = [r for r in roles if r not in s.parts]
        if missing:
            raise HeadlensError(f"quantized weight {s.name} lacks its {missing[0]} tensor: the checkpoint is incomplete")

    def _dtype(self, s: Stored, role: str, allowed: tuple[torch.dtype, ...], what: str) -> torch.dtype:
        dt = self.source.dtype(s.parts[role])
        if dt not in allowed:
            raise HeadlensError(f"tensor {s.parts[role]} is {str(dt).replace('torch.', '')}, but {what} stores "
                                f"{' or '.join(str(a).replace('torch.', '') for a in allowed)} there")
        return dt

    def _shape(self, s: Stored, role: str) -> tuple[int, ...]:
        return tuple(self.source.shape(s.parts[role]))

    def _bad_shape(self, s: Stored, role: str, want: Any, what: str) -> HeadlensError:
        return HeadlensError(f"tensor {s.parts[role]} has shape {self._shape(s, role)}, but {what} needs {want}")

    def _resolve(self, s: Stored) -> None:
        getattr(self, "_" + s.kind.replace("-", "_"))(s)

    def _fp8_scale_inv(self, s: Stored) -> None:
        self._need(s, "weight", "scale")
        self._dtype(s, "weight", FLOAT8, "fp8 (weight_scale_inv)")
        if self.method not in (None, "fp8"):
            raise HeadlensError(f"tensor {s.parts['scale']} is an fp8 block scale, but quantization_config says "
                                f"{self.method}")
        out, inp = self._2d(s, "weight")
        grid = self._shape(s, "scale")
        block = self.qcfg.get("weight_block_size") if self.qcfg else None
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise HeadlensError(f"quantization_config.weight_block_size is {json.dumps(block)}: expected two "
                                    "positive integers")
            want = (math.ceil(out / block[0]), math.ceil(inp / block[1]))
            if grid != want:
                raise self._bad_shape(s, "scale", want, f"a {out}x{inp} weight in blocks of {block[0]}x{block[1]}")
            s.scheme, s.params = Scheme("fp8", f"block {block[0]}x{block[1]}"), {"block": tuple(block)}
        else:
            n = math.prod(grid)
            if n == 1:
                s.scheme = Scheme("fp8", "per-tensor")
            elif n == out and grid in ((out,), (out, 1)):
                s.scheme = Scheme("fp8", "per-channel")
            else:
                raise HeadlensError(f"tensor {s.parts['scale']} holds a {grid} grid of fp8 scales, but the checkpoint "
                                    "gives no quantization_config.weight_block_size to say which blocks they scale")
        s.shape = (out, inp)

    def _2d(self, s: Stored, role: str) -> tuple[int, int]:
        shape = self._shape(s, role)
        if len(shape) != 2:
            raise HeadlensError(f"quantized weight {s.parts[role]} has shape {shape}; headlens dequantizes 2-D weights "
                                "of this scheme")
        return shape[0], shape[1]

    def _ct_scheme(self, s: Stored) -> dict:
        """The compressed-tensors weights args (num_bits, type, symmetric, strategy, group_size, block_structure)
        of the config group whose targets match ``s``."""
        groups = (self.qcfg or {}).get("config_groups") or {}
        module = s.name.rpartition(".")[0]
        ranked: list[tuple[int, str, dict]] = []  # compressed-tensors' precedence: a name, then a regex, then a class
        for gname, group in groups.items():
            if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
                continue
            rank = None
            for target in group.get("targets") or []:
                if not isinstance(target, str):
                    continue
                if module == target or module.endswith("." + target):
                    rank = 0
                elif target.startswith("re:") and re.match(target[3:], module):
                    rank = 1 if rank is None else min(rank, 1)
                elif target == "Linear":
                    rank = 2 if rank is None else min(rank, 2)
            if rank is not None:
                ranked.append((rank, gname, group["weights"]))
        best = [r for r in ranked if r[0] == min((x[0] for x in ranked), default=None)]
        if len(best) != 1:
            what = "no" if not best else f"{len(best)}"
            raise HeadlensError(f"{what} compressed-tensors config group of quantization_config.config_groups targets "
                                f"{module}: cannot tell how {s.name} is quantized")
        return best[0][2]

    def _ct_strategy(self, s: Stored, args: dict | None, out: int, inp: int) -> tuple[str, tuple, str]:
        """(strategy, params, detail) of a compressed-tensors weight's scale, from its args (or the scale's shape
        when no config gives them), checked against the scale's shape."""
        grid = self._shape(s, "scale")
        n = math.prod(grid)
        strategy = (args or {}).get("strategy")
        if strategy is None:
            strategy = ("tensor" if n == 1 else "channel" if n == out and len(grid) <= 2 and grid[0] == out
                        else "group" if len(grid) == 2 and grid[0] == out and inp % grid[1] == 0 else None)
            if strategy is None:
                raise HeadlensError(f"tensor {s.parts['scale']} has shape {grid}: without a quantization_config "
                                    "headlens cannot tell what it scales")
        if strategy == "tensor":
            if n != 1:
                raise self._bad_shape(s, "scale", "one value", "a per-tensor scale")
            return strategy, (), "per-tensor"
        if strategy == "channel":
            if n != out:
                raise self._bad_shape(s, "scale", (out, 1), "a per-channel scale")
            return strategy, (), "per-channel"
        if strategy == "group":
            size = (args or {}).get("group_size") or (inp // grid[1] if len(grid) == 2 and grid[1] else None)
            if not isinstance(size, int) or size <= 0:
                raise HeadlensError(f"quantization_config gives no group_size for the group scales of {s.name}")
            want = (out, math.ceil(inp / size))
            if grid != want:
                raise self._bad_shape(s, "scale", want, f"groups of {size} inputs")
            act = "g_idx" in s.parts
            return strategy, (("group_size", size),), f"group {size}" + (", act-order" if act else "")
        if strategy == "block":
            block = (args or {}).get("block_structure")
            if not (isinstance(block, list) and len(block) == 2):
                raise HeadlensError(f"quantization_config gives no block_structure for the block scales of {s.name}")
            want = (math.ceil(out / block[0]), math.ceil(inp / block[1]))
            if grid != want:
                raise self._bad_shape(s, "scale", want, f"blocks of {block[0]}x{block[1]}")
            return strategy, (("block", tuple(block)),), f"block {block[0]}x{block[1]}"
        raise HeadlensError(f"compressed-tensors strategy {strategy!r} of {s.name} is not one headlens dequantizes "
                            "(it reads tensor, channel, group and block)")

    def _scaled(self, s: Stored) -> None:
        """``weight`` fp8 or int8 with ``weight_scale`` (compressed-tensors float-/int-/naive-quantized, fbgemm fp8)."""
        self._need(s, "weight", "scale")
        dt = self.source.dtype(s.parts["weight"])
        if dt not in FLOAT8 and dt not in (torch.int8, torch.uint8):
            if is_numeric_float(dt):  # a float weight beside a weight_scale: already dequantized, as stored
                s.kind, s.scheme = "plain", None
                return
            raise HeadlensError(f"tensor {s.parts['weight']} is {str(dt).replace('torch.', '')} beside a weight_scale, "
                                "which no scheme headlens knows stores")
        out, inp = self._2d(s, "weight")
        method = self.method or ("compressed-tensors" if dt in (torch.int8, torch.uint8) else "fp8")
        if method not in ("compressed-tensors", "fbgemm_fp8", "fp8"):
            raise HeadlensError(f"tensor {s.parts['scale']} is a weight scale, but quantization_config says {method}")
        args = self._ct_scheme(s) if method == "compressed-tensors" and self.qcfg else None
        strategy, params, detail = self._ct_strategy(s, args, out, inp)
        kind = "fp8" if dt in FLOAT8 else "int8"
        if args is not None and kind == "int8" and args.get("num_bits", 8) != 8:
            raise HeadlensError(f"{s.name} is stored int8 but its config group says {args.get('num_bits')} bits")
        zero = "zero" in s.parts and not (args or {}).get("symmetric", "zero" not in s.parts)
        s.scheme = Scheme(method, f"{kind}, {detail}" + (", zero point" if zero else ""))
        s.params = {"strategy": strategy, "zero": zero, **dict(params)}
        s.shape = (out, inp)

    def _ct_packed(self, s: Stored) -> None:
        self._need(s, "packed", "scale", "shape")
        self._dtype(s, "packed", (torch.int32,), "compressed-tensors pack-quantized")
        if self.method != "compressed-tensors":
            raise HeadlensError(f"tensor {s.parts['packed']} is compressed-tensors pack-quantized, but the checkpoint's "
                                f"quantization_config says {self.method or 'nothing'}: cannot tell its bits")
        args = self._ct_scheme(s)
        bits = args.get("num_bits")
        if bits not in (2, 4, 8) or args.get("type", "int") != "int":
            raise HeadlensError(f"{s.name} is packed {args.get('type', 'int')}{bits}: headlens reads compressed-tensors "
                                "int2, int4 and int8 packing (the layout of other widths changed between versions)")
        shape = tuple(int(x) for x in self.source.read(s.parts["shape"]).reshape(-1).tolist())
        if len(shape) != 2:
            raise HeadlensError(f"tensor {s.parts['shape']} gives shape {shape}; headlens dequantizes 2-D weights")
        out, inp = shape
        want = (out, math.ceil(inp * bits / 32))
        if self._shape(s, "packed") != want:
            raise self._bad_shape(s, "packed", want, f"a {out}x{inp} weight of {bits}-bit values")
        strategy, params, detail = self._ct_strategy(s, args, out, inp)
        zero = not args.get("symmetric", True)
        if zero:
            self._need(s, "zero")
        s.scheme = Scheme("compressed-tensors", f"int{bits}, {detail}" + (", zero point" if zero else ""))
        s.params = {"bits": bits, "strategy": strategy, "zero": zero, **dict(params)}
        s.shape = (out, inp)

    def _bnb_int8(self, s: Stored) -> None:
        self._dtype(s, "weight", (torch.int8,), "bitsandbytes int8 (SCB)")
        if self.method not in (None, "bitsandbytes"):
            raise HeadlensError(f"tensor {s.parts['scb']} is a bitsandbytes row scale, but quantization_config says "
                                f"{self.method}")
        out, inp = self._2d(s, "weight")
        if self._shape(s, "scb") not in ((out,), (out, 1)):
            raise self._bad_shape(s, "scb", (out,), "one scale per row")
        s.scheme = Scheme("bitsandbytes", "int8, row scales")
        s.shape = (out, inp)

    def _bnb_4bit(self, s: Stored) -> None:
        state_key = next((r for r in s.parts if r.startswith("quant_state.")), None)
        if state_key is None:
            raise HeadlensError(f"bitsandbytes 4-bit weight {s.name} lacks its quant_state tensor")
        self._need(s, "absmax", "quant_map")
        try:
            state = json.loads(bytes(self.source.read(s.parts[state_key]).to(torch.uint8).tolist()).decode("utf-8"))
            qtype, blocksize = state["quant_type"], int(state["blocksize"])
            shape = tuple(int(x) for x in state["shape"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise HeadlensError(f"tensor {s.parts[state_key]} is not a bitsandbytes quant state ({exc})") from None
        n = math.prod(shape)
        if qtype not in ("nf4", "fp4") or state_key != f"quant_state.bitsandbytes__{qtype}":
            raise HeadlensError(f"bitsandbytes quant state of {s.name} names quant_type {qtype!r}")
        stored = self.source.shape(s.parts["weight"])
        nbytes = math.prod(stored) * torch.empty(0, dtype=self.source.dtype(s.parts["weight"])).element_size()
        if nbytes * 2 < n or nbytes * 2 > n + 1:
            raise self._bad_shape(s, "weight", f"{math.ceil(n / 2)} bytes", f"a {shape} weight in 4 bits")
        nested = "nested_absmax" in s.parts
        blocks = math.ceil(n / blocksize)
        if math.prod(self._shape(s, "absmax")) != blocks or math.prod(self._shape(s, "quant_map")) != 16:
            raise HeadlensError(f"bitsandbytes {qtype} weight {s.name}: {self._shape(s, 'absmax')} absmax for "
                                f"{blocks} blocks of {blocksize}, quant_map {self._shape(s, 'quant_map')} (16 values)")
        params: list[tuple[str, Any]] = [("blocksize", blocksize), ("shape", shape)]
        if nested:
            self._need(s, "nested_quant_map")
            try:
                params += [("nested_blocksize", int(state["nested_blocksize"])),
                           ("nested_offset", float(state["nested_offset"]))]
            except (KeyError, TypeError, ValueError) as exc:
                raise HeadlensError(f"bitsandbytes quant state of {s.name} lacks nested fields ({exc})") from None
        s.scheme = Scheme("bitsandbytes", f"{qtype}, block {blocksize}" + (", nested absmax" if nested else ""))
        s.params = dict(params)
        s.shape = shape

    def _packed_qweight(self, s: Stored) -> None:
        self._need(s, "qweight", "qzeros", "scales")
        for role in ("qweight", "qzeros"):
            self._dtype(s, role, (torch.int32,), "GPTQ/AWQ")
        if self.method not in ("gptq", "awq"):
            raise HeadlensError(f"tensor {s.parts['qweight']} is a GPTQ/AWQ packed weight, but the checkpoint's "
                                f"quantization_config says {self.method or 'nothing'}: cannot tell its bits and groups")
        q = self.qcfg or {}
        bits = _int(q, "bits", _int(q, "w_bit"))
        size = _int(q, "group_size", _int(q, "q_group_size"))
        if size is None or size == 0 or size < -1:
            raise HeadlensError(f"quantization_config.group_size is {json.dumps(size)}: expected a positive size or -1")
        groups, out = self._2d(s, "scales")
        if self.method == "gptq":
            fmt = str(q.get("checkpoint_format") or "gptq").lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise HeadlensError(f"GPTQ checkpoint_format {fmt!r} is a kernel layout headlens does not read (it "
                                    "reads gptq and gptq_v2)")
            if bits not in (2, 3, 4, 8):
                raise HeadlensError(f"quantization_config.bits is {json.dumps(bits)}: GPTQ stores 2, 3, 4 or 8 bits")
            rows, cols = self._2d(s, "qweight")
            inp = rows * 32 // bits
            if cols != out or rows * 32 % bits:
                raise self._bad_shape(s, "qweight", f"(in * {bits} / 32, {out})", "GPTQ")
            want_groups = 1 if size == -1 else math.ceil(inp / size)
            if groups != want_groups:
                raise self._bad_shape(s, "scales", (want_groups, out), f"{inp} inputs in groups of {size}")
            if self._shape(s, "qzeros") != (groups, math.ceil(out * bits / 32)):
                raise self._bad_shape(s, "qzeros", (groups, math.ceil(out * bits / 32)), "GPTQ zero points")
            act = bool(q.get("desc_act"))
            if "g_idx" in s.parts:
                if self._shape(s, "g_idx") != (inp,):
                    raise self._bad_shape(s, "g_idx", (inp,), "one group index per input")
            detail = f"int{bits}, group {size}" + (", act-order" if act else "") + (", v2" if fmt == "gptq_v2" else "")
            s.scheme = Scheme("gptq", detail)
            s.params = {"bits": bits, "group_size": size, "zero_offset": 1 if fmt == "gptq" else 0}
            s.shape = (out, inp)
        else:
            version = str(q.get("version") or "gemm").lower()
            if version != "gemm":
                raise HeadlensError(f"AWQ version {version!r} is a kernel layout headlens does not read (it reads gemm)")
            if bits != 4:
                raise HeadlensError(f"quantization_config.bits is {json.dumps(bits)}: headlens reads 4-bit AWQ")
            inp, cols = self._2d(s, "qweight")
            if cols * 8 != out:
                raise self._bad_shape(s, "qweight", (inp, out // 8), "AWQ")
            if size == -1 or groups != math.ceil(inp / size):
                raise self._bad_shape(s, "scales", (math.ceil(inp / max(size, 1)), out), f"groups of {size}")
            s.scheme, s.params = Scheme("awq", f"int4, group {size}"), {"group_size": size}
            s.shape = (out, inp)

    def _mxfp4(self, s: Stored) -> None:
        self._dtype(s, "blocks", (torch.uint8,), "MXFP4 (*_blocks)")
        blocks, scales = self._shape(s, "blocks"), self._shape(s, "scales")
        if len(blocks) < 3 or blocks[-1] != 16 or blocks[:-1] != scales:
            raise self._bad_shape(s, "blocks", scales + (16,), "MXFP4 blocks of 32 values for its scales")
        if self.method not in (None, "mxfp4"):
            raise HeadlensError(f"tensor {s.parts['blocks']} is MXFP4, but quantization_config says {self.method}")
        logical = blocks[:-2] + (blocks[-2] * 32,)
        if len(logical) == 3:  # gpt-oss experts: (E, out, in) stored, (E, in, out) the parameter
            logical = (logical[0], logical[2], logical[1])
        s.scheme = Scheme("mxfp4", "experts" if len(blocks) == 4 else "")
        s.shape = logical

    # ----------------------------------------------------------------- read

    def dequantize(self, s: Stored) -> torch.Tensor:
        """The weight ``s`` means, float64, in its logical shape."""
        read = self.source.read
        p, sc = s.parts, s.scheme
        assert sc is not None
        if s.kind == "fp8-scale-inv":
            return dequant.scaled(read(p["weight"]), read(p["scale"]), block=s.params.get("block"))
        if s.kind == "scaled":
            zero = read(p["zero"]) if s.params.get("zero") else None
            w = read(p["weight"])
            return dequant.scaled(w, read(p["scale"]), zero, block=s.params.get("block"),
                                  g_idx=read(p["g_idx"]) if "g_idx" in p else None)
        if s.kind == "ct-packed":
            bits, (out, inp) = s.params.get("bits"), s.shape
            q = dequant.unpack_bits(read(p["packed"]), bits, inp, dim=1) - (1 << (bits - 1))
            zero = None
            if s.params.get("zero"):
                z = read(p["zero"])
                groups = math.prod(self._shape(s, "scale")) // out if s.params.get("strategy") != "block" else None
                if z.dtype == torch.int32 and groups is not None:  # packed along the outputs
                    zero = dequant.unpack_bits(z, bits, out, dim=0)[:, :groups] - (1 << (bits - 1))
                else:
                    zero = z
            return dequant.scaled(q, read(p["scale"]), zero, block=s.params.get("block"),
                                  g_idx=read(p["g_idx"]) if "g_idx" in p else None)
        if s.kind == "bnb-int8":
            return dequant.bnb_int8(read(p["weight"]), read(p["scb"]))
        if s.kind == "bnb-4bit":
            absmax = dequant.bnb_absmax(read(p["absmax"]), read(p["nested_absmax"]) if "nested_absmax" in p else None,
                                        read(p["nested_quant_map"]) if "nested_quant_map" in p else None,
                                        s.params.get("nested_blocksize", 256), s.params.get("nested_offset", 0.0))
            return dequant.bnb_4bit(read(p["weight"]), absmax, read(p["quant_map"]), s.shape, s.params.get("blocksize"))
        if s.kind == "packed-qweight":
            if sc.method == "gptq":
                g_idx = read(p["g_idx"]) if "g_idx" in p else None
                if g_idx is not None and (int(g_idx.min()) < 0 or int(g_idx.max()) >= self._shape(s, "scales")[0]):
                    raise HeadlensError(f"tensor {p['g_idx']} names groups outside 0..{self._shape(s, 'scales')[0] - 1}")
                return dequant.gptq(read(p["qweight"]), read(p["qzeros"]), read(p["scales"]), g_idx,
                                    s.params.get("bits"), s.params.get("group_size"), s.params.get("zero_offset"))
            return dequant.awq(read(p["qweight"]), read(p["qzeros"]), read(p["scales"]), s.params.get("group_size"))
        if s.kind == "mxfp4":
            w = dequant.mxfp4(read(p["blocks"]), read(p["scales"]))
            return w.transpose(1, 2).contiguous() if w.dim() == 3 else w
        raise AssertionError(s.kind)

    def quantization(self) -> Quantization | None:
        """The summary for the output, or None when no weight is stored quantized (a ``quantization_config`` with
        no quantized tensor is still said, with 0 tensors)."""
        real = [s for s in self.stored.values() if s.scheme is not None]
        if not real and self.method is None:
            return None
        counts = Counter(s.scheme for s in real)
        order = [sc for sc, _ in counts.most_common()]
        return Quantization(self.method, [sc.label for sc in order], len(real), [sc.paren for sc in order])


# ------------------------------------------------------------------------------------------------ source


class DequantizingSource(TensorSource):
    """A checkpoint seen as its logical tensors: quantized weights dequantized in float64 on read, every other tensor
    as stored. Reading an integer or fp8 tensor that no scheme explains is refused (one line naming it). The stored
    tensors stay reachable as :attr:`stored` (content hashes, file stats)."""

    def __init__(self, stored: TensorSource, config: dict | None, directory: Path | None = None):
        self._stored = stored
        self.description = stored.description
        self.layout = Layout(stored, config, directory)
        self._quantized = {n: s for n, s in self.layout.stored.items() if s.scheme is not None}
        self._keys = logical_names(stored.keys())
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.quantization = self.layout.quantization()

    @property
    def stored(self) -> TensorSource:
        return self._stored

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        s = self._quantized.get(name)
        return s.shape if s is not None else self.stored.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float64 if name in self._quantized else self.stored.dtype(name)

    def is_quantized(self, name: str) -> bool:
        return name in self._quantized

    def read(self, name: str, index: Index = None) -> torch.Tensor:
        s = self._quantized.get(name)
        if s is None:
            dt = self.stored.dtype(name)
            if not is_numeric_float(dt) and dt != torch.bool:
                raise HeadlensError(f"tensor {name} is {str(dt).replace('torch.', '')} and matches no quantization scheme "
                                    f"headlens knows ({', '.join(KNOWN_METHODS)}): refusing to analyse its raw values "
                                    "as weights")
            return self.stored.read(name, index)
        t = self._cache.get(name)
        if t is None:
            t = self.layout.dequantize(s)
            if tuple(t.shape) != s.shape:
                raise HeadlensError(f"dequantizing {name} gave shape {tuple(t.shape)}, expected {s.shape}")
            self._cache[name] = t
            while len(self._cache) > 2:  # a layer reads the fused qkv block by block: keep the last two
                self._cache.popitem(last=False)
        if index is None:
            return t
        return t[index]
