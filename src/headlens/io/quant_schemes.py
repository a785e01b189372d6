"""The quantization schemes headlens reads: their names, what the output says, and the checkpoint's settings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headlens.errors import HeadlensError

# quant_method values headlens dequantizes; the README's "Quantized checkpoints" table says what each covers.
KNOWN_METHODS = ("fp8", "fbgemm_fp8", "gptq", "awq", "bitsandbytes", "compressed-tensors", "mxfp4")

FLOAT8 = tuple(d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                               "float8_e5m2fnuz", "float8_e8m0fnu")) if d is not None)


def is_numeric_float(dtype: torch.dtype) -> bool:
    """Whether a stored tensor of ``dtype`` holds its numbers as they are (float16/32/64, bfloat16)."""
    return dtype.is_floating_point and dtype not in FLOAT8


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


