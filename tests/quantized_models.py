"""Tiny quantized checkpoints of every scheme headlens reads, built in code from a tiny float checkpoint.

Each builder writes a HuggingFace directory (config.json with the format's ``quantization_config``, the quantized
``model.safetensors``, the tokenizer) and returns ``{logical weight name: its value as the format defines it,
float64}``, computed here independently of headlens's reader:

- bitsandbytes (int8, nf4, fp4) and compressed-tensors (int4/int8 packed, fp8 per channel and per block) are made
  by the real quantizers (transformers' bitsandbytes integration on the CPU, compressed-tensors' own
  ``calculate_qparams`` and ``ModelCompressor``) and their reference values are the libraries' own dequantization;
- fp8 block/per-tensor (DeepSeek-V3 / Qwen3-FP8 layout), GPTQ (AutoGPTQ's packing, v1 and v2 zeros, act-order),
  AWQ (AutoAWQ's GEMM packing) and MXFP4 (gpt-oss experts) have no quantizer that runs on a CPU here: they are
  quantized by each format's published recipe, packed bit by bit with plain Python integers, and their reference is
  the published formula evaluated element by element, sharing no code with the reader.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

F64 = torch.float64
FP8_MAX = 448.0  # float8_e4m3fn
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def linear_names(sd: dict[str, torch.Tensor]) -> list[str]:
    """The 2-D projection weights of the decoder layers (what the formats quantize; not embeddings, norms, lm_head)."""
    return [k for k, v in sd.items() if ".layers." in k and k.endswith("_proj.weight") and v.dim() == 2]


def _copy_dir(src: Path, out: Path) -> dict[str, torch.Tensor]:
    """Copy ``src`` (config, tokenizer) to ``out`` without its weights; returns its weights."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return load_file(str(src / "model.safetensors"))


