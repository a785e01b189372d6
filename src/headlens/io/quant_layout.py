"""Every quantized weight of a checkpoint with its scheme, checked against the stored shapes and dtypes, and the
weight it means (:mod:`headlens.io.dequant` does the arithmetic).

The scheme comes from ``quantization_config`` in config.json (or an AutoGPTQ ``quantize_config.json``), or from the
tensors themselves where they describe it (bitsandbytes' row scales and quant states, fp8 per-tensor scales, MXFP4
pairs). Whatever does not fit the scheme is one line naming the tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from headlens.errors import HeadlensError
from headlens.io import dequant
from headlens.io.quant_names import Stored, storage_of
from headlens.io.quant_schemes import (FLOAT8, Quantization, Scheme, check_method, is_numeric_float,
                                       quantization_config)
from headlens.io.tensors import TensorSource


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