def _write(out: Path, tensors: dict[str, torch.Tensor], qcfg: dict | None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    if qcfg is None:
        cfg.pop("quantization_config", None)
    else:
        cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------------------------------------------- fp8


def fp8_block(src: Path, out: Path, block: tuple[int, int] | None = (128, 128)) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 / Qwen3-FP8: ``weight`` float8_e4m3fn and ``weight_scale_inv`` float32 per ``block`` (the last
    blocks partial); ``block=None``: one scale per tensor (a 0-d ``weight_scale_inv``). Scale = block absmax / 448."""
    sd = _copy_dir(src, out)
    ref = {}
    for name in linear_names(sd):
        w = sd[name].to(torch.float32)
        rows, cols = w.shape
        b0, b1 = block if block is not None else (rows, cols)
        grid = torch.zeros(math.ceil(rows / b0), math.ceil(cols / b1), dtype=torch.float32)
        codes = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                part = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
                scale = part.abs().max() / FP8_MAX
                grid[i, j] = scale
                codes[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (part / scale).to(torch.float8_e4m3fn)
        value = torch.zeros(rows, cols, dtype=F64)
        for r in range(rows):
            for c in range(cols):
                value[r, c] = float(codes[r, c].to(F64)) * float(grid[r // b0, c // b1])
        sd[name] = codes
        sd[name + "_scale_inv"] = grid if block is not None else grid.reshape(())
        ref[name] = value
    _write(out, sd, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                     "weight_block_size": list(block) if block is not None else None})
    return ref


# --------------------------------------------------------------------------------------------- GPTQ / AWQ


def _pack_bits(values: list[int], bits: int) -> list[int]:
    """Pack unsigned ``bits``-bit ``values`` into 32-bit words, value i starting at bit i * bits of the stream
    (AutoGPTQ's packing, which lets 3-bit values straddle words); returns the words as signed int32 values."""
    stream = 0
    for i, v in enumerate(values):
        assert 0 <= v < (1 << bits)
        stream |= v << (i * bits)
    n_words = math.ceil(len(values) * bits / 32)
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def _asym(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of each row of ``w`` (the rows of one group): (codes, scale, zero), the zero
    point kept in 1..2^bits - 1 (the original GPTQ format stores zero - 1)."""
    top = (1 << bits) - 1
    lo, hi = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    scale = ((hi - lo) / top).clamp(min=1e-8).to(torch.float16)
    zero = torch.round(-lo / scale.float()).clamp(1, top)
    codes = torch.clamp(torch.round(w / scale.float()[:, None]) + zero[:, None], 0, top)
    return codes.to(torch.int64), scale, zero.to(torch.int64)


def gptq(src: Path, out: Path, bits: int = 4, group_size: int = 16, act_order: bool = True,
         checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """GPTQ as AutoGPTQ / GPTQModel save it: ``qweight`` int32 ``(in * bits / 32, out)``, ``qzeros`` int32
    ``(groups, out * bits / 32)`` (zero - 1 for ``checkpoint_format`` gptq, zero for gptq_v2), ``scales`` float16
    ``(groups, out)``, ``g_idx`` int32 ``(in,)``; with ``act_order`` the inputs are quantized in order of decreasing
    column norm, so ``g_idx`` is a permuted group map."""
    sd = _copy_dir(src, out)
    ref = {}
    offset = 1 if checkpoint_format == "gptq" else 0
    for name in linear_names(sd):
        w = sd[name].to(torch.float32)  # (out, in)
        n_out, n_in = w.shape
        order = torch.argsort(w.norm(dim=0), descending=True) if act_order else torch.arange(n_in)
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[order] = (torch.arange(n_in) // group_size).to(torch.int32)
        groups = math.ceil(n_in / group_size)
        codes = torch.zeros(n_in, n_out, dtype=torch.int64)
        scales = torch.zeros(groups, n_out, dtype=torch.float16)
        zeros = torch.zeros(groups, n_out, dtype=torch.int64)
        for g in range(groups):
            rows = (g_idx == g).nonzero().flatten()
            q, s, z = _asym(w[:, rows], bits)  # per output row over this group's inputs
            codes[rows] = q.T
            scales[g], zeros[g] = s, z
        qweight = torch.tensor([_pack_bits(codes[:, o].tolist(), bits) for o in range(n_out)], dtype=torch.int32).T
        qzeros = torch.tensor([_pack_bits((zeros[g] - offset).tolist(), bits) for g in range(groups)],
                              dtype=torch.int32)
        value = torch.zeros(n_out, n_in, dtype=F64)
        for i in range(n_in):
            g = int(g_idx[i])
            for o in range(n_out):
                value[o, i] = (int(codes[i, o]) - int(zeros[g, o])) * float(scales[g, o])
        prefix = name[: -len("weight")]
        del sd[name]
        sd.update({prefix + "qweight": qweight.contiguous(), prefix + "qzeros": qzeros, prefix + "scales": scales,
                   prefix + "g_idx": g_idx})
        ref[name] = value
    _write(out, sd, {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
                     "sym": False, "checkpoint_format": checkpoint_format, "true_sequential": True})
    return ref


AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ WQLinear_GEMM.from_linear: nibble i holds column order[i]


def awq(src: Path, out: Path, group_size: int = 16) -> dict[str, torch.Tensor]:
    """AWQ GEMM as AutoAWQ saves it: ``qweight`` int32 ``(in, out / 8)``, ``qzeros`` int32 ``(groups, out / 8)``,
    eight 4-bit columns per word in AutoAWQ's order, ``scales`` float16 ``(groups, out)``."""
    sd = _copy_dir(src, out)
    ref = {}
    for name in linear_names(sd):
        w = sd[name].to(torch.float32)
        n_out, n_in = w.shape
        groups = n_in // group_size
        codes = torch.zeros(n_in, n_out, dtype=torch.int64)
        scales = torch.zeros(groups, n_out, dtype=torch.float16)
        zeros = torch.zeros(groups, n_out, dtype=torch.int64)
        for g in range(groups):
            q, s, z = _asym(w[:, g * group_size:(g + 1) * group_size], 4)
            codes[g * group_size:(g + 1) * group_size] = q.T
            scales[g], zeros[g] = s, z

        def pack(m: torch.Tensor) -> torch.Tensor:  # (rows, out) codes -> (rows, out / 8) int32
            words = []
            for row in m.tolist():
                line = []
                for col in range(n_out // 8):
                    word = 0
                    for i in range(8):
                        word |= row[col * 8 + AWQ_PACK_ORDER[i]] << (4 * i)
                    line.append(word - (1 << 32) if word >= 1 << 31 else word)
                words.append(line)
            return torch.tensor(words, dtype=torch.int32)

        value = torch.zeros(n_out, n_in, dtype=F64)
        for i in range(n_in):
            for o in range(n_out):
                value[o, i] = (int(codes[i, o]) - int(zeros[i // group_size, o])) * float(scales[i // group_size, o])
        prefix = name[: -len("weight")]
        del sd[name]
        sd.update({prefix + "qweight": pack(codes), prefix + "qzeros": pack(zeros), prefix + "scales": scales})
        ref[name] = value
    _write(out, sd, {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                     "version": "gemm"})
    return ref


# ------------------------------------------------------------------------------------------- bitsandbytes


def bitsandbytes(src: Path, out: Path, kind: str = "int8") -> dict[str, torch.Tensor]:
    """bitsandbytes through transformers' own integration on the CPU: ``int8`` (LLM.int8(), ``SCB`` row scales),
    ``nf4`` (with nested absmax) or ``fp4``; the reference is bitsandbytes' own dequantization of what was saved.

    For 4 bits that is bitsandbytes' portable implementation (``backends/default``, the CUDA kernels' semantics:
    blocks of the flattened weight), not its native CPU kernel, which in 0.50.2 restarts the blocks at every row and
    so misreads any weight whose rows are not a multiple of the block (48 columns in blocks of 64 here: 17% error
    against the original weights where the format's own rounding is 9%)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = {"int8": BitsAndBytesConfig(load_in_8bit=True),
              "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
              "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")}[kind]
    if out.exists():
        shutil.rmtree(out)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(out)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    sd = load_file(str(out / "model.safetensors"))
    ref = {}
    for name in linear_names(load_file(str(src / "model.safetensors"))):
        if kind == "int8":
            ref[name] = F.int8_vectorwise_dequant(sd[name], sd[name[: -len("weight")] + "SCB"]).to(F64)
        else:
            state = F.QuantState.from_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")},
                                           device=torch.device("cpu"))
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested \
                else state.absmax
            ref[name] = _dequantize_4bit_compute(sd[name].reshape(-1), absmax.float(), state.code, state.blocksize,
                                                 tuple(state.shape), torch.float32).to(F64)
    return ref


# --------------------------------------------------------------------------------------- compressed-tensors


def compressed_tensors(src: Path, out: Path, **weights) -> dict[str, torch.Tensor]:
    """compressed-tensors with its own quantization parameters (``calculate_qparams``) and compressor
    (``ModelCompressor``: pack-quantized for int, naive-quantized for fp8), from a bfloat16 load of ``src``;
    ``weights`` are the QuantizationArgs (num_bits, type, symmetric, strategy, group_size, block_structure). The
    reference is the library's own decompression of what was saved."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    if out.exists():
        shutil.rmtree(out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    args = QuantizationArgs(**weights)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        w = module.weight.data.float()
        rows, cols = w.shape
        if args.strategy == "group":
            part = w.reshape(rows, cols // args.group_size, args.group_size)
            lo, hi = part.amin(-1), part.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        elif args.strategy == "block":
            b0, b1 = args.block_structure
            padded = torch.nn.functional.pad(w, (0, -cols % b1, 0, -rows % b0))
            part = padded.reshape(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
            lo, hi = part.amin((1, 3)), part.amax((1, 3))
        else:
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        scale, zero = calculate_qparams(lo, hi, args)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(
                module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return ct_reference(out)


def ct_reference(directory: Path) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompression of a checkpoint's quantized weights, float64: its registered compressor
    for the saved format (``BaseCompressor``: pack-quantized, naive-quantized), its unpacking and ``dequantize``,
    given float64 scales so that the products are not rounded to the model's bfloat16."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    cfg = json.loads((directory / "config.json").read_text())["quantization_config"]
    group = cfg["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    compressor = BaseCompressor.get_value_from_registry(group.get("format") or cfg["format"])
    sd = load_file(str(directory / "model.safetensors"))
    modules = sorted({k.rpartition(".")[0] for k in sd if k.endswith(("weight_packed", "weight_scale"))})
    out = {}
    for module in modules:
        local = {k[len(module) + 1:]: v for k, v in sd.items() if k.rpartition(".")[0] == module}
        local["weight_scale"] = local["weight_scale"].to(F64)
        out[module + ".weight"] = compressor.decompress(local, scheme)["weight"].to(F64)
    return out


# ------------------------------------------------------------------------------------------------- MXFP4


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OCP MXFP4 of the rows of ``w`` (..., n) in blocks of 32: E8M0 scale ``2^(floor(log2 amax) - 2)`` (e2m1's
    largest exponent is 2), codes rounded to the nearest FP4 E2M1 value; returns (blocks uint8 (..., n / 32, 16)
    with the first code of each pair in the low nibble, scales uint8 (..., n / 32), the value each element means)."""
    *lead, n = w.shape
    x = w.reshape(-1, n // 32, 32).to(F64)
    amax = x.abs().amax(-1).clamp(min=2.0 ** -100)
    exp = torch.floor(torch.log2(amax)) - 2
    scaled = x / torch.exp2(exp)[..., None]
    grid = torch.tensor(FP4_VALUES, dtype=F64)
    mag = (scaled.abs()[..., None] - grid).abs().argmin(-1)  # nearest magnitude code 0..7
    codes = mag + 8 * (scaled < 0).to(torch.int64)
    value = grid[mag] * torch.where(scaled < 0, -1.0, 1.0) * torch.exp2(exp)[..., None]
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    scales = (exp + 127).to(torch.uint8)
    return (blocks.reshape(*lead, n // 32, 16), scales.reshape(*lead, n // 32), value.reshape(*lead, n))


def mxfp4_experts(src: Path, out: Path) -> dict[str, torch.Tensor]:
    """gpt-oss as released: each layer's ``mlp.experts.{gate_up,down}_proj`` ((E, in, out) parameters) stored as
    ``*_blocks`` / ``*_scales`` of their (E, out, in) transposes, with ``quantization_config`` mxfp4; the attention
    weights stay bfloat16."""
    sd = _copy_dir(src, out)
    ref = {}
    for name in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales, value = mxfp4_quantize(sd[name].to(torch.float32).transpose(1, 2))
        del sd[name]
        sd[name + "_blocks"], sd[name + "_scales"] = blocks, scales
        ref[name] = value.transpose(1, 2).contiguous()
    _write(out, sd, {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                         "model.layers.*.mlp.router", "lm_head"]})
    return ref


def unquantized(src: Path, quantized: Path, out: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A float32 checkpoint with the tensor names of the float checkpoint ``src`` (config, tokenizer): ``weights``
    (logical name -> value) for the quantized weights, every other tensor as ``quantized`` stores it (a quantizer
    may also have rounded those, e.g. to bfloat16). What the quantized checkpoint must analyse and run as."""
    names = load_file(str(src / "model.safetensors"))
    _copy_dir(src, out)
    stored = load_file(str(quantized / "model.safetensors"))
    sd = {}
    for k, v in names.items():
        t = weights[k] if k in weights else stored.get(k)
        if t is None:
            continue  # a tied lm_head the quantized checkpoint leaves out
        assert tuple(t.shape) == tuple(v.shape), k
        sd[k] = t.to(torch.float32) if t.is_floating_point() else t
    _write(out, sd, None)
    return out
